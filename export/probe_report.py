"""Files of the parity probe's report (export/probe.py): probe_report.json, probe_report.md
and probe_layers.png (per-tap errors against the fp16 error model's floor and gates, and
max |x| per tap against fp16's 65504), each written atomically, plus the console summary."""

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from . import taps as tp
from .probe_gates import FP16_UNIT_ROUNDOFF, fmt_value

FILES = {"json": "probe_report.json", "markdown": "probe_report.md", "plot": "probe_layers.png"}


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
        f"- text `{t['path']}` ({t['tokens']} tokens): {t['windows']} windows x (prompt "
        f"{t['prompt_tokens']} tokens as calls {t['calls']} + {t['decode_steps']} decode steps) "
        f"at context {t['context']} = {t['positions']} positions (calls); functions "
        + ", ".join(f"`{f}`" for f in t["functions"]["prefills"] + [t["functions"]["decode"]]),
    ]
    if report["unmapped_coreml_taps"]:
        lines.append(f"- CoreML taps not found in the program: {report['unmapped_coreml_taps']}")
    lines += ["", "## Gates", "", "| gate | value | threshold | result | detail |",
              "|---|---|---|---|---|"]
    for g in report["gates"]:
        lines.append(f"| {g['gate']} | {fmt_value(g['value'])} | {g['op']} {fmt_value(g['threshold'])} | "
                     f"{'pass' if g['ok'] else '**FAIL**'} | {g['detail']} |")
    lines += ["", "## End to end (vs MLX fp32)", "",
              "| backend | positions | top-1 | KL mean | KL max | prefill top-1 | decode top-1 | "
              "decode KL mean | next-token acc |", "|---|---|---|---|---|---|---|---|---|"]
    for pair in ("coreml_vs_mlx", "mirror_vs_mlx"):
        e = e2e[pair]
        lines.append(f"| {pair.split('_vs_')[0]} | {e['positions']} | {fmt_value(e['top1'])} | "
                     f"{fmt_value(e['kl_mean'])} | {fmt_value(e['kl_max'])} | {fmt_value(e['prefill']['top1'])} | "
                     f"{fmt_value(e['decode']['top1'])} | {fmt_value(e['decode']['kl_mean'])} | "
                     f"{fmt_value(e['next_token_accuracy'])} |")
    lines += [f"| mlx | | | | | | | | {fmt_value(e2e['mlx_next_token_accuracy'])} |", "",
              f"Reference distributions: mean entropy {fmt_value(e2e['mlx_entropy_mean'])} nats, "
              f"mean top-1 probability {fmt_value(e2e['mlx_top1_prob_mean'])}.", "",
              "## Taps (rel err = ||other - mlx|| / ||mlx||; ratio = rel err / max(the fp16 "
              "model's rel err, 2^-11); headroom = 65504 / max |x| of the fp32 reference)", "",
              "| tap | coreml max abs err | coreml rel err | coreml ratio | coreml cosine | "
              "mirror max abs err | mirror rel err | mirror ratio | fp16 model rel err | max abs "
              "| fp16 headroom |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cm, mm, hd = report["taps"]["coreml_vs_mlx"], report["taps"]["mirror_vs_mlx"], \
        report["headroom"]
    for n in report["tap_names"]:
        c, m = cm.get(n, {}), mm.get(n, {})
        lines.append(f"| {n} | {fmt_value(c.get('max_abs_err', '-'))} | {fmt_value(c.get('rel_err', '-'))} | "
                     f"{fmt_value(c.get('err_ratio', '-'))} | {_cos(c.get('cosine', '-'))} | "
                     f"{fmt_value(m.get('max_abs_err', '-'))} | {fmt_value(m.get('rel_err', '-'))} | "
                     f"{fmt_value(m.get('err_ratio', '-'))} | {fmt_value(m.get('fp16_rel_err', '-'))} | "
                     f"{fmt_value(hd[n]['max_abs'])} | {fmt_value(hd[n]['fp16_headroom'])} |")
    audit = report.get("fp16_audit", {})
    if audit:
        lines += ["", "fp16 audit taps of the mirror over the same text (max |x| in fp32, "
                  "headroom): " + ", ".join(f"{k.split('.', 1)[1]} {fmt_value(v['max_abs'])} "
                                            f"({fmt_value(v['fp16_headroom'])}x)"
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
        lines.append(f"  gate {g['gate']}: {fmt_value(g['value'])} {g['op']} {fmt_value(g['threshold'])} "
                     f"{'ok' if g['ok'] else 'FAILED'} ({g['detail']})")
    return "\n".join(lines)
