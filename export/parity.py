"""Mirror vs MLX parity for the manifest: the fp32 mirror against mlx-lm's own model (with its
KVCache) on the same checkpoint, for a prefill and for step-by-step decode.

The bound is the probe's error model (export/probe.py): fp32 against fp32 stays below 1/8 of
what fp16 rounding does to this model, measured in the same run by mlx-lm in fp16, and never
below 2^-11 / 8 (`within_bound`).

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


FP16_UNIT_ROUNDOFF = 2.0**-11
FP32_SHARE = 2.0**-3  # export/probe.py COMMON_GATES["mirror_err_ratio"]


def mlx_logits(model_dir, ids: np.ndarray, prefill: int, dtype: str = "float32") -> np.ndarray:
    """(T, vocab) logits of mlx-lm (weights and activations in `dtype`), as fp32: the prefill in
    one call, then one token per call, both through mlx-lm's KVCache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_student.hf_config import load

    model, _ = load(model_dir)
    model.set_dtype(getattr(mx, dtype))
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
    half = mlx_logits(model_dir, ids, prefill, "float16")
    out = {"reference": "mlx_lm (fp32, KVCache)", "tokens": int(len(ids)),
           "prefill_tokens": prefill, "decode_steps": decode,
           "top1_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean())}
    for part, rows in (("prefill", slice(None, prefill)), ("decode", slice(prefill, None))):
        out[f"{part}_rel_err"] = rel_err(ours[rows], ref[rows])
        out[f"{part}_bound"] = bound(rel_err(half[rows], ref[rows]))
    out["ok"] = all(out[f"{p}_rel_err"] < out[f"{p}_bound"] for p in ("prefill", "decode"))
    return out


def bound(fp16_rel_err: float) -> float:
    """The largest fp32-vs-fp32 error the error model allows, given the model's own fp16
    error on the same ids."""
    return max(fp16_rel_err, FP16_UNIT_ROUNDOFF) * FP32_SHARE
