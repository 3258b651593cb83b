"""Gates of the parity probe (export/probe.py): thresholds per weight format, their
resolution from defaults, the config file and flags, and their evaluation on a report.

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

import math

from mlx_student.config import ConfigError

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


def gate_value(name, value, where):
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
            gate(name, tab[w]["err_ratio"], "<", f"worst tap {w}: rel err {fmt_value(tab[w]['rel_err'])}"
                 f" ({pair.replace('_', ' ')}) vs the model's fp16 error "
                 f"{fmt_value(tab[w]['fp16_rel_err'])}")

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



def fmt_value(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else str(x)
