"""Batches of tokenized examples (mlx_student.data.Example) for training and evaluation, like
mlx-lm's ``iterate_batches``: grouped by length (or not), padded to a multiple of ``PAD_TO``, with the
loss mask, teacher targets and process weights aligned with the next-token targets."""

import mlx.core as mx
import numpy as np

PAD_TO = 32


def _collate(batch, rows, max_seq_length, pad_id, k, weighted=False, s=None):
    lengths = [min(len(ex.tokens), max_seq_length + 1) for ex in batch]
    width = min(PAD_TO * -(-(max(lengths) - 1) // PAD_TO), max_seq_length)
    shape = (rows, width)
    inputs = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, pad_id, np.int32)
    mask = np.zeros(shape, np.float32)
    token_weights = np.zeros(shape, np.float32)
    kd_mask = np.zeros(shape, np.float32)
    if k is not None:
        topk_ids = np.zeros(shape + (k,), np.int32)
        topk_logprobs = np.full(shape + (k,), -np.inf, np.float32)
    if s is not None:
        sampled_ids = np.zeros(shape + (s,), np.int32)
        sampled_counts = np.zeros(shape + (s,), np.float32)
    for j, (ex, length) in enumerate(zip(batch, lengths)):
        n = length - 1
        inputs[j, :n] = ex.tokens[:n]
        targets[j, :n] = ex.tokens[1 : n + 1]
        start = max(ex.prompt_len - 1, 0)  # target index t + 1 >= prompt_len
        if ex.weights is None:
            mask[j, start:n] = 1
            token_weights[j, start:n] = 1
        else:
            token_weights[j, :n] = ex.weights[1 : n + 1]
            mask[j, :n] = token_weights[j, :n] != 0
        if ex.topk_ids is not None:
            m = max(min(len(ex.topk_ids), n - start), 0)
            kk = ex.topk_ids.shape[1]
            topk_ids[j, start : start + m, :kk] = ex.topk_ids[:m]
            topk_logprobs[j, start : start + m, :kk] = ex.topk_logprobs[:m]
            kd_mask[j, start : start + m] = np.isfinite(ex.topk_logprobs[:m]).any(axis=1)
        if ex.sampled_ids is not None:
            m = max(min(len(ex.sampled_ids), n - start), 0)
            ss = ex.sampled_ids.shape[1]
            sampled_ids[j, start : start + m, :ss] = ex.sampled_ids[:m]
            sampled_counts[j, start : start + m, :ss] = ex.sampled_counts[:m]
            kd_mask[j, start : start + m] += (ex.sampled_counts[:m] > 0).any(axis=1)
    out = {"inputs": inputs, "targets": targets, "mask": mask}
    if weighted:
        out["token_weights"] = token_weights
    if k is not None or s is not None:
        out["kd_mask"] = np.minimum(kd_mask, 1)
    if k is not None:
        out.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    if s is not None:
        out.update(sampled_ids=sampled_ids, sampled_counts=sampled_counts)
    return {name: mx.array(a) for name, a in out.items()}


def iterate_batches(
    examples, batch_size, max_seq_length, seed=0, loop=False, pad_id=0, start=0,
    group_by_length=True,
):
    """Yield batches of ``examples`` as dicts of ``mx.array``, like mlx-lm.

    With ``group_by_length`` (the default, mlx-lm's batching) examples are sorted by length
    and consecutive ones grouped into batches of ``batch_size``, and epoch e visits these
    batches in a permutation drawn from ``np.random.default_rng([seed, e])``: little padding,
    but a batch holds only records of one length (a mix of short completions and long text
    windows then gives steps of very different token counts). Without it (Hugging Face
    Trainer's default, ``group_by_length=False``) epoch e draws a permutation of the examples
    from that generator and cuts it into batches, so every batch mixes the data's kinds. Either
    way the last ``len(examples) % batch_size`` examples of an epoch, if any, make one batch
    padded with empty rows (mask 0), so nothing is dropped (unlike mlx-lm) and every batch
    has ``batch_size`` rows, and a seed fixes the whole sequence. ``loop=False`` makes one
    pass, ``loop=True`` repeats forever. ``start`` skips that many batches (a resumed run's
    data cursor) without collating them.

    Each batch holds ``"inputs"`` ``(B, L)`` int32 (``tokens[:-1]``), ``"targets"``
    ``(B, L)`` int32 (``tokens[1:]``), both padded with ``pad_id``, and ``"mask"``
    ``(B, L)`` float32, 1 where the target is a loss token. If any example carries
    teacher top-k there are also ``"kd_mask"`` ``(B, L)`` float32 (1 where the target
    has teacher top-k), ``"topk_ids"`` ``(B, L, K)`` int32 and ``"topk_logprobs"``
    ``(B, L, K)`` float32 (padding: id 0, logprob ``-inf``), aligned with the targets;
    with sampled targets, ``"sampled_ids"`` ``(B, L, S)`` int32 and ``"sampled_counts"``
    ``(B, L, S)`` float32 (padding: id 0, count 0), and "kd_mask" also 1 where they are.
    If any example has process weights there is also ``"token_weights"`` ``(B, L)``
    float32: each target's loss weight (the mask's 1 elsewhere, 0 outside the loss).
    L is the longest example less one rounded up to a multiple of 32, at most
    ``max_seq_length``; longer examples are truncated.
    """
    if len(examples) < batch_size:
        raise ValueError(
            f"The dataset must have at least batch_size={batch_size} examples "
            f"but only has {len(examples)}."
        )

    def cut(order):
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    by_length = cut(sorted(range(len(examples)), key=lambda i: len(examples[i].tokens)))
    k = max((ex.topk_ids.shape[1] for ex in examples if ex.topk_ids is not None), default=None)
    s = max((ex.sampled_ids.shape[1] for ex in examples if ex.sampled_ids is not None),
            default=None)
    weighted = any(ex.weights is not None for ex in examples)
    epoch, skip = divmod(start, len(by_length))
    if epoch and not loop:
        return
    while True:
        rng = np.random.default_rng([seed, epoch])
        if group_by_length:
            batches = [by_length[b] for b in rng.permutation(len(by_length))]
        else:
            batches = cut(rng.permutation(len(examples)).tolist())
        for rows in batches[skip:]:
            yield _collate(
                [examples[i] for i in rows], batch_size, max_seq_length, pad_id, k, weighted, s
            )
        if not loop:
            break
        epoch, skip = epoch + 1, 0
