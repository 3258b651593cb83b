"""Generation benchmark of the MLX engine, with mlx_lm.generate as the peer in the same run.

    mlx_student.bench --model runs/pilot [--prompt-lengths 32 128 512] [--decode-tokens 100]
                      [--reps 3] [--draft-bits 4] [--contexts 4096 16384] [--out artifacts/bench]

Measures, for one checkpoint: load time (first load in the process = cold, second = warm), time
to first token at several prompt lengths, decode tokens/s over --decode-tokens tokens, peak
memory, the bandwidth roofline (bytes read per decoded token / memory bandwidth) and the %
achieved, our engine vs mlx_lm.generate (same prompt, same tokens, interleaved, median of
--reps), the JSON-schema constrained-decoding overhead per token, and optionally speculative
decoding with a quantized self-drafter; with --contexts, per context (the prompt filling it)
TTFT, decode tokens/s, peak memory, KV-cache bytes and the time to a valid tool call, against the
seed's gates (runtime/context_bench.py). Writes bench.json, bench.md and bench.png.

Bandwidth: on Linux the ceiling uses this machine's bandwidth measured in the same run (a
large MLX reduction); the M1 Max ceilings of mlx_student.info (GPU 400 GB/s, ANE 55 GB/s) are
listed for the student's fp16/int8/int4 formats. The CoreML engine (runtime/coreml_engine.py) is
not timed here: its speed is MLModel.predict on the ANE / GPU compute units, which needs macOS;
elsewhere it runs the reference MIL executor, for correctness only (mlx_student.probe).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten

from mlx_student.config import ConfigError
from mlx_student.files import write_json_atomic

from . import context_bench
from .constrained import engine_vocab, json_schema_processor, tool_call_schema
from .generate import GenerationParams, MLXEngine, generate
from .speculative import generate_speculative, quantized_drafter

DEFAULTS = {"prompt_lengths": [32, 128, 512], "decode_tokens": 100, "reps": 3, "out": "artifacts/bench"}

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"type": "string", "enum": ["c", "f"]},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 4}},
    "required": ["city", "days"], "additionalProperties": False}}}


def no_eos(eos_ids):
    """Logits processor banning EOS, so every run decodes exactly the asked number of tokens
    (given to our engine and to mlx_lm.generate alike)."""
    ids = mx.array(sorted(eos_ids))

    def proc(tokens, logits):
        logits[..., ids] = -mx.inf
        return logits
    return proc


def median(f, reps):
    return statistics.median(f() for _ in range(reps))


def timed(f):
    tic = time.perf_counter()
    f()
    return time.perf_counter() - tic


def bandwidth_gbps(mb: int = 256, reps: int = 5) -> float:
    """Weight-read bandwidth MLX reaches here in decode's own op: a matrix-vector product over
    an `mb` MB fp32 matrix (best of `reps`)."""
    w = mx.random.uniform(shape=(mb * (1 << 20) // 4 // 4096, 4096))
    v = mx.random.uniform(shape=(4096, 1))
    mx.eval(w, v)
    best = min(timed(lambda: mx.eval(w @ v)) for _ in range(reps))
    return w.nbytes / best / 1e9


def decode_bytes(engine, context: int) -> int:
    """Bytes one decode step reads: every weight (the loaded dtype; an untied input embedding
    reads one row only) plus the whole KV cache at `context` tokens in the model's dtype."""
    params = tree_flatten(engine.model.parameters())
    args = engine.model.args
    total = 0
    for name, w in params:
        if name.endswith("embed_tokens.weight") and not args.tie_word_embeddings:
            total += w.nbytes // w.shape[0]
        else:
            total += w.nbytes
    itemsize = params[0][1].dtype.size
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return total + 2 * args.num_hidden_layers * args.num_key_value_heads * head_dim * context * itemsize


def prompt_of(tokenizer, n: int):
    text = ("The quick brown fox jumps over the lazy dog while the river keeps running past the old "
            "mill and the town wakes up. ") * (n // 8 + 8)
    return tokenizer.encode(text, add_special_tokens=False)[:n]


def student_ceilings(path):
    try:
        from mlx_student.config import StudentConfig
        from mlx_student.info import info
        config = json.loads((Path(path) / "config.json").read_text())
        if "student" not in config:
            return None
        d = info(StudentConfig.from_mlx_config(config))
        return [{"context": r["context"], "tokens_per_s": r["tokens_per_s"]} for r in d["decode"]]
    except Exception as e:  # a folder that is not a student: no M1 Max table
        return {"error": str(e)}


def run(args) -> dict:
    mx.random.seed(0)
    res = {"model": str(args.model), "platform": f"{platform.system()} {platform.machine()}",
           "device": str(mx.default_device()), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}
    engine = MLXEngine.load(args.model)
    res["load_s"] = {"cold": engine.load_s, "warm": MLXEngine.load(args.model).load_s}
    tok, model = engine.tokenizer, engine.model
    eos = no_eos(tok.eos_token_ids)
    n = args.decode_tokens
    params = GenerationParams(max_tokens=n)

    # warm-up
    generate(engine, prompt_of(tok, 16), GenerationParams(max_tokens=8))

    ttft = {}
    for length in args.prompt_lengths:
        p = prompt_of(tok, length)
        ttft[length] = median(lambda: generate(engine, p, GenerationParams(max_tokens=1)).ttft_s, args.reps)
    res["ttft_s"] = ttft

    # ours vs mlx_lm.generate: same prompt, same n tokens, interleaved
    prompt = prompt_of(tok, args.prompt_lengths[0])
    ours_t, theirs_t, ours_tps, theirs_tps = [], [], [], []
    mx.reset_peak_memory()

    def ours():
        tic = time.perf_counter()
        out = generate(engine, prompt, params, logits_processors=[eos])
        ours_t.append(time.perf_counter() - tic)
        ours_tps.append(out.decode_tps)
        assert len(out.tokens) == n

    def theirs():
        tic, first = time.perf_counter(), None
        for i, _ in enumerate(mlx_lm.stream_generate(model, tok, prompt, max_tokens=n, logits_processors=[eos])):
            if i == 0:
                first = time.perf_counter()
        end = time.perf_counter()
        theirs_t.append(end - tic)
        theirs_tps.append((n - 1) / (end - first))  # the same definition as ours

    for rep in range(args.reps):
        for f in ((ours, theirs) if rep % 2 == 0 else (theirs, ours)):
            f()
    res["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    res["decode_tokens"] = n
    res["decode_tps"] = {"ours": statistics.median(ours_tps), "mlx_lm": statistics.median(theirs_tps)}
    res["generate_s"] = {"ours": statistics.median(ours_t), "mlx_lm": statistics.median(theirs_t)}
    # >1: we are faster. Min over runs is the least disturbed run on a shared machine; median too.
    res["ratio_vs_mlx_lm"] = min(theirs_t) / min(ours_t)
    res["ratio_vs_mlx_lm_median"] = res["generate_s"]["mlx_lm"] / res["generate_s"]["ours"]

    # roofline
    bw = bandwidth_gbps()
    context = len(prompt) + n // 2
    b = decode_bytes(engine, context)
    ceiling = bw * 1e9 / b
    res["roofline"] = {"bytes_per_token": b, "context": context, "bandwidth_gbps_measured": bw,
                       "ceiling_tps": ceiling, "achieved_pct": 100 * res["decode_tps"]["ours"] / ceiling,
                       "m1_max_ceilings_tps": student_ceilings(args.model)}

    # constrained decoding overhead: same number of tokens with and without the grammar
    schema = tool_call_schema([TOOL])
    cons, free, busy = [], [], []
    for rep in range(args.reps * 4):
        proc = json_schema_processor(tok, schema, engine_vocab(engine))
        gp = GenerationParams(max_tokens=120, temperature=1.0, seed=rep)
        c = generate(engine, prompt, gp, logits_processors=[proc])
        k = len(c.tokens)
        u = generate(engine, prompt, GenerationParams(max_tokens=k, temperature=1.0, seed=rep),
                     logits_processors=[eos])
        if k > 4:
            cons.append(1 / c.decode_tps)
            free.append(1 / u.decode_tps)
            busy.append(proc.busy_s / proc.calls)
    cm, fm, bm = statistics.median(cons), statistics.median(free), statistics.median(busy)
    pairs = sorted(c / f for c, f in zip(cons, free))
    res["constrained"] = {"overhead_pct_min_pair": 100 * (pairs[0] - 1),
                          "overhead_pct_median_pair": 100 * (statistics.median(pairs) - 1),
                          "ms_per_token": cm * 1e3, "unconstrained_ms_per_token": fm * 1e3,
                          "overhead_pct": 100 * (cm - fm) / fm, "runs": len(cons), "engine": "llguidance",
                          "grammar_ms_per_token": bm * 1e3, "grammar_pct": 100 * bm / fm}

    if args.draft_model or args.draft_bits:
        if args.draft_model:
            drafter, name = MLXEngine.load(args.draft_model), str(args.draft_model)
        else:
            drafter, name = quantized_drafter(args.model, bits=args.draft_bits), f"self, {args.draft_bits}-bit"
        chat = tok.apply_chat_template([{"role": "user", "content": "Explain how a bicycle works."}],
                                       add_generation_prompt=True)
        greedy = GenerationParams(max_tokens=n)
        g = generate(engine, chat, greedy)
        spec = {}
        for k in args.draft_k:
            sp = GenerationParams(max_tokens=n, num_draft_tokens=k)
            generate_speculative(engine, drafter, chat, GenerationParams(max_tokens=8, num_draft_tokens=k))
            t_spec, t_greedy = [], []
            for _ in range(args.reps):
                tic = time.perf_counter()
                out, stats = generate_speculative(engine, drafter, chat, sp)
                t_spec.append(time.perf_counter() - tic)
                t_greedy.append(timed(lambda: generate(engine, chat, greedy)))
            spec[k] = {"acceptance": stats.acceptance, "tokens_per_target_pass": stats.tokens_per_round,
                       "speedup": statistics.median(t_greedy) / statistics.median(t_spec),
                       "exact": out.tokens == g.tokens, "tokens": len(out.tokens)}
        res["speculative"] = {"drafter": name, "by_k": spec}
    if args.contexts:
        res["contexts"] = context_bench.per_context(engine, args.contexts, n, prompt_of, no_eos, TOOL)
    res["coreml"] = ("not timed: CoreML speed is MLModel.predict on the ANE / GPU, which needs macOS; "
                     "elsewhere the CoreML engine runs the reference MIL executor, for correctness "
                     "only (mlx_student.probe)")
    return res


def markdown(r: dict) -> str:
    rf = r["roofline"]
    lines = [f"# Generation bench: `{r['model']}` ({r['platform']}, {r['device']}, mlx {r['mlx']}, "
             f"mlx-lm {r['mlx_lm']})", "",
             "| metric | value |", "|---|---|",
             f"| load cold / warm | {r['load_s']['cold']:.2f} s / {r['load_s']['warm']:.2f} s |"]
    for length, t in r["ttft_s"].items():
        lines.append(f"| TTFT, prompt {length} | {t * 1e3:.1f} ms |")
    lines += [
        f"| decode ({r['decode_tokens']} tokens), ours | {r['decode_tps']['ours']:.1f} tokens/s |",
        f"| decode, mlx_lm.generate | {r['decode_tps']['mlx_lm']:.1f} tokens/s |",
        f"| **ours vs mlx_lm.generate (wall clock, same tokens; min / median of runs)** | "
        f"**{r['ratio_vs_mlx_lm']:.3f}x** / {r['ratio_vs_mlx_lm_median']:.3f}x |",
        f"| peak memory | {r['peak_memory_gb'] * 1e3:.0f} MB |",
        f"| bytes per token (weights + KV at ctx {rf['context']}) | {rf['bytes_per_token'] / 1e6:.1f} MB |",
        f"| measured bandwidth | {rf['bandwidth_gbps_measured']:.1f} GB/s |",
        f"| roofline ceiling / achieved | {rf['ceiling_tps']:.1f} tokens/s / {rf['achieved_pct']:.0f} % |",
        f"| constrained (llguidance) per token | {r['constrained']['ms_per_token']:.2f} ms vs "
        f"{r['constrained']['unconstrained_ms_per_token']:.2f} ms (medians): **{r['constrained']['overhead_pct']:+.1f} %** "
        f"end to end (median of paired runs {r['constrained']['overhead_pct_median_pair']:+.1f} %); grammar + mask work {r['constrained']['grammar_ms_per_token']:.3f} ms/token "
        f"= {r['constrained']['grammar_pct']:.1f} % |",
    ]
    for k, s in (r.get("speculative") or {}).get("by_k", {}).items():
        lines.append(f"| speculative k={k} ({r['speculative']['drafter']}) | acceptance "
                     f"{s['acceptance']:.2f}, {s['tokens_per_target_pass']:.2f} tokens/pass, speedup "
                     f"{s['speedup']:.2f}x, exact {s['exact']} |")
    lines += [f"| CoreML engine | {r['coreml']} |"]
    if r.get("contexts"):
        lines += context_bench.markdown(r["contexts"])
    m1 = rf.get("m1_max_ceilings_tps")
    if isinstance(m1, list):
        lines += ["", "M1 Max decode ceilings (mlx_student.info, bandwidth only, tokens/s):", "",
                  "| context | GPU fp16 | GPU int8 | GPU int4 | ANE fp16 | ANE int8 | ANE int4 |",
                  "|---|---|---|---|---|---|---|"]
        for row in m1:
            t = row["tokens_per_s"]
            lines.append(f"| {row['context']} | " + " | ".join(
                f"{t[d][f]:.0f}" for d in ("gpu", "ane") for f in ("fp16", "int8", "int4")) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    lengths = list(r["ttft_s"])
    a.plot(lengths, [r["ttft_s"][k] * 1e3 for k in lengths], "o-")
    a.set(xlabel="prompt tokens", ylabel="TTFT (ms)", title="time to first token")
    names = ["ours", "mlx_lm", "ceiling"]
    b.bar(names, [r["decode_tps"]["ours"], r["decode_tps"]["mlx_lm"], r["roofline"]["ceiling_tps"]])
    b.set(ylabel="tokens/s", title="decode")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def build_parser():
    p = argparse.ArgumentParser(description="Benchmark generation with the MLX engine against "
                                "mlx_lm.generate in the same run; writes bench.json, bench.md and "
                                "bench.png under --out.")
    p.add_argument("--model", required=True, help="mlx-lm model folder")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=DEFAULTS["prompt_lengths"],
                   metavar="N", help="prompt lengths (tokens) timed for time to first token; the "
                   "first is also the prompt of the decode and constrained rows (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=DEFAULTS["decode_tokens"], metavar="N",
                   help="tokens decoded per timed run, EOS banned (default: %(default)s)")
    p.add_argument("--reps", type=int, default=DEFAULTS["reps"], metavar="N",
                   help="timed repetitions per row; the median is reported (default: %(default)s)")
    p.add_argument("--draft-model", help="drafter folder (same tokenizer) for the speculative rows")
    p.add_argument("--draft-bits", type=int, default=0, help="or: a quantized copy of --model as "
                   "drafter, at these bits (default: %(default)s, off)")
    p.add_argument("--draft-k", type=int, nargs="+", default=[2, 4], metavar="K",
                   help="draft tokens per speculative round, one row each (default: %(default)s)")
    p.add_argument("--contexts", type=int, nargs="+", help="also measure with the prompt filling "
                   "each of these contexts (e.g. 4096 16384), gated by the seed's limits")
    p.add_argument("--out", default=DEFAULTS["out"],
                   help="output folder (default: %(default)s)")
    return p


def check_args(args):
    """Raise ConfigError naming each bad flag."""
    bad = [f"--{k.replace('_', '-')}: must be integers >= 1, got {v}" for k, v in (
        ("prompt_lengths", args.prompt_lengths), ("decode_tokens", [args.decode_tokens]),
        ("reps", [args.reps]), ("draft_k", args.draft_k)) if min(v) < 1]
    if args.draft_bits not in (0, 2, 3, 4, 5, 6, 8):
        bad.append(f"--draft-bits: {args.draft_bits} is not 0 (off) or 2, 3, 4, 5, 6, 8")
    if bad:
        raise ConfigError("\n".join(bad))


def bench(argv=None) -> dict:
    """mlx_student.bench without the exit: check the flags, run, write bench.json, bench.md and
    bench.png under --out, print the table; returns the result (bench.json's content). Raises
    ConfigError naming a bad flag or model folder."""
    args = build_parser().parse_args(argv)
    check_args(args)
    r = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench.json", r)
    md = markdown(r)
    (out / "bench.md").write_text(md)
    plot(r, out / "bench.png")
    print(md)
    return r


def main(argv=None):
    try:
        bench(argv)
    except ConfigError as e:  # hf_config.FolderConfigError too: a folder named by file and key
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
