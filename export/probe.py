"""Parity probes: MLX (fp32) vs the PyTorch mirror (fp32) vs the CoreML package, tap by tap and
end to end, with gates (docs/architecture.md contract 4).

    mlx_student.probe --model runs/x --package artifacts/x/model.mlpackage [--text FILE]
                      [--out DIR] [--gates top1=0.99 kl=0.01 ...] [--config probe.yaml]

A held-out text (default: the source of Python's `traceback` module, which the stdlib corpus
puts in its test split) is tokenized with the student's tokenizer and cut into `windows`
windows. In each, every backend starts from an empty KV cache, prefills `prefill_length` tokens
at position 0 with the package's prefill function, then decodes `decode_steps` more tokens of the
text one call at a time through its KV state (teacher-forced: all backends see the same ids).
Every call yields the taps of export/taps.py (embeddings, each layer's attention, MLP and
residual stream, final norm, logits; that module also holds the three runners and the metrics).
The CoreML side is the reference MIL executor (any OS) or MLModel.predict on macOS (end to end;
its taps still come from the executor, CoreML having no per-op hook).

Reported, against MLX fp32 as the reference: per tap, max abs err, rel err ||d|| / ||ref||,
cosine and fp16 headroom (65504 / max |x|); end to end, top-1 agreement and KL(mlx || other)
over all prefill and decode logits, per decode step too. Files (each written atomically):
<out>/probe_report.json, probe_report.md, probe_layers.png. Exit status 1 names every gate
that failed; 2 is a usage or input error. Gates follow the package's weight format, read from
export_manifest.json beside it (GATE_DEFAULTS); --gates and the config's `gates:` override them.

The gates and their error model: export/probe_gates.py; the report files: export/probe_report.py.
"""

import argparse
import datetime
import json
import math
import re
import sys
import time
import traceback as _traceback_module
import uuid
from pathlib import Path

import numpy as np

from mlx_student.config import ConfigError, load_yaml

from . import taps as tp
from .probe_gates import (
    COMMON_GATES,
    FP16_UNIT_ROUNDOFF,
    GATE_DEFAULTS,
    GATE_KEYS,
    error_ratios,
    evaluate_gates,
    fmt_value,
    gate_value,
    resolve_gates,
    weight_format,
)
from .probe_report import summary, write_report

CONFIG_DEFAULTS = {
    "model": None,  # the student folder (mlx-lm model folder) the package was exported from
    "package": None,  # the .mlpackage
    "text": None,  # held-out text file; default: Python's traceback.py (corpus test split)
    "out": None,  # report folder; default: the package's folder
    "context": None,  # KV-cache length; default: the package's smallest
    "prefill_length": None,  # default: the longest prefill that leaves room for the decode
    "prompt_tokens": None,  # window prompt fed as the package's prefill chunks + decode calls
    "decode_steps": 16,
    "windows": 4,
    "backend": "auto",  # auto | executor | coreml (MLModel.predict, macOS only)
    "gates": {},  # name: threshold (or null to turn off), per format under fp16: / int8: ...
}



class ProbeError(RuntimeError):
    """A probe that cannot run (bad inputs); the message says why."""


# ---------------------------------------------------------------- settings
def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.probe",
        description="MLX vs PyTorch mirror vs CoreML parity probe: per-tap errors, top-1 and "
        "KL over a held-out text (prefill + decode through the KV state), gated.",
        epilog=f"defaults: {json.dumps(CONFIG_DEFAULTS)}; gates per format: "
        f"{json.dumps(GATE_DEFAULTS)} plus {json.dumps(COMMON_GATES)}")
    add = p.add_argument
    add("--model", help="student folder (mlx-lm model folder, e.g. runs/pilot)")
    add("--package", help="the exported .mlpackage (e.g. artifacts/pilot/model.mlpackage)")
    add("--config", help="YAML with the settings below (flags override it)")
    add("--text", help="held-out text file (default: Python's traceback.py source)")
    add("--out", help="report folder (default: the package's folder)")
    add("--context", type=int, help="KV-cache length (a context the package has)")
    add("--prefill-length", type=int, help="prefill chunk length (a function of the package)")
    add("--prompt-tokens", type=int, help="each window's prompt, fed as the package's prefill "
        "chunks (the longest that fits first, or only --prefill-length's) plus decode calls for "
        "the rest, at the running position; long contexts: windows across chunk boundaries")
    add("--decode-steps", type=int, help="decode calls after each prefill")
    add("--windows", type=int, help="independent prefill + decode windows over the text")
    add("--backend", choices=("auto", "executor", "coreml"), help="what runs the package")
    add("--gates", nargs="+", metavar="NAME=VALUE",
        help=f"gate thresholds ({', '.join(GATE_KEYS)}); VALUE 'off' disables one")
    return p


def parse_args(argv=None):
    """Command line over the config file over CONFIG_DEFAULTS (as mlx_lm.lora)."""
    args = build_parser().parse_args(argv)
    settings, lines = {}, {}
    if args.config:
        settings, lines = load_yaml(args.config)
        unknown = [k for k in settings if k not in CONFIG_DEFAULTS]
        if unknown:
            raise ConfigError("\n".join(f"{args.config}:{lines[k]}: {k}: unknown probe setting"
                                        for k in unknown))
    gates = {}  # {None: {flat}, "int8": {...}}
    for k, v in (settings.pop("gates", None) or {}).items():
        if k in GATE_DEFAULTS and isinstance(v, dict):
            gates[k] = {n: gate_value(n, x, f"{args.config}: gates.{k}") for n, x in v.items()}
        else:
            gates.setdefault(None, {})[k] = gate_value(k, v, f"{args.config}: gates")
    for item in args.gates or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--gates {item}: expected NAME=VALUE")
        gates.setdefault("flags", {})[name] = gate_value(name, value, "--gates")
    args.gates = gates
    given = {k for k, v in vars(args).items() if v is not None}
    for key, value in {**CONFIG_DEFAULTS, **settings}.items():
        if key != "gates" and getattr(args, key, None) is None:
            setattr(args, key, value)
    if not args.model or not args.package:
        raise ConfigError("pass --model runs/x and --package artifacts/x/model.mlpackage")
    bad = []
    for key, low in (("decode_steps", 1), ("windows", 1), ("context", 1), ("prefill_length", 1),
                     ("prompt_tokens", 1)):
        v = getattr(args, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            where = f"--{key.replace('_', '-')}" if key in given else \
                f"{args.config}:{lines.get(key)}: {key}"
            bad.append(f"{where}: must be an integer >= {low}, got {v!r}")
    if args.backend not in ("auto", "executor", "coreml"):
        bad.append(f"{args.config}:{lines.get('backend')}: backend: {args.backend!r} is not one "
                   "of auto, executor, coreml")
    if bad:
        raise ConfigError("\n".join(bad))
    return args


# ---------------------------------------------------------------- the package's functions
FUNCTION = re.compile(r"^(?:decode|prefill_(\d+))_ctx(\d+)$")


def choose_functions(names, context=None, prefill=None, decode_steps=16,
                     prompt_tokens=None) -> dict:
    """{"context", "prefill_length", "prefill", "decode", "prefills", "calls"} from the
    package's function names: "prefills" {tokens: function} of the context, "calls" the tokens
    per call of a window's prompt: [prefill_length] by default, `tp.chunk_schedule` of
    `prompt_tokens` over the context's prefill lengths (or `prefill` alone) when given."""
    fns = {}  # context -> {tokens per call: name}
    for n in names:
        m = FUNCTION.match(n)
        if m:
            fns.setdefault(int(m.group(2)), {})[int(m.group(1) or 1)] = n
    usable = {S: f for S, f in fns.items() if 1 in f and len(f) > 1}
    if not usable:
        raise ProbeError(f"the package has no decode_ctxS + prefill_T_ctxS pair: {sorted(names)}")
    S = context or min(usable)
    if S not in usable:
        raise ProbeError(f"no prefill and decode functions at context {S} "
                         f"(contexts: {sorted(usable)})")
    lengths = sorted(t for t in usable[S] if t > 1)
    if prefill is not None and prefill not in lengths:
        raise ProbeError(f"no prefill_{prefill}_ctx{S} in the package (lengths {lengths})")
    if prompt_tokens is not None:
        if prompt_tokens + decode_steps > S:
            raise ProbeError(f"prompt {prompt_tokens} + {decode_steps} decode steps exceed "
                             f"context {S}")
        calls = tp.chunk_schedule(prompt_tokens, [prefill] if prefill else lengths)
        prefill = max(calls)
    else:
        if prefill is None:
            fit = [t for t in lengths if t + decode_steps <= S]
            if not fit:
                raise ProbeError(f"no prefill length at context {S} leaves room for "
                                 f"{decode_steps} decode steps (lengths {lengths})")
            prefill = fit[-1]
        if prefill + decode_steps > S:
            raise ProbeError(f"prefill {prefill} + {decode_steps} decode steps exceed context {S}")
        calls = [prefill]
    return {"context": S, "prefill_length": prefill,
            "prefill": usable[S][prefill] if prefill > 1 else None,
            "decode": usable[S][1], "prefills": {t: usable[S][t] for t in lengths},
            "calls": calls}


def call_counts(calls) -> dict:
    """{"64": 4, "16": 2, "1": 12}: how many calls of each size, longest first."""
    return {str(t): calls.count(t) for t in sorted(set(calls), reverse=True)}


def default_text_path() -> Path:
    """Python's traceback.py: real code, in the stdlib corpus' held-out test split."""
    return Path(_traceback_module.__file__)


def text_ids(model_dir, text: str) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return np.asarray(tok(text)["input_ids"], dtype=np.int64)


# ---------------------------------------------------------------- the probe
def probe(model_dir, package, text=None, context=None, prefill_length=None, decode_steps=16,
          windows=4, backend="auto", gate_overrides=None, log=print, prompt_tokens=None) -> dict:
    """Run the probe; returns the report (not written; see write_report)."""
    from . import mil_executor
    from .mirror import load_mirror

    t_start = time.perf_counter()
    model_dir, package = Path(model_dir), Path(package)
    for p, what in ((model_dir / "config.json", "student folder"), (package, "package")):
        if not p.exists():
            raise ProbeError(f"{p}: no such {what}")
    manifest_path = package.parent / "export_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    fmt = weight_format(manifest)
    gates = resolve_gates(fmt, gate_overrides or {})
    fns = choose_functions(mil_executor.functions(package), context, prefill_length,
                           decode_steps, prompt_tokens)
    calls = fns["calls"]
    used = {t: fns["prefills"][t] for t in sorted(set(calls)) if t > 1}
    text_path = Path(text) if text else default_text_path()
    ids = text_ids(model_dir, text_path.read_text(encoding="utf-8", errors="replace"))
    span = sum(calls) + decode_steps + 1
    windows = min(windows, len(ids) // span)
    if windows < 1:
        raise ProbeError(f"{text_path}: {len(ids)} tokens, a window needs {span}")

    log(f"probe: {package} ({fmt}) vs {model_dir}: {windows} windows x (prompt "
        f"{sum(calls)} as {call_counts(calls)} + {decode_steps} decode) at context "
        f"{fns['context']}")
    source = (manifest.get("source") or {}).get("sha256")
    matches = None
    if source:
        from .cli import checkpoint_hash

        matches = checkpoint_hash(model_dir)["sha256"] == source
        if not matches:
            log(f"WARNING: {manifest_path} says the package was exported from another "
                f"checkpoint than {model_dir} (source sha256 {source[:12]}...)")
    mirror = load_mirror(model_dir)
    layers = mirror.config.num_hidden_layers
    which = tp.package_backend(backend, package)
    runners = [tp.MLXRunner(model_dir), tp.MirrorRunner(mirror, fns["context"]),
               tp.PackageRunner(package, {**used, 1: fns["decode"]}, layers, which),
               tp.MLXRunner(model_dir, "float16")]
    got = tp.run_windows(runners, ids, calls, decode_steps, windows)
    names = tp.tap_names(layers)
    mlx, mirror_out, coreml = got["mlx"], got["mirror"], got["coreml"]
    model16 = tp.tap_table(got["mlx_fp16"]["taps"], mlx["taps"], names)
    table = lambda t: error_ratios(tp.tap_table(t["taps"], mlx["taps"], names), model16)  # noqa
    labels, nexts = got["labels"], got["next"]
    unmapped = sorted({t for u in runners[2].unmapped.values() for t in u})
    report = {
        "format": "mlx-student-probe/1",
        "run_id": uuid.uuid4().hex,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(model_dir),
        "package": str(package),
        "manifest": str(manifest_path) if manifest else None,
        "source_sha256": source,
        "source_matches_model": matches,
        "weight_format": fmt,
        "compression": manifest.get("compression"),
        "backends": {"reference": runners[0].description, "mirror": runners[1].description,
                     "fp16_model": runners[3].description,
                     "coreml": runners[2].description, "coreml_backend": which,
                     "coreml_taps": "reference MIL executor, per-op observe hook"},
        "text": {"path": str(text_path), "tokens": int(len(ids)), "windows": windows,
                 "prefill_length": fns["prefill_length"], "decode_steps": decode_steps,
                 "prompt_tokens": sum(calls), "calls": call_counts(calls),
                 "context": fns["context"], "positions": len(got["labels"]),
                 "functions": {"prefill": fns["prefill"], "prefills": list(used.values()),
                               "decode": fns["decode"]},
                 "decode": "teacher-forced: the text's own next ids, one call each"},
        "tap_names": names,
        "unmapped_coreml_taps": unmapped,
        "taps": {"coreml_vs_mlx": table(coreml), "mirror_vs_mlx": table(mirror_out),
                 "mlx_fp16_vs_mlx": model16},
        "error_model": {"unit_roundoff": FP16_UNIT_ROUNDOFF, "fp16_model": runners[3].description,
                        "rule": "err_ratio = rel_err / max(rel_err of mlx fp16, unit_roundoff)"},
        "coreml_tap_vars": {runners[2].functions[T]: {t: v for v, t in m.items()}
                            for T, m in runners[2].maps.items()},
        "headroom": {n: tp.headroom(mlx["taps"][n]) for n in names},
        "fp16_audit": {f"mirror.{k}": {"max_abs": v, "fp16_headroom": tp.FP16_MAX / v if v
                                       else math.inf} for k, v in runners[1].audit.items()},
        "end_to_end": {
            "coreml_vs_mlx": tp.end_to_end(mlx["logits"], coreml["logits"], labels, nexts),
            "mirror_vs_mlx": tp.end_to_end(mlx["logits"], mirror_out["logits"], labels, nexts),
            "mlx_next_token_accuracy": float((mlx["logits"].argmax(-1) == nexts).mean()),
            **tp.reference_sharpness(mlx["logits"]),
        },
        "gates_applied": gates,
    }
    report["gates"] = evaluate_gates(report, gates)
    report["ok"] = all(g["ok"] for g in report["gates"])
    report["timings_s"] = {**{k: round(v, 3) for k, v in got["seconds"].items()},
                           "total": round(time.perf_counter() - t_start, 3)}
    return report


def run(args) -> dict:
    report = probe(args.model, args.package, args.text, args.context, args.prefill_length,
                   args.decode_steps, args.windows, args.backend, args.gates,
                   prompt_tokens=args.prompt_tokens)
    out = Path(args.out) if args.out else Path(args.package).parent
    files = write_report(report, out)
    print(summary(report))
    print(f"wrote {files['json']}, {files['markdown'].name}, {files['plot'].name} "
          f"in {report['timings_s']['total']:.1f} s")
    return report


def main(argv=None):
    try:
        report = run(parse_args(argv))
    except (ConfigError, ProbeError, tp.TapMappingError, FileNotFoundError, ValueError,
            KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not report["ok"]:
        failed = [g for g in report["gates"] if not g["ok"]]
        for g in failed:
            print(f"probe FAILED: gate {g['gate']}: {fmt_value(g['value'])} is not {g['op']} "
                  f"{fmt_value(g['threshold'])} ({g['detail']})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
