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

The parity gates come from the fp16 error model, not from one machine's numbers. fp16 rounds
every result to a relative error of at most u = 2^-11; a tap's error is the sum of the
roundings on its path (weights, each op's output, the residual stream it is added to, whose
own scale sets the absolute size of the error it carries), each amplified by the condition of
the layers after it. That condition belongs to the model, not to the format: a trained or
fine-tuned student whose MLP lifts |x| from ~20 to ~700 turns 2u at its input into 20-50u at
the next layer's output on every CPU. So the probe measures the model's own fp16 error in the
same run: mlx-lm's model in fp16 (weights and activations fp16) over the same ids, its rel err
e16 per tap against the fp32 reference (floored at u: a tap is never asked to beat its own
rounding). Then, per tap:

    tap_err_ratio     rel_err(coreml) / max(e16, u) < 8 (fp16 packages). The package rounds at
                      every MIL op where mlx-lm fuses (RMSNorm is 5 ops there, 1 kernel here;
                      attention 6 vs 1), so its error may be a few times e16 (3.5x measured on
                      an MLP at 20u); a wrong weight, op or layout is 100x or more.
    mirror_err_ratio  rel_err(mirror fp32) / max(e16, u) < 1/8 = 2^-3: fp32 rounds 2^13 finer
                      than fp16; another summation order over reductions of at most 16384
                      terms (the ANE's axis limit) costs at most sqrt(16384) = 2^7 more, times
                      the same 2^3 slack: 2^(-13 + 7 + 3).

Quantized packages are gated end to end (top1, kl): their taps carry the quantization error.
"""

import argparse
import datetime
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback as _traceback_module
import uuid
from pathlib import Path

import numpy as np

from mlx_student.config import ConfigError, load_yaml

from . import taps as tp

CONFIG_DEFAULTS = {
    "model": None,  # the student folder (mlx-lm model folder) the package was exported from
    "package": None,  # the .mlpackage
    "text": None,  # held-out text file; default: Python's traceback.py (corpus test split)
    "out": None,  # report folder; default: the package's folder
    "context": None,  # KV-cache length; default: the package's smallest
    "prefill_length": None,  # default: the longest prefill that leaves room for the decode
    "decode_steps": 16,
    "windows": 4,
    "backend": "auto",  # auto | executor | coreml (MLModel.predict, macOS only)
    "gates": {},  # name: threshold (or null to turn off), per format under fp16: / int8: ...
}

# Per weight format of the package: every CoreML-vs-MLX tap's error below tap_err_ratio times
# the model's own fp16 error there (see the module docstring), top-1 agreement at least top1,
# mean KL below kl. COMMON holds for every format. Quantized
# packages are gated end to end only: a layer whose output is small next to the residual stream
# (trained students carry |x| ~ 1e4 there) can show 10-30% int8 error in its own tap and still
# leave the logits within 0.2% (the pilot does); the taps stay in the report to localize.
GATE_DEFAULTS = {
    "fp16": {"tap_err_ratio": 8.0, "top1": 0.99, "kl": 0.01},
    "int8": {"tap_err_ratio": None, "top1": 0.95, "kl": 0.05},
    "lut8": {"tap_err_ratio": None, "top1": 0.95, "kl": 0.05},
    "int4": {"tap_err_ratio": None, "top1": 0.80, "kl": 0.25},
    "lut4": {"tap_err_ratio": None, "top1": 0.80, "kl": 0.25},
}
COMMON_GATES = {"mirror_err_ratio": 2.0**-3, "fp16_headroom": 2.0}
GATE_KEYS = ("tap_err_ratio", "top1", "kl", "mirror_err_ratio", "fp16_headroom")
FP16_UNIT_ROUNDOFF = 2.0**-11
FORMAT_RANK = {"fp16": 0, "int8": 1, "lut8": 1, "int4": 2, "lut4": 2}
FILES = {"json": "probe_report.json", "markdown": "probe_report.md", "plot": "probe_layers.png"}


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
    add("--decode-steps", type=int, help="decode calls after each prefill")
    add("--windows", type=int, help="independent prefill + decode windows over the text")
    add("--backend", choices=("auto", "executor", "coreml"), help="what runs the package")
    add("--gates", nargs="+", metavar="NAME=VALUE",
        help=f"gate thresholds ({', '.join(GATE_KEYS)}); VALUE 'off' disables one")
    return p


def _gate_value(name, value, where):
    if name not in GATE_KEYS:
        raise ConfigError(f"{where}: unknown gate '{name}' (gates: {', '.join(GATE_KEYS)})")
    if value is None or value is False or (  # YAML reads a bare `off` as false
            isinstance(value, str) and value.lower() in ("off", "none", "null")):
        return None
    if value is True:
        raise ConfigError(f"{where}: gate {name}: true is not a threshold (a number or off)")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: gate {name}: {value!r} is not a number or 'off'") from None


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
            gates[k] = {n: _gate_value(n, x, f"{args.config}: gates.{k}") for n, x in v.items()}
        else:
            gates.setdefault(None, {})[k] = _gate_value(k, v, f"{args.config}: gates")
    for item in args.gates or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--gates {item}: expected NAME=VALUE")
        gates.setdefault("flags", {})[name] = _gate_value(name, value, "--gates")
    args.gates = gates
    given = {k for k, v in vars(args).items() if v is not None}
    for key, value in {**CONFIG_DEFAULTS, **settings}.items():
        if key != "gates" and getattr(args, key, None) is None:
            setattr(args, key, value)
    if not args.model or not args.package:
        raise ConfigError("pass --model runs/x and --package artifacts/x/model.mlpackage")
    bad = []
    for key, low in (("decode_steps", 1), ("windows", 1), ("context", 1), ("prefill_length", 1)):
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


def weight_format(manifest: dict) -> str:
    """The coarsest weight format of an export manifest's compression block."""
    comp = manifest.get("compression") or {}
    formats = [comp.get(k) for k in ("weights", "embedding", "lm_head") if comp.get(k)]
    return max(formats or ["fp16"], key=lambda f: FORMAT_RANK.get(f, 3))


def resolve_gates(fmt: str, overrides: dict) -> dict:
    gates = {**GATE_DEFAULTS.get(fmt, GATE_DEFAULTS["int4"]), **COMMON_GATES}
    gates.update(overrides.get(None, {}))
    gates.update(overrides.get(fmt, {}))
    gates.update(overrides.get("flags", {}))
    return gates


# ---------------------------------------------------------------- the package's functions
FUNCTION = re.compile(r"^(?:decode|prefill_(\d+))_ctx(\d+)$")


def choose_functions(names, context=None, prefill=None, decode_steps=16) -> dict:
    """{"context", "prefill_length", "prefill", "decode"} from the package's function names."""
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
    if prefill is None:
        fit = [t for t in lengths if t + decode_steps <= S]
        if not fit:
            raise ProbeError(f"no prefill length at context {S} leaves room for "
                             f"{decode_steps} decode steps (lengths {lengths})")
        prefill = fit[-1]
    if prefill not in lengths:
        raise ProbeError(f"no prefill_{prefill}_ctx{S} in the package (lengths {lengths})")
    if prefill + decode_steps > S:
        raise ProbeError(f"prefill {prefill} + {decode_steps} decode steps exceed context {S}")
    return {"context": S, "prefill_length": prefill, "prefill": usable[S][prefill],
            "decode": usable[S][1]}


def default_text_path() -> Path:
    """Python's traceback.py: real code, in the stdlib corpus' held-out test split."""
    return Path(_traceback_module.__file__)


def text_ids(model_dir, text: str) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return np.asarray(tok(text)["input_ids"], dtype=np.int64)


# ---------------------------------------------------------------- gates
def evaluate_gates(report: dict, gates: dict) -> list:
    """[{gate, value, threshold, op, ok, detail}] for every gate that is on."""
    out = []

    def gate(name, value, op, detail):
        thr = gates.get(name)
        if thr is None:
            return
        ok = bool(value < thr) if op == "<" else bool(value >= thr)
        if not math.isfinite(value) and not (op == ">=" and value == math.inf):
            ok = False
        out.append({"gate": name, "value": value, "threshold": thr, "op": op, "ok": ok,
                    "detail": detail})

    def worst_ratio(name, pair):
        tab = report["taps"][pair]
        if tab:
            w = max(tab, key=lambda k: tab[k]["err_ratio"])
            gate(name, tab[w]["err_ratio"], "<", f"worst tap {w}: rel err {_g(tab[w]['rel_err'])}"
                 f" ({pair.replace('_', ' ')}) vs the model's fp16 error "
                 f"{_g(tab[w]['fp16_rel_err'])}")

    worst_ratio("tap_err_ratio", "coreml_vs_mlx")
    e2e = report["end_to_end"]["coreml_vs_mlx"]
    gate("top1", e2e["top1"], ">=", f"coreml vs mlx over {e2e['positions']} positions")
    gate("kl", e2e["kl_mean"], "<", f"mean KL(mlx || coreml) over {e2e['positions']} positions")
    worst_ratio("mirror_err_ratio", "mirror_vs_mlx")
    head = {**report["headroom"], **report.get("fp16_audit", {})}
    low = min(head, key=lambda k: head[k]["fp16_headroom"])
    gate("fp16_headroom", head[low]["fp16_headroom"], ">=",
         f"{low}: max |x| {head[low]['max_abs']:.4g} in fp32 vs 65504 (the taps and the "
         "mirror's audit taps)")
    return out


def error_ratios(table: dict, model16: dict) -> dict:
    """`table` (tap_table) with each tap's fp16_rel_err (the model's own fp16 error there, from
    `model16`) and err_ratio = rel_err / max(fp16_rel_err, u)."""
    out = {}
    for n, c in table.items():
        e16 = model16[n]["rel_err"] if n in model16 else math.nan
        floor = e16 if math.isfinite(e16) and e16 > FP16_UNIT_ROUNDOFF else FP16_UNIT_ROUNDOFF
        out[n] = {**c, "fp16_rel_err": e16, "err_ratio": c["rel_err"] / floor}
    return out


# ---------------------------------------------------------------- the probe
def probe(model_dir, package, text=None, context=None, prefill_length=None, decode_steps=16,
          windows=4, backend="auto", gate_overrides=None, log=print) -> dict:
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
                           decode_steps)
    text_path = Path(text) if text else default_text_path()
    ids = text_ids(model_dir, text_path.read_text(encoding="utf-8", errors="replace"))
    span = fns["prefill_length"] + decode_steps + 1
    windows = min(windows, len(ids) // span)
    if windows < 1:
        raise ProbeError(f"{text_path}: {len(ids)} tokens, a window needs {span}")

    log(f"probe: {package} ({fmt}) vs {model_dir}: {windows} windows x (prefill "
        f"{fns['prefill_length']} + {decode_steps} decode) at context {fns['context']}")
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
               tp.PackageRunner(package, {fns["prefill_length"]: fns["prefill"],
                                          1: fns["decode"]}, layers, which),
               tp.MLXRunner(model_dir, "float16")]
    got = tp.run_windows(runners, ids, fns["prefill_length"], decode_steps, windows)
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
                 "context": fns["context"], "positions": len(got["labels"]),
                 "functions": {"prefill": fns["prefill"], "decode": fns["decode"]},
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


# ---------------------------------------------------------------- report files
def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def _g(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else str(x)


def _cos(x) -> str:
    return f"{x:.6f}" if isinstance(x, float) and math.isfinite(x) else str(x)


def markdown(report: dict) -> str:
    t, e2e = report["text"], report["end_to_end"]
    verdict = "PASS" if report["ok"] else "FAIL: " + ", ".join(
        g["gate"] for g in report["gates"] if not g["ok"])
    lines = [
        f"# Probe report: {verdict}", "",
        f"- run `{report['run_id']}`, {report['created']}",
        f"- model `{report['model']}`, package `{report['package']}` "
        f"(weights {report['weight_format']})",
        f"- reference: {report['backends']['reference']}",
        f"- mirror: {report['backends']['mirror']}",
        f"- CoreML side: **{report['backends']['coreml']}**",
        f"- text `{t['path']}` ({t['tokens']} tokens): {t['windows']} windows x (prefill "
        f"{t['prefill_length']} + {t['decode_steps']} decode steps) at context {t['context']} "
        f"= {t['positions']} positions; functions `{t['functions']['prefill']}`, "
        f"`{t['functions']['decode']}`",
    ]
    if report["unmapped_coreml_taps"]:
        lines.append(f"- CoreML taps not found in the program: {report['unmapped_coreml_taps']}")
    lines += ["", "## Gates", "", "| gate | value | threshold | result | detail |",
              "|---|---|---|---|---|"]
    for g in report["gates"]:
        lines.append(f"| {g['gate']} | {_g(g['value'])} | {g['op']} {_g(g['threshold'])} | "
                     f"{'pass' if g['ok'] else '**FAIL**'} | {g['detail']} |")
    lines += ["", "## End to end (vs MLX fp32)", "",
              "| backend | positions | top-1 | KL mean | KL max | prefill top-1 | decode top-1 | "
              "decode KL mean | next-token acc |", "|---|---|---|---|---|---|---|---|---|"]
    for pair in ("coreml_vs_mlx", "mirror_vs_mlx"):
        e = e2e[pair]
        lines.append(f"| {pair.split('_vs_')[0]} | {e['positions']} | {_g(e['top1'])} | "
                     f"{_g(e['kl_mean'])} | {_g(e['kl_max'])} | {_g(e['prefill']['top1'])} | "
                     f"{_g(e['decode']['top1'])} | {_g(e['decode']['kl_mean'])} | "
                     f"{_g(e['next_token_accuracy'])} |")
    lines += [f"| mlx | | | | | | | | {_g(e2e['mlx_next_token_accuracy'])} |", "",
              f"Reference distributions: mean entropy {_g(e2e['mlx_entropy_mean'])} nats, "
              f"mean top-1 probability {_g(e2e['mlx_top1_prob_mean'])}.", "",
              "## Taps (rel err = ||other - mlx|| / ||mlx||; ratio = rel err / max(the fp16 "
              "model's rel err, 2^-11); headroom = 65504 / max |x| of the fp32 reference)", "",
              "| tap | coreml max abs err | coreml rel err | coreml ratio | coreml cosine | "
              "mirror max abs err | mirror rel err | mirror ratio | fp16 model rel err | max abs "
              "| fp16 headroom |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cm, mm, hd = report["taps"]["coreml_vs_mlx"], report["taps"]["mirror_vs_mlx"], \
        report["headroom"]
    for n in report["tap_names"]:
        c, m = cm.get(n, {}), mm.get(n, {})
        lines.append(f"| {n} | {_g(c.get('max_abs_err', '-'))} | {_g(c.get('rel_err', '-'))} | "
                     f"{_g(c.get('err_ratio', '-'))} | {_cos(c.get('cosine', '-'))} | "
                     f"{_g(m.get('max_abs_err', '-'))} | {_g(m.get('rel_err', '-'))} | "
                     f"{_g(m.get('err_ratio', '-'))} | {_g(m.get('fp16_rel_err', '-'))} | "
                     f"{_g(hd[n]['max_abs'])} | {_g(hd[n]['fp16_headroom'])} |")
    audit = report.get("fp16_audit", {})
    if audit:
        lines += ["", "fp16 audit taps of the mirror over the same text (max |x| in fp32, "
                  "headroom): " + ", ".join(f"{k.split('.', 1)[1]} {_g(v['max_abs'])} "
                                            f"({_g(v['fp16_headroom'])}x)"
                                            for k, v in audit.items()) + "."]
    tm = report["timings_s"]
    lines += ["", f"![per-tap errors]({FILES['plot']})", "",
              "Timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in tm.items()), ""]
    return "\n".join(lines)


def plot(report: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["tap_names"]
    x = np.arange(len(names))
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(names) + 3), 8), sharex=True)
    for pair, style in (("coreml_vs_mlx", "o-"), ("mirror_vs_mlx", "s--")):
        tab = report["taps"][pair]
        y = [tab[n]["rel_err"] if n in tab else np.nan for n in names]
        y = [v if np.isfinite(v) else 1e3 for v in y]
        ax.semilogy(x, np.maximum(y, 1e-9), style, label=pair.replace("_", " "), ms=4)  # 0: floor
    model16 = report["taps"]["mlx_fp16_vs_mlx"]
    floor = [max(model16[n]["rel_err"], FP16_UNIT_ROUNDOFF) if n in model16 else np.nan
             for n in names]
    ax.semilogy(x, floor, "^-", color="C2", ms=3, lw=1, label="max(fp16 model, 2^-11)")
    for key, color in (("tap_err_ratio", "C0"), ("mirror_err_ratio", "C1")):
        thr = report["gates_applied"].get(key)
        if thr:
            ax.semilogy(x, np.multiply(floor, thr), color=color, ls=":", lw=1,
                        label=f"gate {key} {thr:g} x")
    ax.set_ylabel("rel err ||d|| / ||mlx||")
    ax.set_title(f"probe {report['run_id'][:8]}: {Path(report['package']).name} "
                 f"({report['weight_format']}, {report['backends']['coreml_backend']}) vs MLX fp32")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    bx.semilogy(x, [report["headroom"][n]["max_abs"] for n in names], "o-", ms=4,
                label="max |x| (MLX fp32)")
    bx.axhline(tp.FP16_MAX, color="r", ls=":", label="fp16 max 65504")
    bx.set_ylabel("max |x|")
    bx.legend(fontsize=8)
    bx.grid(True, which="both", alpha=0.3)
    bx.set_xticks(x)
    bx.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Description": report["run_id"]})
    plt.close(fig)


def _atomic_write(path: Path, write):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict, out) -> dict:
    """Write the PNG, the Markdown and last the JSON into `out`, each file atomically; all three
    carry the same run_id. Returns {kind: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {k: out / v for k, v in FILES.items()}
    report["files"] = {k: str(v) for k, v in files.items()}
    _atomic_write(files["plot"], lambda p: plot(report, p))
    _atomic_write(files["markdown"], lambda p: Path(p).write_text(markdown(report)))
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
    _atomic_write(files["json"], lambda p: Path(p).write_text(text))
    return files


def summary(report: dict) -> str:
    e = report["end_to_end"]["coreml_vs_mlx"]
    cm, mm = report["taps"]["coreml_vs_mlx"], report["taps"]["mirror_vs_mlx"]
    worst = max(cm.values(), key=lambda c: c["rel_err"])["rel_err"] if cm else math.nan
    ratio = max(c["err_ratio"] for c in cm.values()) if cm else math.nan
    lines = [f"coreml ({report['backends']['coreml_backend']}) vs mlx: top-1 {e['top1']:.4f}, "
             f"KL mean {e['kl_mean']:.2e} (max {e['kl_max']:.2e}) over {e['positions']} "
             f"positions; worst tap rel err {worst:.2e}, {ratio:.2f}x the model's fp16 error",
             f"mirror vs mlx: worst tap rel err "
             f"{max(m['rel_err'] for m in mm.values()):.2e}, "
             f"{max(m['err_ratio'] for m in mm.values()):.3f}x the model's fp16 error"]
    for g in report["gates"]:
        lines.append(f"  gate {g['gate']}: {_g(g['value'])} {g['op']} {_g(g['threshold'])} "
                     f"{'ok' if g['ok'] else 'FAILED'} ({g['detail']})")
    return "\n".join(lines)


def run(args) -> dict:
    report = probe(args.model, args.package, args.text, args.context, args.prefill_length,
                   args.decode_steps, args.windows, args.backend, args.gates)
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
            print(f"probe FAILED: gate {g['gate']}: {_g(g['value'])} is not {g['op']} "
                  f"{_g(g['threshold'])} ({g['detail']})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
