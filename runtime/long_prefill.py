"""A long prompt through an exported package, chunk by chunk, against MLX on the same tokens.

    report = check(model_dir, package, n_tokens=12000)      # the package's largest context

The CoreML engine (runtime/coreml_engine.py) feeds the prompt as the package's prefill chunks
(the longest that fits, at the running position) and then decode steps, every call reading and
writing the fp16 KV state; MLX (fp32, the probe's reference) prefills the same tokens through
mlx-lm's KV cache in `mlx_step` chunks of its own. Compared, with export/taps.py's metrics (rel err
||d|| / ||ref||, cosine): the logits at the end of every package call (each chunk's last
position, the package's only output) with top-1 agreement and KL(mlx || coreml), and the whole
KV state, every layer's keys and values at every prompt position, so a chunk written at a wrong
position or a mask that hides a previous chunk shows at its place. Also read back from the
package: the KV state's shape and bytes per context (2 states x layers x KV heads x head_dim x
context x 2 bytes).

Tolerance: the probe's fp16 error model (export/probe_gates.py). mlx-lm's own model in fp16 runs
the first `fp16_tokens` ids (at least to the first call's end) the same way; its rel err against fp32 (floored at u = 2^-11) is
the scale e16 of each compared quantity, and the package passes when its rel err is below
`tap_err_ratio` (8) times e16, its top-1 agreement at least `top1` and its mean KL below `kl`
(the probe's fp16 gates). e16 comes from a prefix because MLX's fp16 kernels on a CPU are ~30x
slower than its fp32 ones (measured here: a 512x256x4096 matmul 1.56 s vs 0.05 s).

The prompt is real text (the Python docs, runtime/needles.py's haystack), tokenized with the
student's tokenizer. On Linux the reference MIL executor runs the package: faithful, not fast.
Peak memory: MLX's own accounting for the MLX prefill, the process' peak resident set for the
package run (which runs first, so the number is its own plus the loaded weights).
"""

import resource
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from export import taps
from export.convert import describe
from export.probe_gates import FP16_UNIT_ROUNDOFF, GATE_DEFAULTS
from mlx_student.hf_config import load as load_mlx

from .coreml_engine import CoreMLEngine
from .needles import Haystack

FP16_GATES = {k: GATE_DEFAULTS["fp16"][k] for k in ("tap_err_ratio", "top1", "kl")}


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


def mlx_prefill(model, ids: list, ends: list, step: int) -> dict:
    """mlx-lm's model over `ids` in `step`-token chunks through its KV cache. Returns {"logits":
    (len(ends), vocab) fp32 at the positions `ends`, "k", "v": (layers, KV heads, head_dim,
    positions) fp32 (the package's state layout)}. Only the rows at `ends` go through the LM
    head: its matmul dominates a narrow model's cost."""
    cache, rows, want = make_prompt_cache(model), [], np.asarray(ends)
    inner = model.model
    head = inner.embed_tokens.as_linear if model.args.tie_word_embeddings else model.lm_head
    for i in range(0, len(ids), step):
        h = inner(mx.array([ids[i:i + step]]), cache=cache)[0]  # normed hidden states
        sel = want[(want >= i) & (want < i + step)] - i
        if len(sel):
            rows.append(head(h[mx.array(sel)]).astype(mx.float32))
        mx.eval(rows[-1:], [c.state for c in cache])
    n = len(ids)
    kv = lambda name: np.stack([np.array(getattr(c, name)[0, :, :n].astype(mx.float32))  # noqa: E731
                                .transpose(0, 2, 1) for c in cache])
    return {"logits": np.array(mx.concatenate(rows)), "k": kv("keys"), "v": kv("values")}


def _peak_rss_gb() -> float:
    """This process' peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e9 if sys.platform == "darwin" else r * 1024 / 1e9


def _gate(name, value, op, threshold, detail) -> dict:
    ok = value < threshold if op == "<" else value >= threshold
    return {"gate": name, "value": value, "op": op, "threshold": threshold, "ok": bool(ok),
            "detail": detail}


def check(model_dir, package, n_tokens: int, context=None, backend: str = "auto",
          mlx_step: int = 512, fp16_tokens: int = 1024, seed: int = 0, log=print,
          prefill_lengths=None) -> dict:
    """Run `n_tokens` of text through the package at `context` (default: its largest) and
    through MLX (fp32, and fp16 over the first `fp16_tokens` for the error model); returns the
    comparison and its gates (see the module docstring). Raises ValueError when the prompt does
    not fit the context."""
    coreml = CoreMLEngine.load(package, model_dir, context=context, backend=backend,
                               prefill_lengths=prefill_lengths)
    if n_tokens > coreml.context:
        raise ValueError(f"{n_tokens} tokens exceed the package's context {coreml.context}")
    ids = prompt_ids(coreml.tokenizer, n_tokens, seed)
    calls = coreml.chunks(n_tokens)
    ends = np.cumsum(calls) - 1  # each call's last position: where the package gives logits

    log(f"package ({coreml.backend}): {n_tokens} tokens as {len(calls)} calls at context "
        f"{coreml.context}")
    tic, state, got, i = time.perf_counter(), coreml.make_cache(), [], 0
    for n in calls:
        got.append(np.array(coreml(mx.array([ids[i:i + n]]), cache=state)[0, -1], np.float32))
        i += n
    coreml_s, coreml_rss = time.perf_counter() - tic, _peak_rss_gb()
    got = np.stack(got)
    kv = state[0].kv
    k = kv.read_state("k_cache")[..., :n_tokens] if hasattr(kv, "read_state") else None
    v = kv.read_state("v_cache")[..., :n_tokens] if hasattr(kv, "read_state") else None
    del state, kv

    log(f"mlx fp32: {n_tokens} tokens in {mlx_step}-token chunks")
    model, _ = load_mlx(model_dir)
    mx.synchronize()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    ref = mlx_prefill(model, ids, ends.tolist(), mlx_step)
    mlx_s, mlx_peak = time.perf_counter() - tic, mx.get_peak_memory() / 1e9

    m16 = min(max(fp16_tokens, int(ends[0]) + 1), n_tokens)  # at least one call's end
    log(f"mlx fp16 (error model): the first {m16} tokens")
    model.set_dtype(mx.float16)
    tic = time.perf_counter()
    e_ends = ends[ends < m16]
    r16 = mlx_prefill(model, ids[:m16], e_ends.tolist(), mlx_step)
    fp16_s = time.perf_counter() - tic
    n_e = len(e_ends)
    e16 = {"logits": taps.compare(r16["logits"], ref["logits"][:n_e]),
           "k_cache": taps.compare(r16["k"], ref["k"][..., :m16]),
           "v_cache": taps.compare(r16["v"], ref["v"][..., :m16])}

    cmp = {"logits": taps.compare(got, ref["logits"])}
    if k is not None:  # MLModel's state is opaque
        cmp["k_cache"], cmp["v_cache"] = taps.compare(k, ref["k"]), taps.compare(v, ref["v"])
    for name, c in cmp.items():
        c["fp16_rel_err"] = e16[name]["rel_err"]
        c["err_ratio"] = c["rel_err"] / max(e16[name]["rel_err"], FP16_UNIT_ROUNDOFF)
    agree = got.argmax(-1) == ref["logits"].argmax(-1)
    kls = taps.kl(ref["logits"], got)
    per_call = [{"call": j, "tokens": int(t), "position": int(p),
                 "rel_err": taps.compare(got[j], ref["logits"][j])["rel_err"],
                 "top1_agree": bool(agree[j]), "kl": float(kls[j])}
                for j, (t, p) in enumerate(zip(calls, ends))]
    gates = [_gate("tap_err_ratio", c["err_ratio"], "<", FP16_GATES["tap_err_ratio"],
                   f"{name}: rel err {c['rel_err']:.3g} vs the fp16 model's {c['fp16_rel_err']:.3g}")
             for name, c in cmp.items()]
    gates += [_gate("top1", float(agree.mean()), ">=", FP16_GATES["top1"],
                    f"over the {len(calls)} calls' last positions"),
              _gate("kl", float(kls.mean()), "<", FP16_GATES["kl"],
                    f"mean KL(mlx || coreml) over the {len(calls)} calls' last positions")]
    return {
        "model": str(model_dir), "package": str(package), "backend": coreml.backend,
        "context": coreml.context, "tokens": n_tokens, "prefill_lengths": sorted(coreml.prefill),
        "calls": {str(t): calls.count(t) for t in sorted(set(calls), reverse=True)},
        "mlx_step": mlx_step, "fp16_tokens": m16, "fp16_positions": n_e,
        **cmp, "fp16_model": e16,
        "top1_agree": bool(agree[-1]), "top1_rate": float(agree.mean()),
        "kl": float(kls[-1]), "kl_mean": float(kls.mean()), "kl_max": float(kls.max()),
        "per_call": per_call, "gates": gates, "ok": all(g["ok"] for g in gates),
        "kv_state": kv_state_bytes(package),
        "seconds": {"coreml": coreml_s, "coreml_load": coreml.load_s, "mlx": mlx_s,
                    "mlx_fp16": fp16_s},
        "peak_memory_gb": {"coreml_process_rss": coreml_rss, "mlx": mlx_peak},
    }


def markdown(r: dict) -> str:
    kv = r["kv_state"]
    verdict = "PASS" if r["ok"] else "FAIL: " + ", ".join(g["gate"] for g in r["gates"] if not g["ok"])
    lines = [f"Long prompt: {r['tokens']} tokens at context {r['context']} through "
             f"{Path(r['package']).name} ({r['backend']}): calls {r['calls']}: {verdict}", "",
             f"| vs MLX fp32 | rel err | fp16 model's rel err (first {r['fp16_tokens']} tokens) "
             "| ratio | cosine | max abs err |", "|---|---|---|---|---|---|"]
    for name in ("logits", "k_cache", "v_cache"):
        m = r.get(name)
        if m:
            lines.append(f"| {name}{' (every call)' if name == 'logits' else ''} | "
                         f"{m['rel_err']:.2e} | {m['fp16_rel_err']:.2e} | {m['err_ratio']:.2f} | "
                         f"{m['cosine']:.6f} | {m['max_abs_err']:.3g} |")
    worst = max(r["per_call"], key=lambda c: c["rel_err"])
    s, mem = r["seconds"], r["peak_memory_gb"]
    lines += ["", f"Every call's last logits: top-1 agreement {r['top1_rate']:.3f}, KL(mlx || "
              f"coreml) mean {r['kl_mean']:.2e}, max {r['kl_max']:.2e} nats; worst call "
              f"{worst['call']} ({worst['tokens']} tokens ending at {worst['position']}): rel err "
              f"{worst['rel_err']:.2e}. Last position: top-1 agrees {r['top1_agree']}, "
              f"KL {r['kl']:.2e}.", "",
              "| gate | value | threshold | result | detail |", "|---|---|---|---|---|"]
    lines += [f"| {g['gate']} | {g['value']:.3g} | {g['op']} {g['threshold']:g} | "
              f"{'pass' if g['ok'] else '**FAIL**'} | {g['detail']} |" for g in r["gates"]]
    lines += ["", f"Wall time: package {s['coreml']:.0f} s (load {s['coreml_load']:.0f} s), MLX "
              f"fp32 {s['mlx']:.0f} s, MLX fp16 {s['mlx_fp16']:.0f} s. Peak memory: package run "
              f"{mem['coreml_process_rss']:.2f} GB (process RSS), MLX {mem['mlx']:.2f} GB.", "",
              "| context | KV state shape (x2) | KV bytes |", "|---|---|---|"]
    lines += [f"| {c} | {s['shape']} | {s['bytes'] / 2**20:.1f} MiB |" for c, s in kv.items()]
    return "\n".join(lines) + "\n"
