"""Size, memory and decode-speed ceiling of a student, from its config alone (no weights).

    mlx_student.info --config configs/worker_9b.yaml [--json]

Everything is arithmetic on the config: mlx is not imported and no model is built, so even a
9B config answers at once. The parameter list mirrors mlx_lm.models.llama.Model exactly.
"""

import argparse
import json
import sys

from .config import ConfigError, StudentConfig, load_config

GB = 1e9  # decimal gigabyte, as bandwidths are quoted

# Weight formats. The exporter must write these exact layouts for the numbers to hold.
FP16_BYTES = 2
INT8_BYTES = 1  # per-output-channel symmetric: one fp16 scale per output row
INT4_BYTES = 0.5  # block-wise symmetric: one fp16 scale per INT4_GROUP inputs of a row
INT4_GROUP = 32
SCALE_BYTES = 2  # scales are fp16; 1-D norm weights stay fp16 in every format
FORMATS = {
    "fp16": "fp16, 2 bytes/param",
    "int8": "int8 per-output-channel symmetric, fp16 scale per row; norms fp16",
    "int4": f"int4 block-wise symmetric, group {INT4_GROUP} along the input axis, "
    "fp16 scale per group; norms fp16",
}

# Apple M1 Max memory bandwidth: GPU 400 GB/s (Apple's figure), ANE ~55 GB/s (anemll-bench).
GPU_GBPS = 400.0
ANE_GBPS = 55.0
DEVICES = {"gpu": GPU_GBPS, "ane": ANE_GBPS}


def matrices(c: StudentConfig) -> dict:
    """The 2-D weights: name -> (out rows, in cols, how many). Embedding rows are the vocab."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, i, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    m = {
        "embed_tokens": (c.vocab_size, h, 1),
        "q_proj": (q, h, L),
        "k_proj": (kv, h, L),
        "v_proj": (kv, h, L),
        "o_proj": (h, q, L),
        "gate_proj": (i, h, L),
        "up_proj": (i, h, L),
        "down_proj": (h, i, L),
    }
    if not c.tie_word_embeddings:
        m["lm_head"] = (c.vocab_size, h, 1)
    return m


def vectors(c: StudentConfig) -> dict:
    """The 1-D weights (RMSNorm scales): name -> (size, how many)."""
    L = c.num_hidden_layers
    return {
        "input_layernorm": (c.hidden_size, L),
        "post_attention_layernorm": (c.hidden_size, L),
        "norm": (c.hidden_size, 1),
    }


def parameters(c: StudentConfig) -> dict:
    """Exact parameter count with its breakdown."""
    m, v = matrices(c), vectors(c)
    size = {k: r * n for k, (r, n, _) in m.items()}
    attention = sum(size[k] for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(size[k] for k in ("gate_proj", "up_proj", "down_proj"))
    norms = v["input_layernorm"][0] + v["post_attention_layernorm"][0]
    out = {
        "embedding": size["embed_tokens"],
        "per_layer": {"attention": attention, "mlp": mlp, "norms": norms,
                      "total": attention + mlp + norms},
        "layers": c.num_hidden_layers,
        "final_norm": v["norm"][0],
        "lm_head": size.get("lm_head", 0),
        "tie_word_embeddings": c.tie_word_embeddings,
    }
    out["total"] = (out["embedding"] + out["layers"] * out["per_layer"]["total"]
                    + out["final_norm"] + out["lm_head"])
    return out


def matrix_bytes(rows: int, cols: int, fmt: str) -> int:
    """Bytes of one rows x cols weight (rows = outputs, cols = inputs) in a format."""
    if fmt == "fp16":
        return rows * cols * FP16_BYTES
    if fmt == "int8":
        return rows * cols * INT8_BYTES + rows * SCALE_BYTES
    if fmt == "int4":
        groups = -(-cols // INT4_GROUP)
        return rows * (-(-cols // 2)) + rows * groups * SCALE_BYTES
    raise ValueError(f"unknown format {fmt!r}")


def weight_bytes(c: StudentConfig, fmt: str, decode: bool = False) -> int:
    """All weight bytes in `fmt`. decode=True: the bytes one decode step reads, i.e. without
    the input embedding table when it is untied (only one row of it is read per token)."""
    total = sum(n * size * FP16_BYTES for size, n in vectors(c).values())
    for name, (rows, cols, n) in matrices(c).items():
        if decode and name == "embed_tokens" and not c.tie_word_embeddings:
            continue
        total += n * matrix_bytes(rows, cols, fmt)
    return total


def kv_bytes(c: StudentConfig, context: int) -> int:
    """fp16 K and V cache of every layer at `context` tokens, batch 1."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context * FP16_BYTES


def tokens_per_s(bytes_per_token: float, gbps: float) -> float:
    """Bandwidth-only ceiling of decode speed."""
    return gbps * GB / bytes_per_token


def info(c: StudentConfig) -> dict:
    params = parameters(c)
    formats = {}
    for fmt, desc in FORMATS.items():
        b = weight_bytes(c, fmt)
        formats[fmt] = {"description": desc, "bytes": b, "bytes_per_param": b / params["total"],
                        "decode_bytes": weight_bytes(c, fmt, decode=True)}
    decode = []
    for ctx in c.contexts:
        kv = kv_bytes(c, ctx)
        per_token = {fmt: f["decode_bytes"] + kv for fmt, f in formats.items()}
        decode.append({
            "context": ctx,
            "kv_bytes": kv,
            "bytes_per_token": per_token,
            "tokens_per_s": {d: {fmt: tokens_per_s(b, g) for fmt, b in per_token.items()}
                             for d, g in DEVICES.items()},
        })
    return {"role": c.role, "parameters": params, "formats": formats,
            "bandwidth_gbps": {"gpu": GPU_GBPS, "ane": ANE_GBPS,
                               "source": "Apple M1 Max: GPU per Apple, ANE as measured by anemll-bench"},
            "decode": decode}


def human_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def report(path, d: dict) -> str:
    p, pl = d["parameters"], d["parameters"]["per_layer"]
    gb = lambda b: f"{b:>16,} bytes {b / GB:8.2f} GB"  # noqa: E731
    row = lambda name, n: f"  {name:<28}{n:>16,}"  # noqa: E731
    lines = [f"{path} (role {d['role']})", "",
             f"Parameters: {p['total']:,} ({human_count(p['total'])})",
             row("embedding", p["embedding"]),
             row(f"per layer x {p['layers']}", pl["total"]),
             row("  attention (q,k,v,o)", pl["attention"]),
             row("  mlp (gate,up,down)", pl["mlp"]),
             row("  norms (2 RMSNorm)", pl["norms"]),
             row(f"all {p['layers']} layers", p["layers"] * pl["total"]),
             row("final norm", p["final_norm"]),
             row("lm head", p["lm_head"]) if p["lm_head"] else "  lm head: tied to embedding",
             "", "Weights (1 GB = 1e9 bytes):"]
    for fmt, f in d["formats"].items():
        lines.append(f"  {fmt:<8}{gb(f['bytes'])}  {f['bytes_per_param']:6.4f} bytes/param"
                     f"  ({f['description']})")
    lines += ["", "KV cache (fp16 K and V, batch 1):"]
    lines += [f"  ctx {r['context']:<6}{gb(r['kv_bytes'])}" for r in d["decode"]]
    bw = d["bandwidth_gbps"]
    lines += ["", f"Decode tokens/s ceiling, {bw['source']}: GPU {bw['gpu']:g} GB/s, "
              f"ANE {bw['ane']:g} GB/s",
              "Upper bounds (bandwidth only): per token, every weight multiplied + the whole KV "
              "cache read once" + ("" if d["parameters"]["tie_word_embeddings"] else
                                   "; the untied input embedding is not counted (one row)."),
              f"  {'ctx':>6}" + "".join(f"{f'{dev.upper()} {fmt}':>11}"
                                         for dev in DEVICES for fmt in FORMATS)]
    for r in d["decode"]:
        lines.append(f"  {r['context']:>6}" + "".join(
            f"{r['tokens_per_s'][dev][fmt]:>11.1f}" for dev in DEVICES for fmt in FORMATS))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx_student.info",
        description="Parameters, weight and KV-cache bytes, and the M1 Max decode-speed "
        "ceiling of a student config (arithmetic only, no weights allocated).")
    parser.add_argument("--config", required=True, help="student YAML config")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    d = info(config)
    if args.json:
        print(json.dumps({"config": args.config, **d}, indent=2))
    else:
        print(report(args.config, d))


if __name__ == "__main__":
    main()
