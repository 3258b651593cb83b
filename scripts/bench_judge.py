"""Judge decision latency on MLX: p50 / p95 of one compare (two candidates) at --length tokens.

    python scripts/bench_judge.py [--judge runs/judge] [--length 512] [--repeats 50]

Without --judge it builds a pilot-size judge (configs/pilot.yaml backbone, the teacher's
tokenizer, fresh heads): the latency depends on the shapes, not on the weights. Rows:

  judge compare     judge(ids (2, T)) -> two scores and clause logits: one decision
  judge compiled    the same through mx.compile (shapes fixed per length)
  judge score x1    one candidate (1, T)
  mlx-lm forward    the peer: the same backbone as mlx_lm runs it, LM head on all T positions
                    (what a generative LLM-as-a-judge pays for its prompt before any token)
  HTTP compare      POST /v1/judge/compare on loopback (arbiter/judge/serve.py, text in)

Each timing is one call with mx.eval, after warm-up; ratios are against the mlx-lm forward of
one candidate measured in the same run. Goal (issue 16): decision p95 < 50 ms at 512 tokens.
"""

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_student  # noqa: E402,F401  (first: OpenBLAS on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from arbiter.judge import model as judge_model  # noqa: E402


def pilot_judge(tokenizer):
    from mlx_student import model as student_model
    from mlx_student.config import load_config

    config = load_config(ROOT / "configs/pilot.yaml")
    return judge_model.build(config, student_model.build(config, seed=0),
                             judge_model.JudgeSpec(max_length=max(config.contexts))), config


def percentiles(fn, repeats, warmup=3) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "mean_ms": float(np.mean(times))}


def http_compare(judge, tokenizer, texts, repeats):
    import httpx

    from arbiter.judge.serve import JudgeServer

    server = JudgeServer(judge, tokenizer, {"port": 0})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    body = {"prompt": texts[0], "a": texts[1], "b": texts[2]}
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=60) as c:
            return percentiles(lambda: c.post("/v1/judge/compare", json=body).raise_for_status(), repeats)
    finally:
        server.shutdown()
        server.server_close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--judge", help="judge checkpoint (default: a fresh pilot-size judge)")
    p.add_argument("--length", type=int, default=512, help="tokens per candidate")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from mlx_lm.utils import load_tokenizer

    if args.judge:
        judge, tokenizer, config = judge_model.load(args.judge)
    else:
        tokenizer = load_tokenizer(ROOT / "models/smollm2-135m-instruct")
        judge, config = pilot_judge(tokenizer)
    T = args.length
    rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(0, config.vocab_size, (2, T)), dtype=mx.int32)
    lengths = mx.array([T, T], dtype=mx.int32)
    compiled = mx.compile(judge)
    backbone = judge.backbone
    params = sum(v.size for _, v in tree_flatten(judge.parameters()))
    print(f"judge: {params / 1e6:.1f}M parameters ({config.num_hidden_layers} layers x "
          f"{config.hidden_size}), {T} tokens per candidate, {args.repeats} repeats\n")
    print(f"| {'path':22} | p50 ms | p95 ms | p50 / mlx-lm forward x1 |")
    print("|---|---|---|---|", flush=True)
    text = (ROOT / "data/stdlib/valid.jsonl").read_text()
    words = " ".join(json.loads(x)["text"] for x in text.splitlines()).split()
    chunk = lambda i: " ".join(words[i * T // 2:(i + 1) * T // 2])  # noqa: E731  ~T/2 words each
    paths = {
        "mlx-lm forward x1": lambda: percentiles(lambda: mx.eval(backbone(ids[:1])), args.repeats),
        "judge score x1": lambda: percentiles(lambda: mx.eval(judge(ids[:1], lengths[:1])), args.repeats),
        "judge compare": lambda: percentiles(lambda: mx.eval(judge(ids, lengths)), args.repeats),
        "judge compiled": lambda: percentiles(lambda: mx.eval(compiled(ids, lengths)), args.repeats),
        "HTTP compare (text)": lambda: http_compare(judge, tokenizer, [chunk(0), chunk(1), chunk(2)],
                                                    args.repeats),
    }
    rows = {}
    for name, measure in paths.items():  # the peer first: every ratio is against it
        r = rows[name] = measure()
        peer = rows["mlx-lm forward x1"]["p50_ms"]
        print(f"| {name:22} | {r['p50_ms']:6.1f} | {r['p95_ms']:6.1f} | {r['p50_ms'] / peer:5.2f} |",
              flush=True)
    goal = rows["judge compiled"]["p95_ms"]
    print(f"\ndecision p95 (compiled, 2 x {T} tokens): {goal:.1f} ms; goal < 50 ms: "
          f"{'met' if goal < 50 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"length": T, "parameters": params, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
