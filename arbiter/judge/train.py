"""Train the pairwise judge on pair rows (arbiter/judge/pairs.py) with the configured loss mix.

    mlx_student.judge_train --config configs/judge_tiny.yaml --data data/judge [--resume]
    mlx_student.judge_train --config configs/judge_smollm2.yaml --kd-teacher models/smollm2-135m-instruct

The config file holds the backbone (`model:`, as for mlx_student.train; with `init_from` the
backbone is cut from that mlx-lm llama folder, mlx_student.finetune) and the run settings under
`judge:` (the keys of CONFIG_DEFAULTS); flags override the file, the file the defaults.

Loss = loss.pairwise x Bradley-Terry with margin (ties as 0.5) + loss.clause x clause BCE over
both candidates + loss.kd x BCE against the teacher's P(a > b) averaged over both orders
(arbiter/judge/kd.py; needs `kd_teacher`, computed once per run and kept in the trainer state).

Writes <out>/ (the judge checkpoint: mlx-lm folder + judge_heads.safetensors + student.judge,
metrics.jsonl) and <out>.trainer/ (all weights, optimizer, state.json, teacher preferences)
every steps_per_save steps and at the end, each folder replaced atomically. A step's batch is a
function of (seed, step) only, so --resume continues exactly where the run stopped.
"""

import mlx_student  # noqa: F401  (first: picks OpenBLAS on Linux before mlx loads)

import argparse
import dataclasses
import json
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from mlx_student import checkpoint, finetune, prune
from mlx_student.config import ConfigError, load_config, load_yaml
from mlx_student.files import atomic_dir, claim_dir, recover
from mlx_student.teacher import default as default_teacher
from mlx_student.train import OPTIMIZERS
from mlx_student.trainer import schedule

from . import model as judge_model
from .eval import score_rows, summary_metrics
from .kd import Teacher
from .pairs import TARGET, PairError, clause_vector, read_split

LOSS_TERMS = ("pairwise", "clause", "kd")
CONFIG_DEFAULTS = {
    "data": "data/judge",
    "out": "runs/judge",
    "init_from": None,  # an mlx-lm llama folder the backbone is cut from (else random init)
    "seed": 0,
    "iters": 200,
    "batch_size": 8,  # pairs per step (2x sequences)
    "max_length": 512,  # tokens of (prompt, candidate)
    "learning_rate": 1e-3,
    "warmup": 10,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "optimizer": "adamw",
    "grad_clip": 1.0,
    "loss": {"pairwise": 0.6, "clause": 0.4, "kd": 0.0},
    "kd_teacher": None,  # an mlx-lm folder: its P(a > b) is the soft target of the kd term
    "steps_per_eval": 50,
    "steps_per_save": 50,
    "resume": False,
}
PAD_MULTIPLE = 32  # batches pad to a multiple of this: few shapes, few recompiles
PREFS_FILE = "teacher_preferences.json"


def loss_flag(text):
    """'pairwise=0.6,clause=0.4' -> {'pairwise': 0.6, 'clause': 0.4}"""
    try:
        weights = {k.strip(): float(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=weight,... got {text!r}") from None
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown loss term {unknown}; known: {list(LOSS_TERMS)}")
    return weights


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.judge_train",
        description="Train a pairwise judge (llama backbone + score and CAWS clause heads) on "
        "pair rows. Flags override the config file's `judge:` settings, which override the "
        "defaults.", epilog=f"defaults: {json.dumps(CONFIG_DEFAULTS)}")
    add = p.add_argument
    add("--config", required=True, help="YAML with `model:` (the backbone) and `judge:` settings")
    add("--data", help="folder with train.jsonl (valid.jsonl optional) of pair rows")
    add("--out", help="the judge checkpoint folder; trainer state goes to <out>.trainer")
    add("--init-from", help="mlx-lm llama folder the backbone is cut from (`model:` gives the cut)")
    add("--resume", action="store_true", default=None, help="continue from <out>.trainer")
    add("--seed", type=int, help="init and data-order seed")
    add("--iters", type=int, help="optimizer steps in total")
    add("--batch-size", type=int, help="pairs per optimizer step")
    add("--max-length", type=int, help="tokens per (prompt, candidate), eos included")
    add("--learning-rate", type=float, help="peak learning rate")
    add("--warmup", type=int, help="linear warmup steps before the cosine decay")
    add("--min-lr-ratio", type=float, help="final learning rate as a fraction of the peak")
    add("--weight-decay", type=float, help="decoupled weight decay")
    add("--optimizer", choices=list(OPTIMIZERS), help="adamw, adafactor or sgd")
    add("--grad-clip", type=float, help="clip the global gradient norm to this")
    add("--loss", type=loss_flag, help="loss mix, e.g. pairwise=0.6,clause=0.4,kd=0.5")
    add("--kd-teacher", help="mlx-lm folder whose pairwise preference is the kd target")
    add("--steps-per-eval", type=int, help="validate every N steps")
    add("--steps-per-save", type=int, help="checkpoint every N steps")
    return p


def parse_args(argv=None):
    """Command line over the config file's `judge:` block over CONFIG_DEFAULTS."""
    args = build_parser().parse_args(argv)
    data, lines = load_yaml(args.config)
    block = data.get("judge") or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{args.config}:{lines.get('judge', 1)}: judge: must be a mapping")
    unknown = [k for k in block if k not in CONFIG_DEFAULTS]
    if unknown:
        raise ConfigError("\n".join(f"{args.config}:{lines.get('judge.' + k)}: judge.{k}: "
                                    "unknown judge setting" for k in unknown))
    for key, value in {**CONFIG_DEFAULTS, **block}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    unknown = sorted(set(args.loss) - set(LOSS_TERMS))
    if unknown or not isinstance(args.loss, dict):
        raise ConfigError(f"{args.config}:{lines.get('judge.loss')}: judge.loss: unknown terms "
                          f"{unknown}; known: {list(LOSS_TERMS)}")
    args.loss = {k: float(args.loss.get(k, 0.0)) for k in LOSS_TERMS}
    if args.loss["kd"] and not args.kd_teacher:
        raise ConfigError(f"{args.config}: judge.loss.kd is {args.loss['kd']} but no kd_teacher "
                          "is set (--kd-teacher PATH)")
    return args


def tokenize_rows(rows, tokenizer, spec) -> list:
    """Per row: (ids_a, ids_b, target P(a > b), margin, clauses_a, clauses_b)."""
    out = []
    for r in rows:
        enc = partial(judge_model.encode, tokenizer, r["prompt"], max_length=spec.max_length,
                      separator=spec.separator)
        margin = 0.0 if r["winner"] == "tie" else float(r.get("margin", 0.0))
        out.append((enc(r["a"]["text"]), enc(r["b"]["text"]), TARGET[r["winner"]], margin,
                    clause_vector(r["a"]), clause_vector(r["b"])))
    return out


def count_cut(rows, tokenizer, spec) -> int:
    """Candidates whose (prompt, candidate) input is longer than `spec.max_length` tokens."""
    return sum(len(judge_model.encode(tokenizer, r["prompt"], r[s]["text"], 10**9, spec.separator))
               > spec.max_length for r in rows for s in "ab")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list:
    """Rows of step `step` (1-based): epochs of a seeded permutation, a function of
    (seed, step) alone (what makes a resume exact)."""
    out = []
    for k in range((step - 1) * batch_size, step * batch_size):
        epoch, i = divmod(k, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[i]))
    return out


def collate(examples, soft):
    """Tensors of a batch: the a rows then the b rows in one (2B, T) id matrix."""
    seqs = [e[0] for e in examples] + [e[1] for e in examples]
    T = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
    ids, lengths = judge_model.batch_ids(seqs, pad_to=T)
    return {"ids": ids, "lengths": lengths,
            "target": mx.array([e[2] for e in examples], dtype=mx.float32),
            "margin": mx.array([e[3] for e in examples], dtype=mx.float32),
            "labels": mx.array([e[4] for e in examples] + [e[5] for e in examples]),
            "soft": mx.array(soft, dtype=mx.float32)}


def make_loss(weights: dict):
    names = [n for n in LOSS_TERMS if weights[n]]

    def loss_fn(judge, batch):
        s, c = judge(batch["ids"], batch["lengths"])
        B = batch["target"].shape[0]
        d = s[:B] - s[B:]
        parts = {"pairwise": judge_model.pair_loss(d, batch["target"], batch["margin"]),
                 "clause": judge_model.clause_loss(c, batch["labels"]),
                 "kd": judge_model.pair_loss(d, batch["soft"], mx.zeros_like(d))}
        return sum(weights[n] * parts[n] for n in names), mx.stack([parts[n] for n in names])

    return loss_fn, names


def teacher_preferences(args, rows, trainer) -> dict:
    """{row id: P(a > b)} from the kd teacher, read back from the trainer state on resume."""
    cached = trainer / PREFS_FILE
    if args.resume and cached.exists():
        prefs = json.loads(cached.read_text())
        if all(r["id"] in prefs for r in rows):
            return prefs
    teacher = Teacher.load(args.kd_teacher, max_length=max(args.max_length * 2, 512))
    tic = time.perf_counter()
    both, _, _ = teacher.preferences(rows)
    print(f"kd teacher {args.kd_teacher}: P(a > b) of {len(rows)} pairs in both orders in "
          f"{time.perf_counter() - tic:.1f} s", flush=True)
    return {r["id"]: float(p) for r, p in zip(rows, both)}


def save_state(out, judge, optimizer, step, config, settings, prefs):
    with atomic_dir(checkpoint.trainer_dir(out)) as tmp:
        mx.save_safetensors(str(tmp / "weights.safetensors"), dict(tree_flatten(judge.parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        state = {"step": step, "config": dataclasses.asdict(config), "settings": settings}
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        if prefs is not None:
            (tmp / PREFS_FILE).write_text(json.dumps(prefs) + "\n")


def load_state(out, judge, optimizer, config) -> int:
    path = checkpoint.trainer_dir(out)
    recover(path)
    recover(out)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path}: no trainer state to resume from")
    state = json.loads((path / "state.json").read_text())
    if state["config"] != dataclasses.asdict(config):
        raise ConfigError(f"{path}: the checkpoint was trained with another model config")
    judge.load_weights(list(mx.load(str(path / "weights.safetensors")).items()))
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    mx.eval(judge.parameters(), optimizer.state)
    return state["step"]


def run(args) -> list:
    base = prune.base_config(args.init_from) if args.init_from else None
    config = load_config(args.config, base)
    if config.tokenizer is None:
        raise ConfigError(f"{args.config}: model.tokenizer: a tokenizer folder is needed to train")
    if Path(config.tokenizer) == default_teacher.DEFAULT_TEACHER_DIR:
        default_teacher.prepare()
    tokenizer = load_tokenizer(Path(config.tokenizer))
    spec = judge_model.JudgeSpec(max_length=args.max_length)
    train_rows = read_split(args.data, "train")
    valid_rows = read_split(args.data, "valid", required=False)
    examples = tokenize_rows(train_rows, tokenizer, spec)

    mx.random.seed(args.seed)
    backbone = finetune.build_student(config, SimpleNamespace(
        init_from=args.init_from, fine_tune_type="full", seed=args.seed, quantize_base=None))
    judge = judge_model.build(config, backbone, spec, seed=args.seed)
    sched = schedule(args.learning_rate, args.iters, args.warmup, args.min_lr_ratio)
    optimizer = OPTIMIZERS[args.optimizer](sched, args.weight_decay)
    out = Path(args.out)
    trainer = checkpoint.trainer_dir(out)
    start = load_state(out, judge, optimizer, config) if args.resume else 0
    prefs = teacher_preferences(args, train_rows, trainer) if args.loss["kd"] else None
    soft = [prefs[r["id"]] if prefs else TARGET[r["winner"]] for r in train_rows]

    claim_dir(out)
    metrics = out / "metrics.jsonl"
    kept = metrics.read_text().splitlines() if start and metrics.exists() else []
    metrics.write_text("".join(x + "\n" for x in kept if json.loads(x)["step"] <= start))
    n_params = sum(v.size for _, v in tree_flatten(judge.parameters()))
    print(f"judge: {n_params:,} parameters; {len(examples)} train pairs from {args.data}"
          + (f"; resuming at step {start}" if start else ""), flush=True)
    cut = count_cut(train_rows, tokenizer, spec)
    if cut:
        print(f"{cut} of {2 * len(train_rows)} train candidates are longer than --max-length "
              f"{spec.max_length} and are cut (the prompt loses its start, the candidate its end)",
              flush=True)

    loss_fn, names = make_loss(args.loss)
    value_and_grad = nn.value_and_grad(judge, loss_fn)
    state = [judge.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step_fn(batch):
        (_, parts), grad = value_and_grad(judge, batch)
        grad, norm = optim.clip_grad_norm(grad, args.grad_clip)
        optimizer.update(judge, grad)
        return parts, norm

    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    history, tic = [], time.perf_counter()
    bar = tqdm(total=args.iters, initial=start, desc="judge_train", unit="step")
    for it in range(start + 1, args.iters + 1):
        idx = batch_indices(len(examples), args.batch_size, args.seed, it)
        batch = collate([examples[i] for i in idx], [soft[i] for i in idx])
        parts, norm = step_fn(batch)
        mx.eval(state, parts, norm)
        parts = dict(zip(names, parts.tolist()))
        record = {"step": it, "loss": sum(args.loss[n] * parts[n] for n in names), **parts,
                  "grad_norm": norm.item(), "lr": optimizer.learning_rate.item(),
                  "pairs_per_s": (it - start) * args.batch_size / (time.perf_counter() - tic)}
        if valid_rows and (it % args.steps_per_eval == 0 or it == args.iters):
            record["valid"] = summary_metrics(score_rows(judge, tokenizer, valid_rows), valid_rows)
            bar.write(f"step {it}: valid " + ", ".join(f"{k} {v:.4g}" for k, v in record["valid"].items()))
        history.append(record)
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if it % args.steps_per_save == 0 or it == args.iters:
            save_state(out, judge, optimizer, it, config, settings, prefs)
            judge_model.save(out, judge, config, tokenizer, keep=("metrics.jsonl",))
    bar.close()
    print(f"saved {out} (judge checkpoint); resume state {trainer}")
    return history


def main(argv=None):
    try:
        run(parse_args(argv))
    except (ConfigError, PairError, judge_model.JudgeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
