"""Memory planner: the peak memory of a training step, from the config alone.

    mlx_student.plan --config configs/worker_9b.yaml [--batch-size 1 --max-seq-length 2048]
    mlx_student.plan --config configs/tiny.yaml --measure      # planned vs mx.get_peak_memory

For a config, batch, sequence length, fine-tune type (full / lora / dora / qlora4 / qlora8),
optimizer (adamw / adafactor / sgd), weight and compute precision and gradient checkpointing it
adds up, in bytes: weights (fp32 masters for full training; the frozen base in its own dtype or
mlx's affine quantization, scales and biases included, under LoRA), gradients and optimizer
state (trainable parameters only), activations kept for the backward pass, the vocabulary-sized
tensors of the loss, and the KD targets. It lists which settings fit on 16 / 32 / 64 / 128 GB
Macs and, per machine, the cheapest setting (lowest peak) of the most capable fine-tune type
(full > dora > lora > qlora8 > qlora4), then optimizer (adamw > adafactor > sgd), that fits.
Nothing is allocated: a 9B plan is instant.

The activation counts follow the graph of mlx_lm's llama under nn.value_and_grad, with the
numbers of live tensors checked against mx.get_peak_memory on the CPU backend (MLX 0.32,
`--measure`; tests/test_plan.py holds it to +-15% over ten settings):

  per layer and token   5 hidden-sized (residual in, 2 norm outputs, attention out, MLP out),
                        2 query-, 3 KV-sized (q, k, v, rotated q and k), 6 intermediate-sized
                        (gate, up, silu(gate), product, and 2 in its backward) and 2 attention
                        score rows of `seq` per head (scores, probabilities)
  vocabulary            3 fp32 tensors per token (logits, softmax, logit gradient); the
                        compute dtype's logits beside them when it is not fp32
  per token             PER_TOKEN_BYTES more with the CE loss than with top-k KD: what
                        remains after the above on the CPU backend (measured; independent
                        of width and vocabulary)
  end of backward       weights, moments, gradients and the embedding table's gradient
                        being summed (EMBEDDING_GRAD_*), activations already freed
  optimizer step        the weights plus UPDATE_BYTES per trainable parameter; the step's
                        peak is the largest of the three
  accumulation          the trainer evaluates the running gradient after each micro-batch:
                        one micro-batch's activations are live at a time, beside the running
                        sum of the gradients

With gradient checkpointing each layer keeps its input only and one layer's activations are
recomputed at a time. Metal's allocator may differ from the CPU backend's; the Mac rows
assume only USABLE_FRACTION of unified memory can be wired for MLX.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace

from .config import ConfigError, StudentConfig, apply_config, load_config
from .info import GB, human_count, matrices, parameters, vectors

FINE_TUNES = ("full", "dora", "lora", "qlora8", "qlora4")  # most capable first
OPTIMIZERS = ("adamw", "adafactor", "sgd")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MACHINES_GB = (16, 32, 64, 128)
USABLE_FRACTION = 0.75  # of unified memory MLX may wire (Metal's recommended working set)
VOCAB_FP32_TENSORS = 3
# Bytes a trainable parameter holds at the optimizer step, beside its weight: gradient,
# clipped gradient, new weight (12), and AdamW's old and new moments (up to 16) or Adafactor's
# grad**2 (4). The compiled update cannot write in place while the model and optimizer still
# hold the old arrays. Measured, weight included, on full fine-tunes of 6.6 M and 27.8 M
# parameters: AdamW 27.4-30.4 (we take 4 + 26), Adafactor 18.6, SGD 16.3 bytes a parameter.
UPDATE_BYTES = {"adamw": 26, "adafactor": 16, "sgd": 12}
# The end of the backward pass: activations are freed, but the embedding table's gradient is
# built from the lookup's scatter-add into a zero table and, when tied, the LM head's matmul
# gradient and their sum: extra bytes per embedding parameter (full fine-tuning only).
EMBEDDING_GRAD_TIED = 16
EMBEDDING_GRAD_UNTIED = 4
# the flags the config's run settings fill when given (the planner's own defaults otherwise)
PLAN_DEFAULTS = {"batch_size": 1, "max_seq_length": 2048, "grad_accumulation_steps": 1}
PER_TOKEN_BYTES = 11_000  # measured CE residual per token (MLX 0.32 CPU), see the docstring


@dataclass
class Setting:
    batch_size: int = 1  # sequences per micro-batch on one machine
    max_seq_length: int = 2048
    fine_tune: str = "full"
    optimizer: str = "adamw"
    weight_dtype: str = "float32"  # the frozen base's dtype under LoRA (full: fp32 masters)
    compute_dtype: str = "float32"
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    rank: int = 8
    lora_layers: int = -1  # the last N blocks get adapters, -1 all
    group_size: int = 64  # QLoRA base quantization group
    topk: int = 0  # teacher top-k per token in the batch (0: CE only)


def _adapted(c: StudentConfig, s: Setting) -> int:
    """Adapter parameters under LoRA / DoRA: rank x (in + out) per adapted linear, DoRA adding
    a magnitude per output."""
    L = c.num_hidden_layers if s.lora_layers == -1 else s.lora_layers
    adapters = 0
    for name, (rows, cols, _) in matrices(c).items():
        if name in ADAPTED:
            adapters += L * (s.rank * (rows + cols) + (rows if s.fine_tune == "dora" else 0))
    return adapters


def weights_bytes(c: StudentConfig, s: Setting) -> dict:
    """Bytes of the weights, of the trainable parameters and of a compute-dtype copy."""
    p = parameters(c)["total"]
    if s.fine_tune == "full":
        return {"weights": 4 * p, "trainable": p, "cast_copy": 0 if s.compute_dtype == "float32" else 2 * p}
    wb = DTYPE_BYTES[s.weight_dtype]
    if s.fine_tune.startswith("qlora"):
        bits = int(s.fine_tune[5:])
        base = sum(n * size * wb for size, n in vectors(c).values())
        for rows, cols, n in matrices(c).values():  # every linear and the embedding
            base += n * (rows * cols * bits // 8 + 2 * rows * (cols // s.group_size) * wb)
        floats = sum(n * size for size, n in vectors(c).values())
    else:
        base, floats = p * wb, p
    adapters = _adapted(c, s)
    cast = 0 if DTYPE_BYTES[s.compute_dtype] >= wb else floats * DTYPE_BYTES[s.compute_dtype]
    return {"weights": base + 4 * adapters, "trainable": adapters, "cast_copy": cast}


def optimizer_bytes(c: StudentConfig, s: Setting, trainable: int) -> int:
    if s.optimizer == "adamw":
        return 8 * trainable  # two fp32 moments
    if s.optimizer == "sgd":
        return 0
    if s.fine_tune != "full":  # factored moments of (in, rank) and (rank, out): in + out each
        return 4 * trainable // s.rank
    total = sum(4 * n * size for size, n in vectors(c).values())
    return total + sum(4 * n * (rows + cols) for rows, cols, n in matrices(c).values())


def layer_activation_bytes(c: StudentConfig, s: Setting) -> int:
    """Bytes one layer keeps for backward per token."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    floats = 5 * c.hidden_size + 2 * q + 3 * kv + 6 * c.intermediate_size
    floats += 2 * c.num_attention_heads * s.max_seq_length
    return floats * DTYPE_BYTES[s.compute_dtype]


def plan(c: StudentConfig, s: Setting) -> dict:
    """Bytes of each part of the backward pass's peak, the end of backward's and the optimizer
    step's peaks (activations freed); the step's peak is the largest of the three."""
    if s.fine_tune not in FINE_TUNES:
        raise ValueError(f"fine_tune: {s.fine_tune!r} is not one of {FINE_TUNES}")
    if s.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {s.optimizer!r} is not one of {OPTIMIZERS}")
    w = weights_bytes(c, s)
    tokens = s.batch_size * s.max_seq_length  # one micro-batch live at a time
    grads = 4 * w["trainable"]
    layer = layer_activation_bytes(c, s) * tokens
    if s.grad_checkpoint:
        acts = c.num_hidden_layers * tokens * c.hidden_size * DTYPE_BYTES[s.compute_dtype] + layer
    else:
        acts = c.num_hidden_layers * layer
    vocab = tokens * c.vocab_size * (4 * VOCAB_FP32_TENSORS + (DTYPE_BYTES[s.compute_dtype] % 4))
    kd = tokens * s.topk * 8  # int32 ids + fp32 logprobs
    parts = {
        "weights": w["weights"] + w["cast_copy"],
        "gradients": grads,
        "optimizer": optimizer_bytes(c, s, w["trainable"]),
        "activations": acts + (0 if s.topk else tokens * PER_TOKEN_BYTES),
        "logits": vocab,
        "kd_targets": kd,
    }
    update = w["weights"] + w["trainable"] * UPDATE_BYTES[s.optimizer]
    backward = sum(parts.values())
    table = c.vocab_size * c.hidden_size if s.fine_tune == "full" else 0
    grads_done = (w["weights"] + grads + parts["optimizer"]
                  + table * (EMBEDDING_GRAD_TIED if c.tie_word_embeddings else EMBEDDING_GRAD_UNTIED))
    return {"setting": asdict(s), "trainable": w["trainable"], "bytes": parts, "backward_peak": backward,
            "gradients_peak": grads_done, "update_peak": update,
            "peak": max(backward, grads_done, update)}


def variants(base: Setting):
    """Every fine-tune type x optimizer x checkpointing x compute dtype, from `base`."""
    for ft in FINE_TUNES:
        for opt in OPTIMIZERS:
            for ckpt in (False, True):
                for dtype in ("float32", "bfloat16"):
                    wdt = base.weight_dtype if ft == "full" else "bfloat16"
                    yield replace(base, fine_tune=ft, optimizer=opt, grad_checkpoint=ckpt,
                                  compute_dtype=dtype, weight_dtype=wdt)


def table(c: StudentConfig, base: Setting, fraction=USABLE_FRACTION) -> dict:
    """All variants' plans, and per machine the cheapest (lowest peak) variant that fits in
    `fraction` of its memory with the most capable fine-tune type, then optimizer."""
    plans = [plan(c, v) for v in variants(base)]
    best = {}
    for gb in MACHINES_GB:
        fits = [p for p in plans if p["peak"] <= fraction * gb * GB]
        for ft, opt in ((ft, opt) for ft in FINE_TUNES for opt in OPTIMIZERS):
            options = [p for p in fits if (p["setting"]["fine_tune"], p["setting"]["optimizer"]) == (ft, opt)]
            if options:
                best[gb] = min(options, key=lambda p: p["peak"])
                break
    return {"plans": plans, "best": best, "usable_fraction": fraction}


def _name(s: dict) -> str:
    return (f"{s['fine_tune']:<7}{s['optimizer']:<10}{'ckpt' if s['grad_checkpoint'] else '-':<5}"
            f"{s['compute_dtype']:<9}")


def report(path, c: StudentConfig, t: dict) -> str:
    s = t["plans"][0]["setting"]
    gb = lambda b: f"{b / GB:8.2f}"  # noqa: E731
    lines = [f"{path}: {human_count(parameters(c)['total'])} parameters; batch {s['batch_size']} x "
             f"{s['max_seq_length']} tokens, LoRA rank {s['rank']}, top-k {s['topk']}; "
             f"GB = 1e9 bytes; fits = peak <= {t['usable_fraction']:.0%} of the machine",
             f"  {'setting':<31}{'weights':>8}{'grads':>8}{'optim':>8}{'acts':>8}{'logits':>8}"
             f"{'kd':>8}{'update':>8}{'peak':>8}  fits (GB)"]
    for p in t["plans"]:
        b = p["bytes"]
        fits = [m for m in MACHINES_GB if p["peak"] <= t["usable_fraction"] * m * GB]
        lines.append(f"  {_name(p['setting'])}{gb(b['weights'])}{gb(b['gradients'])}{gb(b['optimizer'])}"
                     f"{gb(b['activations'])}{gb(b['logits'])}{gb(b['kd_targets'])}{gb(p['update_peak'])}{gb(p['peak'])}  "
                     + (",".join(map(str, fits)) or "none"))
    lines.append("Cheapest setting of the most capable fine-tune type (then optimizer) that fits:")
    for m in MACHINES_GB:
        p = t["best"].get(m)
        lines.append(f"  {m:>4} GB: " + (f"{_name(p['setting']).strip()}  peak {p['peak'] / GB:.2f} GB"
                                          if p else "nothing fits"))
    return "\n".join(lines)


def measure(c: StudentConfig, s: Setting, steps: int = 2) -> dict:
    """Train `steps` steps of `s` on random tokens with the real trainer and return the plan
    beside mx.get_peak_memory() (weights, optimizer state and all), and the seconds a step
    after the first (compiling) one."""
    import gc
    import time
    from types import SimpleNamespace

    import mlx.core as mx
    import numpy as np

    from . import finetune
    from .data import Example
    from .train import OPTIMIZERS
    from .trainer import TrainingArgs, train

    ft = "full" if s.fine_tune == "full" else "dora" if s.fine_tune == "dora" else "lora"
    quant = {"bits": int(s.fine_tune[5:]), "group_size": s.group_size} if s.fine_tune.startswith("qlora") else None
    args = SimpleNamespace(init_from=None, fine_tune_type=ft, num_layers=s.lora_layers,
                           lora_parameters={"rank": s.rank}, quantize_base=quant, qat=None, seed=0)
    finetune.check_settings(args, c)
    rng = np.random.default_rng(0)
    rows = s.batch_size * s.grad_accumulation_steps
    examples = [Example(tokens=rng.integers(0, c.vocab_size, s.max_seq_length + 1), prompt_len=0)
                for _ in range(rows)]
    for e in examples if s.topk else ():
        e.topk_ids = rng.integers(0, c.vocab_size, (s.max_seq_length, s.topk)).astype(np.int32)
        e.topk_logprobs = np.sort(np.log(rng.dirichlet(np.ones(s.topk), s.max_seq_length)), 1)[:, ::-1].astype(np.float32)
    model = finetune.build_student(c, args)
    if ft != "full" and s.weight_dtype != "float32":
        from mlx.utils import tree_map

        frozen = tree_map(lambda p: p.astype(mx.bfloat16) if p.dtype == mx.float32 else p,
                          model.parameters())
        model.update(frozen)
        model.update(tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()))
    optimizer = OPTIMIZERS[s.optimizer](1e-4, 0.01)  # as mlx_student.train makes them
    targs = TrainingArgs(batch_size=rows, iters=steps, max_seq_length=s.max_seq_length,
                         grad_checkpoint=s.grad_checkpoint, compute_dtype=s.compute_dtype,
                         grad_accumulation_steps=s.grad_accumulation_steps, steps_per_eval=10**9,
                         steps_per_save=10**9, loss={"topk_kd": 1.0} if s.topk else {"ce": 1.0})
    mx.eval(model.parameters())
    gc.collect()  # what an earlier measurement left must not count
    mx.clear_cache()
    mx.reset_peak_memory()
    times = []
    train(model, optimizer, examples, None, targs, on_report=lambda r: times.append(time.perf_counter()))
    measured = mx.get_peak_memory()
    planned = plan(c, s)["peak"]
    step_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"setting": asdict(s), "planned": planned, "measured": measured, "ratio": planned / measured,
            "step_s": step_s}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_student.plan",
        description="Peak training memory of a student config under each fine-tune type, optimizer, "
        "compute dtype and checkpointing; what fits on 16/32/64/128 GB Macs (arithmetic only). "
        "--measure trains a few steps of one setting here and prints planned vs measured.")
    add = p.add_argument
    add("--config", required=True, help="student YAML config (its model: and, as defaults for "
        "the three flags below, its batch_size, max_seq_length and grad_accumulation_steps)")
    for flag, default, what in (("--batch-size", 1, "sequences per micro-batch"),
                                ("--max-seq-length", 2048, "tokens per sequence"),
                                ("--grad-accumulation-steps", 1, "micro-batches per step")):
        add(flag, type=int, help=f"{what} (default: the config's {flag[2:].replace('-', '_')}, "
            f"else {default})")
    add("--rank", type=int, default=8, help="LoRA / DoRA rank (default: %(default)s)")
    add("--lora-layers", type=int, default=-1, help="blocks with adapters (-1: all) (default: %(default)s)")
    add("--topk", type=int, default=0, help="teacher top-k per token in the batch (0: CE only) "
        "(default: %(default)s)")
    add("--usable-fraction", type=float, default=USABLE_FRACTION,
        help="share of unified memory MLX may use (Metal's recommended working set) (default: %(default)s)")
    add("--json", action="store_true", help="print one JSON object")
    m = p.add_argument_group("--measure: one setting, trained here for 2 steps")
    m.add_argument("--measure", action="store_true")
    m.add_argument("--fine-tune", choices=FINE_TUNES, default="full")
    m.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    m.add_argument("--compute-dtype", choices=list(DTYPE_BYTES), default="float32")
    m.add_argument("--weight-dtype", choices=list(DTYPE_BYTES), default="float32")
    m.add_argument("--grad-checkpoint", action="store_true")
    return p


def settings(args) -> StudentConfig:
    """The config's model, and its run settings under the flags (flags over the file over
    PLAN_DEFAULTS; a key mlx_student.train does not know is an error naming the file and line),
    each checked. Raises ConfigError listing every problem where it was set."""
    from . import run_settings
    from .train import CONFIG_DEFAULTS

    config = load_config(args.config)
    given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    _, lines = apply_config(args, {**CONFIG_DEFAULTS, **PLAN_DEFAULTS},
                            skip=("model", "pilot", "judge"), what="run setting")
    integer, number = run_settings.integer, run_settings.number
    found = run_settings.problems(args, {
        "batch_size": integer(1), "max_seq_length": integer(1), "grad_accumulation_steps": integer(1),
        "rank": integer(1), "lora_layers": integer(1, special=-1), "topk": integer(0),
        "usable_fraction": number(lambda x: 0 < x <= 1, "a number in (0, 1]")})
    run_settings.raise_problems(found, args.config, lines, given)
    return config


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        config = settings(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    base = Setting(batch_size=args.batch_size, max_seq_length=args.max_seq_length, rank=args.rank,
                   lora_layers=args.lora_layers, topk=args.topk,
                   grad_accumulation_steps=args.grad_accumulation_steps)
    if args.measure:
        s = replace(base, fine_tune=args.fine_tune, optimizer=args.optimizer, compute_dtype=args.compute_dtype,
                    weight_dtype=args.weight_dtype, grad_checkpoint=args.grad_checkpoint)
        r = measure(config, s)
        print(json.dumps(r) if args.json else
              f"{_name(r['setting']).strip()}: planned {r['planned'] / 1e6:.1f} MB, measured "
              f"{r['measured'] / 1e6:.1f} MB (mx.get_peak_memory), planned/measured {r['ratio']:.3f}")
        return
    t = table(config, base, args.usable_fraction)
    print(json.dumps({"config": args.config, **t}) if args.json else report(args.config, config, t))


if __name__ == "__main__":
    main()
