"""Train a student from scratch on a data folder with a configured mix of losses.

    mlx_student.train --config configs/pilot.yaml [--iters 100] [--data data/stdlib] ...

The config file holds the model (`model:`) and the run settings below (CONFIG_DEFAULTS);
command-line flags override the file, the file overrides the defaults, as in mlx_lm.lora.
The result is an mlx-lm model folder at --out; the loss log is written beside it
(<out>.log.jsonl), never inside it.
"""

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from . import default_teacher
from . import model as student_model
from .config import ConfigError, load_config, load_yaml
from .data import DataError, iterate_batches, load_dataset
from .losses import loss_mix

CONFIG_DEFAULTS = {
    "data": "data/stdlib",
    "out": "runs/student",
    "seed": 0,
    "iters": 200,
    "batch_size": 8,
    "max_seq_length": 256,
    "learning_rate": 1e-3,
    "warmup": 20,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "steps_per_report": 10,
    "steps_per_eval": 100,
    "val_batches": 16,
    "skip_bad_lines": False,
    "loss": {"ce": 1.0},
    "temperature": 1.0,
    "jsd_beta": 0.5,
    "topk_tail": "bucket",
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Train an MLX student (mlx-lm llama) with CE and KD losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML with `model:` and run settings")
    p.add_argument("--data", help="folder with train.jsonl (valid.jsonl, test.jsonl optional)")
    p.add_argument("--out", help="output mlx-lm model folder")
    p.add_argument("--seed", type=int, help="init, data order and sampling seed")
    p.add_argument("--iters", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per step")
    p.add_argument("--max-seq-length", type=int, help="tokens per sequence")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, help="linear warmup steps before the cosine decay")
    p.add_argument("--steps-per-eval", type=int, help="validate every N steps")
    p.add_argument("--val-batches", type=int, help="validation batches, -1 for all")
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        default=None,
        help="skip malformed data lines (reported) instead of failing",
    )
    return p


def schedule(args):
    warmup = min(args.warmup, args.iters)
    decay = optim.cosine_decay(
        args.learning_rate, max(args.iters - warmup, 1), args.learning_rate * args.min_lr_ratio
    )
    if not warmup:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, args.learning_rate, warmup), decay], [warmup])


def evaluate(model, examples, args, loss_fn):
    """Token-weighted mean of each loss part over the validation batches."""
    totals, ntoks = {}, 0.0
    batches = iterate_batches(examples, args.batch_size, args.max_seq_length, seed=args.seed)
    for i, batch in enumerate(batches):
        if i == args.val_batches:
            break
        _, parts = loss_fn(model, batch)
        n = batch["mask"].sum().item()
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v.item() * n
        ntoks += n
    out = {k: v / max(ntoks, 1) for k, v in totals.items()}
    if "ce" in out:
        out["ppl"] = math.exp(min(out["ce"], 50))
    return out


def train(model, optimizer, train_set, valid_set, args, log=print):
    """The loop: one compiled step (state in, state out), periodic eval, final save by caller."""

    def loss_fn(model, batch):
        logits = model(batch["inputs"])
        return loss_mix(
            logits, batch, args.loss, args.temperature, args.jsd_beta, args.topk_tail
        )

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch):
        (total, parts), grads = value_and_grad(model, batch)
        grads, grad_norm = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(model, grads)
        return total, parts, grad_norm

    batches = iterate_batches(
        train_set, args.batch_size, args.max_seq_length, seed=args.seed, loop=True
    )
    history = []
    tokens, tic = 0, time.perf_counter()
    bar = tqdm(range(1, args.iters + 1), desc="train", unit="step", dynamic_ncols=True)
    for it in bar:
        batch = next(batches)
        total, parts, grad_norm = step(batch)
        mx.eval(state, total, parts, grad_norm)
        tokens += int(batch["mask"].sum().item())
        record = {
            "step": it,
            "loss": total.item(),
            **{k: v.item() for k, v in parts.items()},
            "grad_norm": grad_norm.item(),
            "lr": optimizer.learning_rate.item(),
        }
        if it % args.steps_per_report == 0 or it == args.iters:
            elapsed = time.perf_counter() - tic
            record["tokens_per_s"] = tokens / elapsed
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        if valid_set and (it % args.steps_per_eval == 0 or it == args.iters):
            record["valid"] = evaluate(model, valid_set, args, loss_fn)
            bar.write(f"step {it}: valid " + ", ".join(f"{k} {v:.3f}" for k, v in record["valid"].items()))
        history.append(record)
        log(record)
    return history


def run(args):
    config = load_config(args.config)
    if config.tokenizer is None:
        raise ConfigError(f"{args.config}: model.tokenizer: a tokenizer folder is needed to train")
    if Path(config.tokenizer) == default_teacher.DEFAULT_TEACHER_DIR:
        default_teacher.prepare()
    tokenizer = load_tokenizer(Path(config.tokenizer))
    splits = load_dataset(
        args.data, tokenizer, config.vocab_size, args.max_seq_length, args.skip_bad_lines
    )
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    model = student_model.build(config, seed=args.seed)
    print(
        f"{config.role} student: {student_model.num_parameters(model):,} parameters; "
        f"{len(splits['train'].examples)} train sequences from {args.data}"
    )
    optimizer = optim.AdamW(learning_rate=schedule(args), weight_decay=args.weight_decay)
    out = Path(args.out)
    log_path = out.with_name(out.name + ".log.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:

        def log(record):
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        valid = splits["valid"].examples if "valid" in splits else None
        history = train(model, optimizer, splits["train"].examples, valid, args, log)
    student_model.save(out, model, config, tokenizer)
    print(f"saved {out} (mlx-lm folder); log {log_path}")
    return history


def parse_args(argv=None):
    """Command line over the config file's run settings over CONFIG_DEFAULTS."""
    args = build_parser().parse_args(argv)
    data, lines = load_yaml(args.config)
    settings = {k: v for k, v in data.items() if k != "model"}
    unknown = [k for k in settings if k not in CONFIG_DEFAULTS]
    if unknown:
        raise ConfigError(
            "\n".join(f"{args.config}:{lines[k]}: {k}: unknown run setting" for k in unknown)
        )
    for key, value in {**CONFIG_DEFAULTS, **settings}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    try:
        run(parse_args(argv))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
