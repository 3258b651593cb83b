"""Stage bookkeeping of the pilot: settings merged under the config, command lines from
mappings, content hashes, and the stamps that make a rerun skip what is up to date.

After a stage succeeds it writes runs/<name>/stamps/<stage>.json holding a key (the hash of
its settings and of its inputs' contents), its wall seconds and its CPU seconds (user + sys of
this process and of the children it waited for: on a shared machine the wall time measures the
load, the CPU time the work)."""

import copy
import hashlib
import json
import resource
import time
from pathlib import Path

from mlx_student.files import write_json_atomic


class StageError(RuntimeError):
    """A stage that failed; the message names the stage and why."""


def merge(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, recursively for mappings."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flags(mapping: dict) -> list:
    """{'num_records': 8, 'contexts': [512]} -> ['--num-records', '8', '--contexts', '512']"""
    out = []
    for k, v in mapping.items():
        out.append(f"--{k.replace('_', '-')}")
        out += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    return out


def tree_hash(path) -> str:
    """sha256 over the relative names and contents of the files under `path` (or of a file)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    total = hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        total.update(f"{f.relative_to(path) if f != path else f.name}:{h.hexdigest()}\n".encode())
    return total.hexdigest()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Pilot:
    """Stage bookkeeping of one pilot run: keys, stamps, skips, a log of what ran."""

    def __init__(self, settings: dict, stages, force=()):
        self.s = settings
        self.dir = Path("runs") / settings["name"]
        self.force = set(stages) if "all" in force else set(force)
        self.log = []
        self.resuming = False  # inside a stage: a killed earlier try with the same key

    def stage(self, name, settings, inputs, outputs, fn):
        """Run `fn()` unless the stamp of `name` has the same key and `outputs` exist.
        `fn` returns a small JSON-able summary kept in the stamp."""
        inputs = {str(p): tree_hash(p) for p in inputs}
        key = hashlib.sha256(json.dumps({"settings": settings, "inputs": inputs},
                                        sort_keys=True, default=str).encode()).hexdigest()
        stamp_path = self.dir / "stamps" / f"{name}.json"
        stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else None
        if (name not in self.force and stamp and stamp["key"] == key
                and all(Path(p).exists() for p in outputs)):
            print(f"[pilot] {name}: up to date (key {key[:12]}), skipped", flush=True)
            self.log.append({"stage": name, "skipped": True, "seconds": stamp["seconds"],
                             "cpu_seconds": stamp.get("cpu_seconds")})
            return stamp["result"]
        why = ("forced" if name in self.force else "no stamp" if not stamp
               else "inputs or settings changed" if stamp["key"] != key else "outputs missing")
        started = self.dir / "stamps" / f"{name}.started"
        self.resuming = started.exists() and started.read_text() == key
        print(f"[pilot] {name}: running ({why}{', resuming' if self.resuming else ''})",
              flush=True)
        started.parent.mkdir(parents=True, exist_ok=True)
        started.write_text(key)
        tic, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        seconds = round(time.perf_counter() - tic, 1)
        cpu = round(cpu_seconds() - cpu, 1)
        write_json_atomic(stamp_path, {"stage": name, "key": key, "settings": settings,
                                       "inputs": inputs,
                                       "outputs": {str(p): tree_hash(p) for p in outputs},
                                       "result": result, "seconds": seconds, "cpu_seconds": cpu,
                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime())})
        started.unlink()
        print(f"[pilot] {name}: done in {seconds:.0f} s ({cpu:.0f} CPU s)", flush=True)
        self.log.append({"stage": name, "skipped": False, "seconds": seconds, "cpu_seconds": cpu})
        return result
