"""Replay tool results from recorded fixtures; no live network.

    broker = Broker("data/tools/fixtures.json")        # or a dict {key: result}
    result = broker.call("read_file", {"path": "setup.py"})   # BrokerMiss if never recorded

A call is looked up by its normalized key: the name, a colon, and the canonical JSON of the
arguments (sorted keys, compact separators, UTF-8, integral floats as integers), so two calls
that differ only in key order or `2.0` vs `2` share a result. A miss raises `BrokerMiss`
(carrying the key) and is appended to `broker.misses`.

With `record=` a real tool (a callable `(name, arguments) -> dict`), a miss is answered by it
instead, and the result is kept as a new fixture (`broker.recorded` lists the keys;
`broker.save(path)` writes all fixtures). `LocalTools(root)` is such a real tool for the
workspace tools (read_file, list_dir, search_code, run_python), confined to `root`.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

from ..files import write_json_atomic


class BrokerMiss(KeyError):
    """No recorded result for a call; `.key` is its normalized key."""

    def __init__(self, key):
        super().__init__(key)
        self.key = key

    def __str__(self):
        return f"no recorded result for {self.key}"


def _canonical(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def call_key(name, arguments):
    """The normalized key of a call (see the module docstring)."""
    args = json.dumps(_canonical(arguments), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return f"{name}:{args}"


class Broker:
    def __init__(self, fixtures, record=None):
        if isinstance(fixtures, (str, Path)):
            path = Path(fixtures)
            try:
                fixtures = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: cannot read fixtures: {e}") from None
            if not isinstance(fixtures, dict):
                raise ValueError(f"{path}: fixtures must be a JSON object {{key: result}}")
        self.fixtures = dict(fixtures)
        self.record = record
        self.misses = []
        self.recorded = []
        self.calls = 0

    def call(self, name, arguments):
        self.calls += 1
        key = call_key(name, arguments)
        if key in self.fixtures:
            return self.fixtures[key]
        if self.record is None:
            self.misses.append(key)
            raise BrokerMiss(key)
        result = self.record(name, arguments)
        self.fixtures[key] = result
        self.recorded.append(key)
        return result

    def save(self, path):
        write_json_atomic(Path(path), self.fixtures)


class LocalTools:
    """Real workspace tools under `root` (paths outside it are refused), for recording."""

    def __init__(self, root, timeout_s=10.0):
        self.root = Path(root).resolve()
        self.timeout_s = timeout_s

    def _path(self, path):
        p = (self.root / path).resolve()
        if p != self.root and self.root not in p.parents:
            raise ValueError(f"{path!r} is outside the workspace")
        return p

    def __call__(self, name, arguments):
        fn = getattr(self, f"_{name}", None)
        if fn is None:
            return {"error": f"tool {name!r} is not available locally"}
        try:
            return fn(**arguments)
        except (OSError, ValueError, re.error) as e:
            return {"error": f"{type(e).__name__}: {e}"}

    def _read_file(self, path, start_line=1, max_lines=200):
        lines = self._path(path).read_text().splitlines()
        chunk = lines[start_line - 1 : start_line - 1 + max_lines]
        return {"path": path, "start_line": start_line, "lines": chunk,
                "total_lines": len(lines)}

    def _list_dir(self, path, recursive=False, patterns=("*",)):
        base = self._path(path)
        found = set()
        for pattern in patterns:
            found.update(base.rglob(pattern) if recursive else base.glob(pattern))
        return {"path": path, "entries": sorted(
            str(p.relative_to(base)) + ("/" if p.is_dir() else "") for p in found)}

    def _search_code(self, query, paths=(".",), mode="literal", max_results=20):
        rx = re.compile(query if mode == "regex" else re.escape(query))
        matches = []
        for top in paths:
            base = self._path(top)
            for f in sorted(base.rglob("*.py") if base.is_dir() else [base]):
                for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                    if rx.search(line) and len(matches) < max_results:
                        matches.append({"path": str(f.relative_to(self.root)), "line": i,
                                        "text": line.strip()})
        return {"query": query, "matches": matches}

    def _run_python(self, code, timeout_s=None):
        try:
            p = subprocess.run([sys.executable, "-I", "-c", code], cwd=self.root,
                               capture_output=True, text=True,
                               timeout=timeout_s or self.timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s or self.timeout_s} s"}
        return {"exit_code": p.returncode, "stdout": p.stdout[-4000:],
                "stderr": p.stderr[-4000:]}
