"""Study of KD target formats: bytes per token vs held-out KL to the teacher (issue 15, item 2).

    python scripts/study_targets.py [--steps 24] [--layers 6] [--intermediate 768] [--out runs/study_targets]

One student cut from the teacher (mlx_student.finetune: `init_from` the teacher with
--layers evenly spaced blocks and the first --intermediate MLP neurons), trained from that
same init for the same steps, windows and seed with each target format, all scored by
teacher forcing (mlx_student.teacher.local.score) over the same stdlib-corpus windows:

  topk8 / topk32 / topk64     exact top-k of the teacher, tail as one bucket (topk_kd)
  sampled16 / sampled64       N draws from the teacher's full distribution, ids + counts (sampled_kd)
  dense                       the teacher in process, full-vocabulary forward KL (nothing stored)

Held-out windows (valid.jsonl) no arm trained on measure full-vocabulary KL(teacher || student),
CE and teacher top-1 agreement, before training and after each arm. Bytes per token are the
JSON bytes of each format's target field per target token, as mlx_student.score writes them.
Writes <out>/study.json and study.md.
"""

import argparse
import json
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import mlx_student  # noqa: F401  (first: OpenBLAS before mlx on Linux)
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import yaml

from mlx_student import finetune, prune
from mlx_student.config import load_config
from mlx_student.data import load_jsonl
from mlx_student.files import write_json_atomic
from mlx_student.losses import cross_entropy, forward_kl
from mlx_student.teacher import default as default_teacher
from mlx_student.teacher.local import LocalTeacher, LocalTeacherArgs
from mlx_student.teacher.score import windows_of
from mlx_student.trainer import TrainingArgs, schedule, train

ARMS = ("topk8", "topk32", "topk64", "sampled16", "sampled64", "dense")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=str(default_teacher.DEFAULT_TEACHER_DIR))
    p.add_argument("--data", default="data/stdlib", help="text folder: train.jsonl, valid.jsonl")
    p.add_argument("--out", default="runs/study_targets")
    p.add_argument("--layers", type=int, default=6, help="blocks the student keeps")
    p.add_argument("--intermediate", type=int, default=768, help="MLP width the student keeps")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--held-out-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    return p.parse_args()


def held_out_metrics(student, teacher, windows, batch):
    """Token means over held-out windows: full-vocabulary KL(teacher || student), CE, top-1 agreement."""
    sums = {"kl": 0.0, "ce": 0.0, "top1_agree": 0.0}
    n = 0
    for i in range(0, len(windows), batch):
        rows = windows[i : i + batch]
        width = max(len(w) for w in rows) - 1
        inputs = np.zeros((len(rows), width), np.int32)
        targets = np.zeros_like(inputs)
        mask = np.zeros(inputs.shape, np.float32)
        for r, w in enumerate(rows):
            inputs[r, : len(w) - 1], targets[r, : len(w) - 1], mask[r, : len(w) - 1] = w[:-1], w[1:], 1
        x, m = mx.array(inputs), mx.array(mask)
        s_logits, t_logits = student(x), teacher(x)
        k = mask.sum()
        sums["kl"] += forward_kl(s_logits, t_logits, m).item() * k
        sums["ce"] += cross_entropy(s_logits, mx.array(targets), m).item() * k
        agree = (mx.argmax(s_logits, axis=-1) == mx.argmax(t_logits, axis=-1)) * m
        sums["top1_agree"] += agree.sum().item()
        n += k
    return {key: float(v / n) for key, v in sums.items()}


def main():
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(a.teacher) == default_teacher.DEFAULT_TEACHER_DIR:
        default_teacher.prepare()
    scorer = LocalTeacher(LocalTeacherArgs(a.teacher, batch_size=a.batch))
    tokenizer, teacher = scorer.tokenizer, scorer.model
    vocab = teacher.args.vocab_size
    data = Path(a.data)
    train_windows = windows_of(data / "train.jsonl", tokenizer, vocab, a.seq, a.steps * a.batch * a.seq, a.seed)
    held = windows_of(data / "valid.jsonl", tokenizer, vocab, a.seq, a.held_out_tokens, a.seed)
    tic = time.perf_counter()
    top64, s64 = {}, {}
    for i, t, s in scorer.score(train_windows, top_k=64, samples=64, seed=a.seed):
        top64[i], s64[i] = t, s
    s16 = {i: s for i, _, s in scorer.score(train_windows, samples=16, seed=a.seed + 1)}
    score_s = time.perf_counter() - tic
    fields = {"topk8": ("topk", {i: [r[:8] for r in t] for i, t in top64.items()}),
              "topk32": ("topk", {i: [r[:32] for r in t] for i, t in top64.items()}),
              "topk64": ("topk", top64), "sampled16": ("sampled", s16), "sampled64": ("sampled", s64),
              "dense": ("sampled", s16)}  # dense: the records only carry the windows
    tokens = sum(len(w) - 1 for w in train_windows)

    cfg_path = out / "student.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"role": "pilot", "num_hidden_layers": a.layers,
                                                  "intermediate_size": a.intermediate}}))
    config = load_config(cfg_path, prune.base_config(a.teacher))
    build = Namespace(init_from=a.teacher, fine_tune_type="full", seed=a.seed)
    results = {"settings": vars(a), "train_tokens": tokens, "score_s": score_s,
               "init": held_out_metrics(finetune.build_student(config, build), teacher, held, a.batch),
               "teacher_ce": held_out_metrics(teacher, teacher, held, a.batch)["ce"], "arms": {}}
    print(f"init: {results['init']}  teacher CE {results['teacher_ce']:.3f}")
    for arm in a.arms:
        kind, rows = fields[arm]
        records = [{"text": "", "ids": w, kind: rows[i]} for i, w in enumerate(train_windows)]
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "train.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            examples = load_jsonl(path, tokenizer, vocab, a.seq).examples
        loss = {"dense": {"forward_kl": 1.0}, "topk": {"topk_kd": 1.0}, "sampled": {"sampled_kd": 1.0}}
        loss = loss["dense" if arm == "dense" else kind]
        student = finetune.build_student(config, build)
        mx.random.seed(a.seed)
        args = TrainingArgs(batch_size=a.batch, iters=a.steps, max_seq_length=a.seq, loss=loss,
                            seed=a.seed, steps_per_eval=10**9)
        opt = optim.AdamW(learning_rate=schedule(a.lr, a.steps, max(a.steps // 10, 1), 0.1),
                          weight_decay=0.0)
        tic = time.perf_counter()
        train(student, opt, examples, None, args, teacher=teacher if arm == "dense" else None)
        train_s = time.perf_counter() - tic
        metrics = held_out_metrics(student, teacher, held, a.batch)
        stored = 0 if arm == "dense" else sum(len(json.dumps(rows[i])) for i in rows)
        entries = 0 if arm == "dense" else sum(len(p) for r in rows.values() for p in r) / tokens
        results["arms"][arm] = {**metrics, "bytes_per_token": stored / tokens,
                                "entries_per_token": entries, "train_s": train_s}
        print(arm, results["arms"][arm], flush=True)
    write_json_atomic(out / "study.json", results)
    lines = [f"# KD target formats: {a.layers}-layer / {a.intermediate}-MLP cut of {a.teacher}, "
             f"{a.steps} steps x {a.batch} x {a.seq} tokens", "",
             f"Held-out: {sum(len(w) - 1 for w in held)} tokens of {data}/valid.jsonl; teacher CE "
             f"{results['teacher_ce']:.3f}; the cut before training: KL {results['init']['kl']:.3f}, "
             f"CE {results['init']['ce']:.3f}, top-1 {results['init']['top1_agree']:.1%}", "",
             "| targets | JSON bytes/token | entries/token | held-out KL | CE | top-1 agree | train s |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in results["arms"].items():
        lines.append(f"| {arm} | {r['bytes_per_token']:.0f} | {r['entries_per_token']:.1f} | {r['kl']:.4f} | "
                     f"{r['ce']:.4f} | {r['top1_agree']:.1%} | {r['train_s']:.0f} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
