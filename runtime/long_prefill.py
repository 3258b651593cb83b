"""A long prompt through an exported package, chunk by chunk, against MLX on the same tokens.

    report = check(model_dir, package, n_tokens=12000)      # the package's largest context

The CoreML engine (runtime/coreml_engine.py) feeds the prompt as the package's prefill chunks
(the longest that fits, at the running position) and then decode steps, every call reading and
writing the fp16 KV state; MLX (fp32, the probe's reference) prefills the same tokens through
mlx-lm's KV cache. Compared, with export/taps.py's metrics (rel err ||d|| / ||ref||, cosine):
the last position's logits (plus top-1 agreement and KL(mlx || coreml)) and the whole KV state,
every layer's keys and values at every prompt position, so a chunk written at a wrong position or
a mask that hides a previous chunk shows at its place. Also read back from the package: the KV
state's shape and bytes per context (2 states x layers x KV heads x head_dim x context x 2 bytes).

The prompt is real text (the Python docs, runtime/needles.py's haystack), tokenized with the
student's tokenizer. On Linux the reference MIL executor runs the package: faithful, not fast.
"""

import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from export import taps
from export.convert import describe

from .coreml_engine import CoreMLEngine
from .generate import MLXEngine
from .needles import Haystack


def kv_state_bytes(package) -> dict:
    """{context: {"shape", "bytes"}} of the KV state of each decode function of the package."""
    out = {}
    for name, f in describe(package)["functions"].items():
        if name.startswith("decode_ctx"):
            shapes = [s["shape"] for s in f["states"].values()]
            out[int(name[len("decode_ctx"):])] = {
                "shape": shapes[0], "states": len(shapes),
                "bytes": int(sum(np.prod(s) * 2 for s in shapes))}  # fp16 states
    return dict(sorted(out.items()))


def prompt_ids(tokenizer, n_tokens: int, seed: int = 0) -> list:
    """`n_tokens` of the Python docs, starting at a line, with the tokenizer's BOS if it has one."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    hay = Haystack(tokenizer, "docs", n_tokens)
    return bos + hay.slice(n_tokens - len(bos), 0, np.random.default_rng(seed))


def check(model_dir, package, n_tokens: int, context=None, backend: str = "auto",
          mlx_step: int = 512, seed: int = 0) -> dict:
    """Run `n_tokens` of text through the package at `context` (default: its largest) and
    through MLX; returns the comparison (see the module docstring). Raises ValueError when the
    prompt does not fit the context."""
    coreml = CoreMLEngine.load(package, model_dir, context=context, backend=backend)
    if n_tokens > coreml.context:
        raise ValueError(f"{n_tokens} tokens exceed the package's context {coreml.context}")
    mlx = MLXEngine.load(model_dir)
    ids = prompt_ids(mlx.tokenizer, n_tokens, seed)

    tic = time.perf_counter()
    cache = make_prompt_cache(mlx.model)
    for i in range(0, n_tokens, mlx_step):
        ref = mlx(mx.array([ids[i:i + mlx_step]]), cache=cache)[0, -1]
        mx.eval(ref, [c.state for c in cache])
    mlx_s = time.perf_counter() - tic
    ref = np.array(ref, np.float32)
    # mlx-lm's cache: (1, kv heads, positions, head_dim) per layer -> the package's layout
    # (layers, kv heads, head_dim, positions)
    ref_k = np.stack([np.array(c.keys[0, :, :n_tokens], np.float32).transpose(0, 2, 1) for c in cache])
    ref_v = np.stack([np.array(c.values[0, :, :n_tokens], np.float32).transpose(0, 2, 1) for c in cache])

    tic = time.perf_counter()
    state = coreml.make_cache()
    got = np.array(coreml(mx.array([ids]), cache=state)[0, -1], np.float32)
    coreml_s = time.perf_counter() - tic
    kv = state[0].kv
    k = kv.read_state("k_cache")[..., :n_tokens] if hasattr(kv, "read_state") else None
    v = kv.read_state("v_cache")[..., :n_tokens] if hasattr(kv, "read_state") else None
    calls = coreml.chunks(n_tokens)
    return {
        "model": str(model_dir), "package": str(package), "backend": coreml.backend,
        "context": coreml.context, "tokens": n_tokens, "prefill_lengths": sorted(coreml.prefill),
        "calls": {str(t): calls.count(t) for t in sorted(set(calls), reverse=True)},
        "logits": taps.compare(got, ref),
        "top1_agree": bool(got.argmax() == ref.argmax()),
        "kl": float(taps.kl(ref[None], got[None])[0]),
        "k_cache": taps.compare(k, ref_k) if k is not None else None,  # MLModel state: opaque
        "v_cache": taps.compare(v, ref_v) if v is not None else None,
        "kv_state": kv_state_bytes(package),
        "seconds": {"mlx": mlx_s, "coreml": coreml_s, "coreml_load": coreml.load_s},
    }


def markdown(r: dict) -> str:
    kv = r["kv_state"]
    lines = [f"Long prompt: {r['tokens']} tokens at context {r['context']} through {Path(r['package']).name} "
             f"({r['backend']}): calls {r['calls']}", "",
             "| compared with MLX fp32 | rel err | cosine | max abs err |", "|---|---|---|---|"]
    for name in ("logits", "k_cache", "v_cache"):
        m = r[name]
        if m:
            lines.append(f"| {name} | {m['rel_err']:.2e} | {m['cosine']:.6f} | {m['max_abs_err']:.3g} |")
    lines += ["", f"top-1 agrees: {r['top1_agree']}; KL(mlx || coreml) {r['kl']:.2e} nats; "
              f"MLX {r['seconds']['mlx']:.1f} s, package {r['seconds']['coreml']:.1f} s", "",
              "| context | KV state shape (x2) | KV bytes |", "|---|---|---|"]
    lines += [f"| {c} | {s['shape']} | {s['bytes'] / 2**20:.1f} MiB |" for c, s in kv.items()]
    return "\n".join(lines) + "\n"
