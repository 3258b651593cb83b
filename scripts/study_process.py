"""Acceptance study of process supervision (issue 11): the same student trained on the same tool
traces, steps and seed, with and without per-span loss weights, then evaluated on held-out items.

    python scripts/study_process.py --config configs/tiny.yaml --data data/tools --iters 40
    python scripts/study_process.py --config configs/pilot.yaml --iters 200 --eval-items 91   # a Mac

Arm `plain`: CE over every assistant turn of the traces, all tokens weighted 1. Arm `process`: the
same with `process_weights` on the tool-name, argument and integration spans. Both train with
mlx_student.train (runs <out>/plain and <out>/process) and are evaluated by runtime.tooleval on
the first --eval-items records of <data>/test.jsonl, unconstrained and constrained (with
--tool-choice required, the default here, the first reply is forced to be a call, as
mlx_student.serve does, so a weak student's constrained JSON is measured at all; irrelevance
then counts only unconstrained). Each arm's validation CE is also split by span type (tokens of
tool names, arguments, integration and the rest of the assistant turns): process supervision
should lower the CE on the weighted spans before it shows in behaviour. Writes
<out>/study/study.json and study.md (the table), plus each arm's tooleval report in
<out>/<arm>/tooleval/. The gates of the worker: JSON validity (unconstrained) >= 98%, tool
selection >= 90%.
"""

import argparse
import json
import time
from pathlib import Path

import mlx_student  # noqa: F401  (first: OpenBLAS before mlx on Linux)
import mlx.core as mx
import numpy as np
from mlx_student import train
from mlx_student.data import load_jsonl
from mlx_student.files import atomic_dir
from mlx_student.losses import cross_entropy
from mlx_student.records import SPAN_TYPES
from runtime import tooleval
from runtime.generate import MLXEngine

GATES = {("unconstrained", "json_valid"): 0.98, ("unconstrained", "tool_select"): 0.90}
ROWS = ["json_valid", "schema_valid", "tool_select", "first_call_select", "arg_match",
        "integration_f1", "irrelevance", "call_attempts"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--config", default="configs/tiny.yaml", help="student model config (its `model:`)")
    add("--data", default="data/tools", help="mlx_student.toolgen folder (train/valid/test.jsonl)")
    add("--out", default="runs/study_process", help="folder for both runs and the study report")
    add("--iters", type=int, default=40, help="optimizer steps of each arm")
    add("--batch-size", type=int, default=4)
    add("--max-seq-length", type=int, default=768)
    add("--learning-rate", type=float, default=3e-3)
    add("--seed", type=int, default=0)
    add("--weights", default="tool_name=3,arguments=3,integration=2",
        help="process_weights of the `process` arm")
    add("--eval-items", type=int, default=30, help="held-out records evaluated (first N of test.jsonl)")
    add("--max-tokens", type=int, default=64, help="tokens per reply in the evaluation")
    add("--tool-choice", choices=["auto", "required"], default="required",
        help="constrained mode: may the first reply be text (auto) or must it be a call")
    add("--span-items", type=int, default=32, help="validation records for the per-span CE")
    return p


# Span types loaded as distinct weights, so each token's weight names its type (1: the rest).
CODES = {kind: float(i + 2) for i, kind in enumerate(SPAN_TYPES)}


def span_ce(engine, data, max_seq_length, n):
    """Mean CE of the first `n` validation records' assistant tokens, by span type."""
    split = load_jsonl(Path(data) / "valid.jsonl", engine.tokenizer, engine.model.args.vocab_size,
                       max_seq_length, weights=CODES)
    sums, counts = {}, {}
    for ex in split.examples[:n]:
        tokens = mx.array(ex.tokens[None])
        logits = engine.model(tokens[:, :-1])
        codes = ex.weights[1:]
        for kind, code in [("other", 1.0), *CODES.items()]:
            mask = codes == code
            if mask.any():
                ce = cross_entropy(logits, tokens[:, 1:], mx.array(mask[None].astype(np.float32)))
                sums[kind] = sums.get(kind, 0.0) + ce.item() * mask.sum()
                counts[kind] = counts.get(kind, 0) + int(mask.sum())
    return {k: float(sums[k] / counts[k]) for k in sums}


def train_arm(args, arm):
    out = Path(args.out) / arm
    argv = ["--config", args.config, "--data", args.data, "--out", str(out), "--seed", str(args.seed),
            "--iters", str(args.iters), "--batch-size", str(args.batch_size),
            "--max-seq-length", str(args.max_seq_length), "--learning-rate", str(args.learning_rate),
            "--warmup", str(max(args.iters // 10, 1)), "--steps-per-eval", str(args.iters),
            "--steps-per-save", str(args.iters), "--loss", "ce=1"]
    if arm == "process":
        argv += ["--process-weights", args.weights]
    tic = time.perf_counter()
    history = train.run(train.parse_args(argv))
    last = history[-1]
    return out, {"train_s": time.perf_counter() - tic, "final_loss": last["loss"],
                 "valid_ce": last.get("valid", {}).get("ce")}


def markdown(study):
    arms = list(study["arms"])
    cols = [(a, m) for a in arms for m in ("unconstrained", "constrained")]
    lines = [
        "# Process supervision study", "",
        f"Student `{study['config']}`, data `{study['data']}`, {study['iters']} steps x "
        f"{study['batch_size']} sequences of <= {study['max_seq_length']} tokens, seed {study['seed']}; "
        f"process weights {study['weights']}. Held-out: {study['eval_items']} records of test.jsonl, "
        f"greedy, max_tokens {study['max_tokens']}, constrained tool_choice {study['tool_choice']}.", "",
        "| metric | " + " | ".join(f"{a} {m}" for a, m in cols) + " |",
        "|---|" + "---|" * len(cols)]
    for key in ROWS:
        vals = [study["arms"][a]["metrics"][m][key] for a, m in cols]
        lines.append(f"| {key} | " + " | ".join(
            "n/a" if v is None else (f"{v:.1%}" if isinstance(v, float) else str(v)) for v in vals) + " |")
    lines += ["", "| arm | final train loss | valid CE (unweighted) | train s | eval s |", "|---|---|---|---|---|"]
    for a in arms:
        r = study["arms"][a]
        ce = "n/a" if r["valid_ce"] is None else f"{r['valid_ce']:.3f}"
        lines.append(f"| {a} | {r['final_loss']:.3f} | {ce} | {r['train_s']:.0f} | {r['eval_s']:.0f} |")
    kinds = ["other", *CODES]
    lines += ["", "Validation CE by span type (unweighted, assistant tokens):", "",
              "| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for a in arms:
        ce = study["arms"][a]["span_ce"]
        lines.append(f"| {a} | " + " | ".join(f"{ce[k]:.3f}" if k in ce else "n/a" for k in kinds) + " |")
    lines += ["", "Gates (unconstrained JSON validity >= 98%, tool selection >= 90%): " + "; ".join(
        f"{a} {'pass' if study['arms'][a]['gates'] else 'FAIL'}" for a in arms)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    records = tooleval.load_records(Path(args.data) / "test.jsonl", args.eval_items)
    study = {k: getattr(args, k) for k in ("config", "data", "iters", "batch_size", "max_seq_length",
                                           "learning_rate", "seed", "weights", "eval_items", "max_tokens",
                                           "tool_choice")}
    study["arms"] = {}
    for arm in ("plain", "process"):
        out, result = train_arm(args, arm)
        tic = time.perf_counter()
        engine = MLXEngine.load(out)
        result["span_ce"] = span_ce(engine, args.data, args.max_seq_length, args.span_items)
        runner = tooleval.EngineRunner(engine, args.max_tokens)
        metrics, episodes = tooleval.evaluate(runner, records, tool_choice=args.tool_choice)
        report = {"runner": f"mlx {out}", "data": str(Path(args.data) / "test.jsonl"), "items": len(records),
                  "controls": sum(r["meta"]["control"] for r in records), "tool_choice": args.tool_choice,
                  "max_tokens": args.max_tokens, "extra_calls": 1, "metrics": metrics}
        tooleval.write_report(report, episodes, out / "tooleval")
        result.update(eval_s=time.perf_counter() - tic, metrics=metrics)
        result["gates"] = all((metrics[m][k] or 0) >= v for (m, k), v in GATES.items())
        study["arms"][arm] = result
    with atomic_dir(Path(args.out) / "study") as tmp:
        (tmp / "study.json").write_text(json.dumps(study, indent=2) + "\n")
        (tmp / "study.md").write_text(markdown(study))
    print(markdown(study))


if __name__ == "__main__":
    main()
