"""ONNX export of the same mirror, for runtimes other than CoreML.

One file per function at one context (default: the largest): `prefill_{T}.onnx` per prefill
length and `decode.onnx`, each with an explicit fp32 KV cache:

    inputs   input_ids (1, T) int32, position (1,) int32,
             k_cache, v_cache (layers, kv_heads, head_dim, context) fp32
    outputs  logits (1, 1, vocab), k_cache_out, v_cache_out (the caches with [position,
             position + T) written)

Exported with torch.onnx's dynamo exporter (needs onnx and onnxscript); every file is run once
by onnxruntime against the mirror at a random position and cache before it is kept.
"""

from pathlib import Path

import numpy as np
import torch

from .convert import ExportError
from .mirror import Mirror

INPUTS = ["input_ids", "position", "k_cache", "v_cache"]
OUTPUTS = ["logits", "k_cache_out", "v_cache_out"]


def export_function(mirror: Mirror, length: int, context: int, path) -> Path:
    fn = mirror.function(length, context).eval()
    shape = mirror.cache_shape(context)
    args = (torch.zeros((1, length), dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
            torch.zeros(shape), torch.zeros(shape))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # the cache write at `position` is bounded by Mirror.forward_chunk
        torch.onnx.export(fn, args, str(path), input_names=INPUTS, output_names=OUTPUTS,
                          dynamo=True, verbose=False)
    return path


def check_function(mirror: Mirror, length: int, context: int, path, seed: int = 0) -> float:
    """Max relative error of onnxruntime against the mirror over logits and both caches, at a
    random position with random cache contents."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    shape = mirror.cache_shape(context)
    feed = {"input_ids": rng.integers(0, mirror.config.vocab_size, (1, length)).astype(np.int32),
            "position": np.array([rng.integers(0, context - length + 1)], np.int32),
            "k_cache": rng.standard_normal(shape).astype(np.float32),
            "v_cache": rng.standard_normal(shape).astype(np.float32)}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(OUTPUTS, feed)
    with torch.no_grad():
        ref = mirror.function(length, context)(*(torch.from_numpy(feed[k]) for k in INPUTS))
    return max(float(np.abs(g - r.numpy()).max() / np.abs(r.numpy()).max())
               for g, r in zip(got, ref))


def export_onnx(mirror: Mirror, folder, prefill_lengths, contexts, context: int = None,
                tolerance: float = 1e-4) -> dict:
    """Write and check the ONNX files; returns the manifest entry."""
    folder = Path(folder)
    context = context or max(contexts)
    jobs = [(f"prefill_{T}", T) for T in prefill_lengths] + [("decode", 1)]
    files, errs = {}, {}
    for name, T in jobs:
        path = export_function(mirror, T, context, folder / f"{name}.onnx")
        errs[name] = check_function(mirror, T, context, path)
        if errs[name] > tolerance:
            raise ExportError(f"{path}: onnxruntime differs from the mirror by {errs[name]:.2e}")
        files[name] = path.name
    return {"context": context, "files": files, "inputs": INPUTS, "outputs": OUTPUTS,
            "rel_err_vs_mirror": errs, "max_rel_err": max(errs.values()),
            "extra_files": sorted(p.name for p in folder.iterdir()
                                  if p.name not in files.values())}
