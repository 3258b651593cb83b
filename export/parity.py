"""Mirror vs MLX parity for the manifest: the fp32 mirror against mlx-lm's own model (with its
KVCache) on the same checkpoint, for a prefill and for step-by-step decode.

MLX is imported only here, lazily: conversion itself never needs it.
"""

import numpy as np
import torch

from .mirror import Mirror


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def mirror_logits(mirror: Mirror, ids: np.ndarray, prefill: int, context: int) -> np.ndarray:
    """(T, vocab) fp32 logits of the mirror: one prefill of `prefill` tokens at position 0,
    then one decode call per remaining token, through an explicit (functional) KV cache."""
    shape = mirror.cache_shape(context)
    k, v = torch.zeros(shape), torch.zeros(shape)
    out = []
    pre = mirror.function(prefill, context, all_logits=True)
    dec = mirror.function(1, context)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    with torch.no_grad():
        lg, k, v = pre(i32(ids[None, :prefill]), i32([0]), k, v)
        out.append(lg[0].numpy())
        for t in range(prefill, len(ids)):
            lg, k, v = dec(i32(ids[None, t:t + 1]), i32([t]), k, v)
            out.append(lg[0].numpy())
    return np.concatenate(out)


def mlx_logits(model_dir, ids: np.ndarray, prefill: int) -> np.ndarray:
    """(T, vocab) fp32 logits of mlx-lm: the prefill in one call, then one token per call,
    both through mlx-lm's KVCache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_student.hf_config import load

    model, _ = load(model_dir)
    cache = make_prompt_cache(model)
    out = [np.array(model(mx.array(ids[None, :prefill]), cache=cache)[0])]
    for t in range(prefill, len(ids)):
        out.append(np.array(model(mx.array(ids[None, t:t + 1]), cache=cache)[0]))
    return np.concatenate(out).astype(np.float32)


def check_mlx(model_dir, mirror: Mirror, prefill: int = 16, decode: int = 8, seed: int = 0):
    """{"prefill_rel_err", "decode_rel_err", ...}: max |mirror - mlx| / max |mlx|."""
    c = mirror.config
    ids = np.random.default_rng(seed).integers(0, c.vocab_size, size=prefill + decode)
    ours = mirror_logits(mirror, ids, prefill, min(c.contexts))
    ref = mlx_logits(model_dir, ids, prefill)
    return {"reference": "mlx_lm (fp32, KVCache)", "tokens": int(len(ids)),
            "prefill_tokens": prefill, "decode_steps": decode,
            "prefill_rel_err": rel_err(ours[:prefill], ref[:prefill]),
            "decode_rel_err": rel_err(ours[prefill:], ref[prefill:]),
            "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean())}
