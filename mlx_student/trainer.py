"""The training loop: one compiled step, gradient accumulation, data parallel, evaluation.

As in mlx_lm.tuner.trainer, `train()` takes the model, optimizer and data and reports through
callbacks; the loss is the configured mix of mlx_student.losses. Differences that matter for
distillation:

* `batch_size` is the global batch of one optimizer step. Ranks take their rows of it and
  split them into `grad_accumulation_steps` micro-batches; every loss term is normalised by
  its tokens over the whole step, so any split gives the loss and gradients of one process
  with the whole batch, up to fp32 summation order.
* The step is the whole position of a run: the data cursor, and the RNG, re-seeded from
  (seed, step) every step. A resumed run sees exactly what the uninterrupted one would have.
* Validation reports, besides loss and perplexity, top-1 agreement with the teacher and KL to
  its top-k distribution when the data carry teacher top-k.
* Only the positions that count (`counted_positions`, on by default): the LM head, the
  softmax and an in-process teacher's head run only at the positions where some loss term
  counts (a KD record's prompt is often 3/4 of its tokens); the transformer still runs over
  every position. The losses and gradients are those of the full logits up to fp32
  summation order.
* On-policy distillation (`on_policy`, mlx_student.onpolicy; GKD): a fraction of each
  step's rows is replaced by completions the student samples, seeded from (seed, step, row),
  which the in-process teacher scores.
* QAT (`qat`, mlx_student.quant) is a phase of the same run: the steps after
  `qat["start_step"]` train the fp32 masters through fake-quantized weights (straight-through
  estimator), and validate the fake-quantized model. When the phase starts, learned (LSQ)
  scales are added as parameters and activation observers watch a few batches, then freeze.
"""

import math
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .batches import PAD_TO, iterate_batches
from .losses import loss_mix, topk_kd
from .model import logits_at
from .onpolicy import on_policy_batch
from .quant import fake_quantize, fake_quantized
from .quant import prepare as prepare_qat

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class TrainingArgs:
    batch_size: int = 8  # global: split over ranks and accumulation steps
    iters: int = 200
    max_seq_length: int = 256
    grad_accumulation_steps: int = 1
    grad_clip: float = 1.0
    grad_checkpoint: bool = False
    compute_dtype: str = "float32"  # master weights stay fp32
    steps_per_report: int = 10
    steps_per_eval: int = 100
    steps_per_save: int = 100
    val_batches: int = 16
    seed: int = 0
    loss: dict = field(default_factory=lambda: {"ce": 1.0})
    temperature: float = 1.0
    jsd_beta: float = 0.5
    topk_tail: str = "bucket"
    counted_positions: bool = True  # LM head only where a loss term counts (False: everywhere)
    group_by_length: bool = True  # batches of like lengths (mlx-lm); False: shuffled records
    qat: Optional[dict] = None  # quant.qat_settings: {bits, group_size, embeddings, start_step}
    on_policy: Optional[dict] = None  # onpolicy.on_policy_settings: {lmbda, temperature, max_new_tokens}


def schedule(learning_rate, iters, warmup, min_lr_ratio):
    """Linear warmup to `learning_rate`, then cosine decay to `learning_rate * min_lr_ratio`."""
    warmup = min(warmup, iters)
    decay = optim.cosine_decay(learning_rate, max(iters - warmup, 1), learning_rate * min_lr_ratio)
    if not warmup:
        return decay
    warm = optim.linear_schedule(0.0, learning_rate, warmup)
    return optim.join_schedules([warm, decay], [warmup])


def _term_mask(name, batch):
    """The positions a loss term averages over: CE the loss mask, KD terms the teacher's."""
    return batch["kd_mask"] if name != "ce" and "kd_mask" in batch else batch["mask"]


# Batch arrays with one entry per position (B, L, ...), gathered with the logits.
PER_POSITION = ("targets", "mask", "kd_mask", "token_weights", "topk_ids", "topk_logprobs",
                "sampled_ids", "sampled_counts")


def counted_positions(batch, multiple=PAD_TO):
    """`batch` with its per-position arrays gathered at the positions some loss term counts
    (nonzero "mask" or "kd_mask"), plus "positions" (B, P) int32, their indices into the
    inputs, for `mlx_student.model.logits_at`. Each row takes its counted positions in
    order, then uncounted ones (mask 0, so they add nothing); P is the most any row counts,
    rounded up to `multiple` so the compiled step sees few shapes. When P would be the whole
    width L the batch comes back unchanged."""
    counted = batch["mask"] != 0
    if "kd_mask" in batch:
        counted = counted | (batch["kd_mask"] != 0)
    width = counted.shape[1]
    p = min(multiple * max(-(-counted.sum(axis=1).max().item() // multiple), 1), width)
    if p == width:
        return batch
    key = mx.where(counted, 0, width) + mx.arange(width)  # counted first, each in order
    positions = mx.argsort(key, axis=1)[:, :p].astype(mx.int32)
    out = {**batch, "positions": positions}
    for name in PER_POSITION:
        if name in batch:
            v = batch[name]
            index = positions.reshape(positions.shape + (1,) * (v.ndim - 2))
            out[name] = mx.take_along_axis(v, index, axis=1)
    return out


def qat_active(args, step) -> bool:
    """Whether `step` (1-based) is a QAT step."""
    return args.qat is not None and step > args.qat["start_step"]


def make_loss(args, names, qat=None, teacher=None):
    """loss_fn(model, batch, scales) -> (sum of loss[n] * scales[i] * part_n, parts).
    With `qat` the forward pass sees the fake-quantized weights (then cast to the compute
    dtype); gradients reach the masters straight through. With a `teacher` model in this
    process its logits are the batch's `teacher_logits` (the dense KD losses). A batch with
    "positions" (`counted_positions`) takes both models' logits only there."""
    dtype = DTYPES[args.compute_dtype]
    unit = {n: 1.0 for n in names}

    def loss_fn(model, batch, scales):
        positions = batch.get("positions")
        if teacher is not None:
            teacher_logits = logits_at(teacher, batch["inputs"], positions)
            batch = {**batch, "teacher_logits": mx.stop_gradient(teacher_logits)}
        if qat:
            model.update(fake_quantize(model.parameters(), qat))
        if dtype != mx.float32:
            # floating weights only: a QLoRA base's packed integers stay as they are
            model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating)
                                  else p, model.parameters()))
        logits = logits_at(model, batch["inputs"], positions)
        _, parts = loss_mix(logits, batch, unit, args.temperature, args.jsd_beta, args.topk_tail)
        total = sum(args.loss[n] * scales[i] * parts[n] for i, n in enumerate(names))
        return total, parts

    return loss_fn


def evaluate(model, examples, args, teacher=None):
    """Token-weighted means over the validation batches: each loss part, `ppl` from CE, and
    with teacher top-k: `top1_agree` (student argmax == teacher's top-1) and `kl_topk`
    (KL from the teacher's top-k distribution, tail as one bucket); a `teacher` model gives
    the dense KD terms their `teacher_logits`. Process weights are not
    applied: validation losses are plain per-token means, comparable across weightings."""
    sums, counts = {}, {}

    def add(name, value, n):
        sums[name] = sums.get(name, 0.0) + value * n
        counts[name] = counts.get(name, 0.0) + n

    weights = {k: 1.0 for k, w in args.loss.items() if w}
    # a split smaller than one batch (a small valid split) is one batch of all its examples
    batches = iterate_batches(examples, min(args.batch_size, len(examples)), args.max_seq_length,
                              seed=args.seed)
    for i, batch in enumerate(batches):
        if i == args.val_batches:
            break
        batch.pop("token_weights", None)
        if args.counted_positions:
            batch = counted_positions(batch)
        positions = batch.get("positions")
        logits = logits_at(model, batch["inputs"], positions).astype(mx.float32)
        if teacher is not None:
            batch["teacher_logits"] = logits_at(teacher, batch["inputs"], positions)
        _, parts = loss_mix(logits, batch, weights, args.temperature, args.jsd_beta, args.topk_tail)
        for name, value in parts.items():
            add(name, value.item(), _term_mask(name, batch).sum().item())
        if "topk_ids" in batch:
            kd_mask = batch["kd_mask"]
            n = kd_mask.sum().item()
            agree = (mx.argmax(logits, axis=-1) == batch["topk_ids"][..., 0]) * kd_mask
            add("top1_agree", agree.sum().item() / max(n, 1), n)
            kl = topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], kd_mask, tail="bucket")
            add("kl_topk", kl.item(), n)
    out = {k: sums[k] / max(counts[k], 1) for k in sums}
    if "ce" in out:
        out["ppl"] = math.exp(min(out["ce"], 50))
    return out


def train(model, optimizer, train_set, valid_set, args, start_step=0, on_report=None, on_save=None,
          teacher=None, eos_token_ids=()):
    """Run `args.iters` optimizer steps from `start_step`; `teacher`: a model in this process
    whose logits the dense KD losses (forward_kl, reverse_kl, jsd) distil; `eos_token_ids`:
    where the student's on-policy samples stop (`args.on_policy`).

    on_report(record) gets every step's metrics (rank 0 only); on_save(step) is called every
    `steps_per_save` steps and at the end (rank 0 only). Returns the list of records.
    """
    if mx.metal.is_available():
        maybe_set_recommended_wired_limit()
    world = mx.distributed.init()
    size, rank = world.size(), world.rank()
    accum = args.grad_accumulation_steps
    if args.batch_size % (size * accum):
        raise ValueError(
            f"batch_size {args.batch_size} must divide evenly over {size} ranks x {accum} "
            "accumulation steps"
        )
    micro = args.batch_size // (size * accum)
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    names = [n for n, w in args.loss.items() if w]
    state = [model.state, optimizer.state, mx.random.state]

    def make_grad_step(qat):
        value_and_grad = nn.value_and_grad(model, make_loss(args, names, qat, teacher))

        @partial(mx.compile, inputs=state, outputs=state)
        def grad_step(batch, scales, prev_grad):
            params = model.parameters()  # frozen (LoRA base) ones too: the cast is per step
            (_, parts), grad = value_and_grad(model, batch, scales)
            model.update(params)  # the fp32 masters, if the loss cast or quantized the model
            if prev_grad is not None:
                grad = tree_map(mx.add, grad, prev_grad)
            return mx.stack([parts[n] for n in names]), grad

        return grad_step

    def make_update():  # again when QAT adds parameters (learned scales)
        @partial(mx.compile, inputs=state, outputs=state)
        def update(grad):
            if size > 1:
                grad = tree_map(lambda g: mx.distributed.all_sum(g, stream=mx.cpu), grad)
            grad, grad_norm = optim.clip_grad_norm(grad, args.grad_clip)
            optimizer.update(model, grad)
            return grad_norm

        return update

    def observed_batches():  # what the activation observers watch when QAT starts
        n = args.qat["observer_batches"]
        return islice(iterate_batches(train_set, args.batch_size, args.max_seq_length,
                                      seed=args.seed, loop=True,
                                      group_by_length=args.group_by_length), n)

    batches = iterate_batches(
        train_set, args.batch_size, args.max_seq_length, seed=args.seed, loop=True,
        start=start_step, group_by_length=args.group_by_length,
    )
    history, tokens, tic, phase = [], 0, time.perf_counter(), None
    for it in range(start_step + 1, args.iters + 1):
        if qat_active(args, it) != phase:  # a new phase: a new compiled step
            phase = qat_active(args, it)
            if phase and prepare_qat(model, args.qat, observed_batches):
                optimizer.init(model.trainable_parameters())
            grad_step, update = make_grad_step(args.qat if phase else None), make_update()
        # Every rank collates the same global batch, so each term's token count over the whole
        # step is known everywhere; this rank's micro-batches are its rows, `micro` at a time,
        # each weighing its per-token mean by its count / the step's count.
        mx.random.seed(args.seed * 1_000_003 + it)  # RNG state = f(seed, step): resumable
        batch = next(batches)
        if args.on_policy:
            with fake_quantized(model, args.qat if phase else None):
                batch, _ = on_policy_batch(model, batch, args.on_policy, set(eos_token_ids),
                                           args.seed, it, args.max_seq_length)
            mx.random.seed(args.seed * 1_000_003 + it)  # the step's RNG, as without sampling
        if args.counted_positions:
            batch = counted_positions(batch)
        totals = mx.maximum(mx.stack([_term_mask(n, batch).sum() for n in names]), 1)
        grad, sums = None, mx.zeros(len(names))
        for i in range(accum):
            start = (rank * accum + i) * micro
            shard = {k: v[start : start + micro] for k, v in batch.items()}
            counts = mx.stack([_term_mask(n, shard).sum() for n in names])
            parts, grad = grad_step(shard, counts / totals, grad)
            sums = sums + parts * counts
            if accum > 1:  # one micro-batch's activations live at a time
                mx.eval(grad, sums)
        grad_norm = update(grad)
        if size > 1:
            sums = mx.distributed.all_sum(sums, stream=mx.cpu)
        mx.eval(state, grad_norm, sums)
        parts = dict(zip(names, (sums / totals).tolist()))
        step_tokens = batch["mask"].sum().item()
        tokens += step_tokens
        record = {
            "step": it,
            "tokens": int(step_tokens),  # loss (mask) tokens of the step's batch
            "loss": sum(args.loss[n] * parts[n] for n in names),
            **parts,
            "grad_norm": grad_norm.item(),
            "lr": optimizer.learning_rate.item(),
            "tokens_per_s": tokens / (time.perf_counter() - tic),
        }
        if args.qat is not None:
            record["qat"] = phase
        if valid_set and (it % args.steps_per_eval == 0 or it == args.iters):
            with fake_quantized(model, args.qat if phase else None):
                record["valid"] = evaluate(model, valid_set, args, teacher)
        if rank == 0:
            history.append(record)
            if on_report:
                on_report(record)
            if on_save and (it % args.steps_per_save == 0 or it == args.iters):
                on_save(it)
    return history
