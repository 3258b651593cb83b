"""The pilot's report: runs/<name>/report.md and report.html (plots inline as base64 PNG).

Every number is read from a stage's output file, and the report names the file: the KD
manifest, the prune report, the arms' metrics.jsonl, eval.json, the export manifests, the probe reports and
exit.json, bench.json and tool_calls.json. The document is built once as a list of blocks
(heading, text, table, image) and rendered to Markdown (images as files under report_files/)
and to self-contained HTML.
"""

import base64
import html
import json
import math
import re
from pathlib import Path

from mlx_student.files import write_json_atomic

from .paths import kd_dir, package_dir, probe_dir, scored_dir, train_data_dir

GOAL_POINTS = 5.0  # the best KD arm should beat the control by this many points of top-1
GOAL_GAP = 0.5  # the best student should close this share of the CE gap from init to teacher


def _read(path):
    return json.loads(Path(path).read_text())


def _f(x, spec=".4g"):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return format(x, spec) if math.isfinite(x) else str(x)
    return str(x)


def _pct(x):
    return f"{100 * x:.1f} %"


def _mb(n):
    return f"{n / 1e6:.1f} MB"


class Doc:
    def __init__(self):
        self.blocks = []
        self.gates = []  # [gate, measured, result, source file]

    def h(self, level, text):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, header, rows):
        self.blocks.append(("table", header, [[str(c) for c in r] for r in rows]))

    def image(self, path, alt):
        self.blocks.append(("img", Path(path), alt))

    def markdown(self, base: Path) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("\n".join(["| " + " | ".join(b[1]) + " |",
                                      "|" + "---|" * len(b[1])]
                                     + ["| " + " | ".join(r) + " |" for r in b[2]]))
            else:
                out.append(f"![{b[2]}]({b[1].relative_to(base)})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text):
            text = html.escape(text)
            text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
            return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
               "</title><style>body{font-family:sans-serif;max-width:1100px;margin:auto;"
               "padding:1em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid "
               "#ccc;padding:3px 8px;text-align:left}th{background:#eee}img{max-width:100%}"
               "</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{inline(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in b[1])
                           + "</tr>" + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r)
                                               + "</tr>" for r in b[2]) + "</table>")
            else:
                data = base64.b64encode(b[1].read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'>"
                           "</p>")
        return "\n".join(out + ["</body></html>"]) + "\n"


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(runs: dict, path: Path):
    """Train loss (each student's own objective) and validation top-1 agreement / KL to the
    teacher's top-k, KD vs control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, rows in runs.items():
        axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1,
                     label=f"{name} (train, own loss)")
        valid = [r for r in rows if "valid" in r]
        for ax, key in zip(axes[1:], ("top1_agree", "kl_topk")):
            ax.plot([r["step"] for r in valid], [r["valid"].get(key, math.nan) for r in valid],
                    "o-", label=f"{name} (valid)")
    for ax, title in zip(axes, ("training loss", "valid: top-1 agreement with the teacher",
                                "valid: KL(teacher top-k || student)")):
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build(run_dir: Path, s: dict) -> Doc:
    d = Doc()
    kd_data = kd_dir(s)
    log = _read(run_dir / "pilot_log.json")
    manifest = _read(kd_data / "manifest.json")
    ev = _read(run_dir / "eval.json")
    kd_cfg = _read(run_dir / "pruned" / "config.json")
    prune = _read(run_dir / "pruned" / "prune_report.json")
    d.h(1, f"KD pilot `{s['name']}`")
    d.p(f"Config `{s['config']}`, seed {s['seed']}; stages from `{run_dir / 'pilot_log.json'}` "
        "(wall seconds; CPU seconds, user + system of the pilot and its children: on a shared "
        "machine the wall time measures the load, the CPU time the work; skipped = up to date "
        "from an earlier run):")
    cpu = [st.get("cpu_seconds") for st in log["stages"]]
    d.table(["stage", "wall s", "CPU s"], [
        [st["stage"] + (" (skipped)" if st["skipped"] else ""), f"{st['seconds']:.0f}",
         _f(c, ".0f") if c is not None else "-"] for st, c in zip(log["stages"], cpu)]
        + [["total", f"{sum(st['seconds'] for st in log['stages']):.0f}",
            f"{sum(c for c in cpu if c is not None):.0f}"]])

    # ---- config and sizes
    d.h(2, "Student and run settings")
    fmts = s["export"]["formats"]
    params = _read(package_dir(run_dir, fmts[0]) / "export_manifest.json")["parameters"]
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size")
    d.table(["field", "value"], [["parameters", f"{params:,}"]]
            + [[k, kd_cfg[k]] for k in keys if k in kd_cfg]
            + [["train (every arm)", json.dumps(s["train"])]]
            + [[f"arm `{a}` loss", json.dumps(loss)] for a, loss in s["arms"].items()])

    # ---- the pruned init
    d.h(2, "The student cut from the teacher")
    tp = prune["parameters"]
    d.p(f"`{prune['teacher']}` ({tp['teacher']:,} parameters) cut to {tp['student']:,} "
        f"parameters; importance from {prune['importance']['tokens']} calibration tokens of "
        f"`{prune['calibration']}`; every candidate scored before training on "
        f"{prune['heldout_tokens']} tokens of `{prune['heldout']}` (teacher CE "
        f"{prune['teacher_heldout']['ce']:.3f}); the lowest KL is every arm's init "
        f"(`{run_dir / 'pruned' / 'prune_report.json'}`).")
    d.table(["candidate", "KL to teacher", "CE", "top-1 agreement", "layers kept", "chosen"],
            [[" = ".join([c["name"], *c["same_as"]]), _f(c["kl"]), _f(c["ce"]),
              _pct(c["top1_agree"]), len(c["layers"]), "**chosen**" if c["chosen"] else ""]
             for c in prune["candidates"]])

    # ---- teacher and data
    d.h(2, "Teacher and KD data")
    splits = {sp: [json.loads(line) for line in (kd_data / f"{sp}.jsonl").read_text().splitlines()
                   if line.strip()] for sp in ("train", "valid", "test")}
    recs = [r for rows in splits.values() for r in rows]
    comp = [r["usage"]["completion_tokens"] for r in recs]
    prompt = [r["usage"]["prompt_tokens"] for r in recs]
    last = manifest["last_run"]
    d.table(["item", "value", "source"], [
        ["teacher", f"{manifest['teacher']['model']} ({manifest['teacher']['kind']}), "
                    f"sampling {json.dumps(manifest['teacher']['sampling'])}", "manifest.json"],
        ["records (train / valid / test)", f"{len(recs)} ({len(splits['train'])} / "
                                          f"{len(splits['valid'])} / {len(splits['test'])})",
         "*.jsonl"],
        ["records with top-k", manifest["records_with_topk"], "manifest.json"],
        ["KD mode", f"{manifest['kd']}: {manifest['kd_note']}", "manifest.json"],
        ["prompt tokens (mean)", _f(sum(prompt) / len(prompt), ".1f"), "*.jsonl usage"],
        ["completion tokens (mean / total)", f"{sum(comp) / len(comp):.1f} / {sum(comp)}",
         "*.jsonl usage"],
        ["finished by EOS", _pct(sum(r["finish_reason"] == "stop" for r in recs) / len(recs)),
         "*.jsonl finish_reason"],
        ["teacher rate, last kd_mix run on the folder",
         f"{last['records_per_s']:.3f} records/s, {last['tokens_per_s']:.1f} tokens/s "
         f"({last['written']} records in {last['elapsed_s']:.0f} s)" if last["written"] else
         "it made no records (the folder was complete); earlier runs' rates are in their logs",
         "manifest.json"],
    ])
    by_source = {}
    for r in recs:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    d.p("Records per prompt source: " + ", ".join(f"{k} {v}" for k, v in sorted(by_source.items()))
        + f" (`{kd_data}/*.jsonl`; a folder grown by earlier runs of other sizes keeps their "
        "records, and the students train on every record in it).")

    # ---- the arms' training data
    d.h(2, "Training data (every arm)")
    td = _read(train_data_dir(s) / "manifest.json")
    sc = _read(scored_dir(s) / "manifest.json")
    natural = _read(run_dir / "natural" / "sources.json")
    d.p(f"`{train_data_dir(s)}`: natural text scored by the teacher (teacher forcing, "
        f"`{scored_dir(s)}`: exact top-{sc['top_k']}"
        + (f" and {sc['samples']} sampled ids" if sc["samples"] else "")
        + f" per token, windows of {sc['max_seq_length']} targets) and the teacher's completions "
        f"above, each split concatenated; records and target tokens read back from the files "
        f"(`{train_data_dir(s) / 'manifest.json'}`).")
    d.table(["split", "source", "records", "target tokens"],
            [[sp, src, c["records"], c["target_tokens"]] for sp, by in td["splits"].items()
             for src, c in by.items()])
    d.p("Natural text: passages drawn in a seeded order from " + "; ".join(
        f"`{src}` ({g['train']['passages']} train passages, {g['train']['tokens']} tokens; "
        f"{g['valid']['passages']} valid, {g['valid']['tokens']} tokens)"
        for src, g in natural.items()) + f" (`{run_dir / 'natural' / 'sources.json'}`), every "
        "source checked disjoint from the held-out files by path and content.")

    # ---- KD evidence
    d.h(2, "KD evidence: arms from the same init vs the control")
    train_tokens = sum(c["target_tokens"] for c in td["splits"]["train"].values())
    seen = {a: _metrics(run_dir / a / "metrics.jsonl") for a in s["arms"]}
    d.table(["arm", "loss", "steps", "loss tokens seen", "epochs of the train split"],
            [[f"`{a}`", json.dumps(s["arms"][a]), len(rows), sum(r["tokens"] for r in rows),
              _f(sum(r["tokens"] for r in rows) / max(train_tokens, 1), ".2f")]
             for a, rows in seen.items()])
    m = ev["models"]

    def ci(x, fmt=_f, scale=1.0):
        return (f"{fmt(scale * x['value'])} [{fmt(scale * x['ci95'][0])}, "
                f"{fmt(scale * x['ci95'][1])}]")

    pts = lambda x: f"{x:.1f}"  # noqa: E731
    rows = []
    for name in ("pruned", *s["arms"], "teacher"):
        r = m[name]
        rows.append([{"pruned": "pruned init (no training)"}.get(name, f"`{name}`"),
                     ci(r["kl"]), ci(r["ce"]), _f(r["ppl"]["value"]),
                     ci(r["top1_agree"], pts, 100), ci(r["next_line"], pts, 100)])
    d.table(["model", "KL to teacher [95 % CI]", "CE [95 % CI]", "perplexity",
             "top-1 agreement, % [95 % CI]",
             f"next-line ranking, % of {ev['items']} (chance {100 / ev['candidates']:.0f} %)"],
            rows)
    d.p("Differences from the control (paired bootstrap over the same sequences / items; "
        "negative KL and CE are better):")
    d.table(["arm", "KL", "CE", "top-1 agreement, points", "next-line ranking, points"],
            [[f"`{a}` - control", ci(x["kl"]), ci(x["ce"]), ci(x["top1_agree"], pts, 100),
              ci(x["next_line"], pts, 100)] for a, x in ev["minus_control"].items()])
    d.p(f"Held-out text: `{ev['heldout']}` ({ev['heldout_from']}): {ev['sequences']} sequences, "
        f"{ev['tokens']} scored tokens, full-vocabulary KL(teacher || model). Next-line ranking: "
        f"{ev['items']} lines of `{ev['next_line_file']}` among {ev['candidates'] - 1} "
        f"distractors from other files, by mean token log-likelihood after the code above "
        f"(its modules may appear in KD prompts, never as training targets). Intervals: "
        f"{ev['resamples']} bootstrap resamples, seed {s['seed']} (`{run_dir / 'eval.json'}`). "
        "Every arm: same init, records, steps, batches and seed.")
    curves = run_dir / "report_files" / "loss_curves.png"
    plot_curves(seen, curves)
    d.image(curves, "training curves of every arm")

    # ---- export, parity, headroom
    d.h(2, "Export and parity")
    d.p(f"The shipped student is the arm with the lowest held-out KL, `{ev['best']}` "
        f"(`{run_dir / ev['best']}`); export, probes, bench and tool calls use it.")
    rows, gates = [], []
    for fmt in fmts:
        pdir = package_dir(run_dir, fmt)
        em = _read(pdir / "export_manifest.json")
        rows.append([fmt, _mb(em["package_bytes"]), f"{em['bytes_per_param']:.3f}",
                     ", ".join(f["name"] for f in em["functions"]),
                     f"{em['timings_s']['total']:.0f} s"])
    d.table(["weights", "package", "bytes / parameter", "functions", "export time"], rows)
    for fmt in fmts:
        pdir = probe_dir(run_dir, fmt)
        ex = _read(pdir / "exit.json")
        if ex["exit"] == 2:
            d.p(f"Probe of the {fmt} package could not run: {ex['error']}")
            gates.append([f"probe parity ({fmt})", "exit 2", "FAIL", str(pdir / "exit.json")])
            continue
        pr = _read(pdir / "probe_report.json")
        e2e = pr["end_to_end"]["coreml_vs_mlx"]
        cm = pr["taps"]["coreml_vs_mlx"]
        worst = max(cm, key=lambda k: float(cm[k]["rel_err"])) if cm else "-"
        d.h(3, f"{fmt} package vs MLX ({pr['backends']['coreml_backend']})")
        d.p(f"{pr['text']['windows']} windows x (prefill {pr['text']['prefill_length']} + "
            f"{pr['text']['decode_steps']} decode steps) at context {pr['text']['context']}: "
            f"top-1 {_pct(e2e['top1'])}, mean KL {_f(e2e['kl_mean'], '.2e')}; worst tap {worst} "
            f"rel err {_f(cm[worst]['rel_err'], '.2e') if cm else '-'} "
            f"(`{pdir / 'probe_report.json'}`); the probe exited {ex['exit']}.")
        for g in pr["gates"]:
            gates.append([f"probe {g['gate']} ({fmt})", f"{_f(g['value'])} {g['op']} "
                          f"{_f(g['threshold'])}", "pass" if g["ok"] else "FAIL",
                          f"{pdir / 'probe_report.json'}"])
        gates.append([f"probe exit ({fmt})", f"exit {ex['exit']}",
                      "pass" if ex["exit"] == 0 else "FAIL", str(pdir / "exit.json")])
        d.image(pdir / "probe_layers.png", f"parity per layer, {fmt}")
        if fmt == fmts[0]:
            head = {**pr["headroom"], **pr.get("fp16_audit", {})}
            order = sorted(head, key=lambda k: float(head[k]["fp16_headroom"]))[:10]
            d.p(f"fp16 headroom (65504 / max abs value in fp32 MLX; `mirror.*`: the export's "
                f"audit taps), the 10 tightest of {len(head)} taps:")
            d.table(["tap", "max abs value", "headroom"],
                    [[k, _f(head[k]["max_abs"]), _f(head[k]["fp16_headroom"], ".3g")] for k in order])

    # ---- bench
    d.h(2, "Bench")
    b = _read(run_dir / "bench" / "bench.json")
    rf = b["roofline"]
    rows = [["MLX load cold / warm", f"{b['load_s']['cold']:.2f} s / {b['load_s']['warm']:.2f} s"]]
    rows += [[f"MLX TTFT, prompt {k}", f"{v * 1e3:.1f} ms"] for k, v in b["ttft_s"].items()]
    rows += [["MLX decode, ours / mlx_lm.generate", f"{b['decode_tps']['ours']:.1f} / "
              f"{b['decode_tps']['mlx_lm']:.1f} tokens/s ({b['ratio_vs_mlx_lm_median']:.2f}x)"],
             ["roofline (measured bandwidth)", f"{rf['bandwidth_gbps_measured']:.1f} GB/s, "
              f"ceiling {rf['ceiling_tps']:.1f} tokens/s, achieved {rf['achieved_pct']:.0f} %"],
             ["constrained decoding overhead", f"{b['constrained']['overhead_pct']:+.1f} % "
              f"({b['constrained']['grammar_ms_per_token']:.3f} ms grammar work per token)"],
             ["peak memory", f"{b['peak_memory_gb'] * 1e3:.0f} MB"]]
    rows += [[f"CoreML {fmt} package: TTFT, decode tokens/s, ANE residency", "needs macOS"]
             for fmt in fmts]
    d.table(["measurement", f"value ({b['platform']}, {b['device']})"], rows)
    d.p(f"From `{run_dir / 'bench' / 'bench.json'}`.")

    # ---- gates
    d.h(2, "Acceptance gates")
    tc = _read(run_dir / "tool_calls.json")
    gates.append(["constrained tool calls are valid JSON matching the schema",
                  f"{tc['valid']}/{tc['n']}", "pass" if tc["valid"] == tc["n"] else "FAIL",
                  str(run_dir / "tool_calls.json")])
    goal = ev["gates"]
    kd, src = goal["best_kd_arm"], str(run_dir / "eval.json")
    x = ev["minus_control"][kd]
    ok = lambda b: "pass" if b else "FAIL"  # noqa: E731
    gates += [
        [f"best KD arm (`{kd}`) beats the control on held-out KL beyond the 95 % interval",
         f"{ci(x['kl'])}", ok(goal["kd_beats_control_kl"]), src],
        [f"best KD arm (`{kd}`) beats the control on held-out CE beyond the 95 % interval",
         f"{ci(x['ce'])}", ok(goal["kd_beats_control_ce"]), src],
        [f"best KD arm (`{kd}`) beats the control by >= {GOAL_POINTS:g} points of top-1 agreement",
         f"{goal['kd_top1_points']:+.2f} points", ok(goal["kd_beats_control_top1"]), src],
        [f"best student (`{goal['best_student']}`) closes >= {100 * GOAL_GAP:.0f} % of the CE gap "
         "from its pruned init to the teacher", f"{100 * goal['gap_closed']:.1f} %",
         ok(goal["gap_closed_ok"]), src]]
    gates += [[f"CoreML {fmt} decode speed on the ANE", "-", "needs macOS", "-"] for fmt in fmts]
    d.table(["gate", "measured", "result", "from"], gates)
    d.gates = gates
    return d


def write(run_dir, settings) -> dict:
    """Write report.md, report.html (and report_files/); returns their paths."""
    run_dir = Path(run_dir)
    doc = build(run_dir, settings)
    md, page = run_dir / "report.md", run_dir / "report.html"
    for path, text in ((md, doc.markdown(run_dir)), (page, doc.html(f"KD pilot {settings['name']}"))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    write_json_atomic(run_dir / "report_files" / "gates.json", doc.gates)
    return {"md": md, "html": page}
