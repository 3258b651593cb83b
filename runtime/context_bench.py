"""Per-context rows of mlx_student.bench: TTFT, decode tokens/s, peak memory and time to the first
valid tool call (the seed system's TTFA) with the prompt filling each context, the KV-cache bytes
per context from the config, and the seed's gates.

Seed gates (M1 Max, the worker): at 4k TTFT <= 2 s, >= 25 tokens/s, peak memory <= 12 GB; at
16k TTFT <= 3 s, >= 15 tokens/s, peak memory <= 28 GB. Speed gates are about Apple silicon: on
another platform they read "needs macOS" beside the measured number; memory is MLX's own
accounting (mx.get_peak_memory) of the same arrays on every platform, so it is gated anywhere.
"""

import json
import sys
import time

import jsonschema
import mlx.core as mx

from .constrained import engine_vocab, json_schema_processor, tool_call_schema
from .generate import GenerationParams, generate

SEED_GATES = {
    4096: {"ttft_s": ("<=", 2.0), "decode_tps": (">=", 25.0), "peak_memory_gb": ("<=", 12.0)},
    16384: {"ttft_s": ("<=", 3.0), "decode_tps": (">=", 15.0), "peak_memory_gb": ("<=", 28.0)},
}
SPEED = ("ttft_s", "decode_tps")
TTFA_TOKENS = 120  # the tool call's budget; its prompt fills the context but for these


def kv_cache_bytes(args, context: int, itemsize: int = 2) -> int:
    """K and V of every layer at `context` tokens: 2 x layers x KV heads x head_dim x context x
    itemsize (2 for fp16, the exported state's and mlx-lm's fp16 cache)."""
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return 2 * args.num_hidden_layers * args.num_key_value_heads * head_dim * context * itemsize


def gate_rows(row: dict, gates: dict, darwin: bool) -> list:
    out = []
    for name, (op, limit) in gates.items():
        v = row[name]
        ok = v <= limit if op == "<=" else v >= limit
        status = "needs macOS" if name in SPEED and not darwin else ("pass" if ok else "fail")
        out.append({"metric": name, "op": op, "limit": limit, "value": v, "status": status})
    return out


def ttfa(engine, prompt: list, tool: dict, max_tokens: int = TTFA_TOKENS) -> dict:
    """Time and tokens from the request to a complete tool call that validates against the
    tool's schema, decoding under the JSON-schema grammar (runtime/constrained.py)."""
    tok = engine.tokenizer
    proc = json_schema_processor(tok, tool_call_schema([tool]), engine_vocab(engine))
    tic = time.perf_counter()
    out = generate(engine, prompt, GenerationParams(max_tokens=max_tokens), logits_processors=[proc])
    seconds = time.perf_counter() - tic
    try:
        call = json.loads(out.text)
        jsonschema.validate(call["arguments"], tool["function"]["parameters"])
        valid = call["name"] == tool["function"]["name"]
    except (ValueError, KeyError, TypeError, jsonschema.ValidationError):
        valid = False
    return {"seconds": seconds, "tokens": len(out.tokens), "valid": valid,
            "finish_reason": out.finish_reason}


def per_context(engine, contexts, decode_tokens: int, prompt_of, no_eos, tool, gates=None) -> list:
    """One row per context: the prompt fills the context but for the decoded tokens."""
    gates = SEED_GATES if gates is None else gates
    darwin = sys.platform == "darwin"
    tok, args = engine.tokenizer, engine.model.args
    rows = []
    for S in contexts:
        prompt = prompt_of(tok, S - decode_tokens)
        mx.synchronize()
        mx.reset_peak_memory()
        out = generate(engine, prompt, GenerationParams(max_tokens=decode_tokens),
                       logits_processors=[no_eos(tok.eos_token_ids)])
        row = {"context": S, "prompt_tokens": len(prompt), "ttft_s": out.ttft_s,
               "decode_tps": out.decode_tps, "decode_tokens": len(out.tokens),
               "peak_memory_gb": mx.get_peak_memory() / 1e9,
               "kv_cache_bytes_fp16": kv_cache_bytes(args, S, 2)}
        row["ttfa"] = ttfa(engine, prompt_of(tok, S - TTFA_TOKENS), tool, TTFA_TOKENS)
        row["gates"] = gate_rows(row, gates.get(S, {}), darwin)
        rows.append(row)
    return rows


def markdown(rows: list) -> list:
    lines = ["", "Per context (the prompt fills the context; TTFA: a valid tool call under the grammar):", "",
             "| context | TTFT | decode | peak memory | KV cache (fp16) | TTFA | gates |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["ttfa"]
        g = ", ".join(f"{x['metric']} {x['op']} {x['limit']:g}: {x['status']}" for x in r["gates"]) or "-"
        lines.append(f"| {r['context']} | {r['ttft_s']:.2f} s | {r['decode_tps']:.1f} tok/s | "
                     f"{r['peak_memory_gb']:.2f} GB | {r['kv_cache_bytes_fp16'] / 2**20:.0f} MiB | "
                     f"{t['seconds']:.2f} s, {t['tokens']} tokens, valid {t['valid']} | {g} |")
    return lines
