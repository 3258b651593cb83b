"""Training throughput: our trainer vs mlx-lm's trainer vs PyTorch eager, one model, one batch.

Four steps on the same architecture, batch and sequence length, each in its own process (so
peak memory is its own):
  (a) ours, CE                     mlx_student.trainer.train, loss {ce: 1}
  (b) ours, top-k KD               loss {ce: 0.5, topk_kd: 0.5}, K = --topk teacher entries
  (c) mlx-lm                       mlx_lm.tuner.trainer.train, full fine-tune, default loss
  (d) PyTorch eager (CPU)          transformers LlamaForCausalLM + torch.optim.AdamW
Each reports tokens/s (median step after warm-up), MFU (model FLOP/s over the same backend's
measured f32 matmul peak) and peak resident memory.

Only the positions that count (TrainingArgs.counted_positions), top-k KD {ce: 0.5, topk_kd: 0.5}
on real record layouts, the LM head at every position vs only where the loss counts:
  (e, f) tool traces               mlx_student.tools gold traces (tool schemas in the prompt,
                                   every assistant turn in the loss), top-k at every loss token
  (g, h) KD records                the KD mix's prompts (stdlib explain / complete / fix) with
                                   48-token completions and their top-k (the pilot's layout)
The teacher's top-k values are random (the step's cost does not depend on them); sequences
are at most --layout-seq tokens. These rows report tokens/s over the real (unpadded) input
tokens and the speed-up of counted over all positions, in wall time and in the process's
CPU time a step (steadier when other jobs share the cores).

    python scripts/bench_train.py [--config configs/pilot.yaml] [--batch 8] [--seq 256] [--steps 5]
    python scripts/bench_train.py --only tools_all --only tools_counted --batch 4
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def flops_per_token(c, seq):
    """6 x (every weight a token multiplies with) + attention scores and values (fwd + bwd)."""
    d, hd = c.hidden_size, c.head_dim
    layer = d * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * d * c.intermediate_size
    matmul_params = c.num_hidden_layers * layer + d * c.vocab_size
    attention = 12 * c.num_hidden_layers * seq * c.num_attention_heads * hd / 2  # causal half
    return 6 * matmul_params + attention


def timed(step, steps):
    step()  # compile / warm up
    step()
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def mlx_peak():
    import mlx.core as mx

    a = mx.random.normal((2048, 2048))
    mx.eval(a @ a)
    return 2 * 2048**3 / timed(lambda: mx.eval(a @ a), 3)


def random_topk(rng, vocab_size, n, k):
    """n rows of k distinct-enough ids with sorted log-probabilities summing to ~0.9."""
    ids = rng.integers(0, vocab_size, (n, k)).astype(np.int32)
    lp = np.sort(rng.standard_normal((n, k)).astype(np.float32), axis=1)[:, ::-1]
    return ids, np.ascontiguousarray(lp - np.log(np.exp(lp).sum(1, keepdims=True)) - 0.1)


def layout_examples(layout, n, seq, vocab_size, topk):
    """n real records of a layout ("tools" or "kd"), tokenized by mlx_student.data, with
    random teacher top-k at every loss token."""
    from mlx_lm.utils import load_tokenizer

    from mlx_student.data import load_jsonl
    from mlx_student.teacher import prompts
    from mlx_student.teacher.default import DEFAULT_TEACHER_DIR
    from mlx_student.tools import spans, toolgen
    from mlx_student.tools.traces import gold_trace

    tokenizer = load_tokenizer(DEFAULT_TEACHER_DIR)
    rng = np.random.default_rng(0)
    records = []
    if layout == "tools":
        for i in range(n):
            r = gold_trace(toolgen.make_item(0, i))
            r["spans"] = spans.compute(tokenizer, r)
            records.append(r)
    else:
        pool = prompts.stdlib_explain() + prompts.stdlib_complete() + prompts.stdlib_fix()
        for j in rng.permutation(len(pool))[:n]:
            ids, lp = random_topk(rng, vocab_size, 48, topk)
            records.append({"messages": pool[j].messages, "completion": "", "finish_reason": "length",
                            "completion_ids": rng.integers(0, vocab_size, 48).tolist(),
                            "topk": [[[int(a), float(b)] for a, b in zip(r_ids, r_lp)]
                                     for r_ids, r_lp in zip(ids, lp)]})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        examples = load_jsonl(path, tokenizer, vocab_size, seq).examples
    for ex in examples:
        if ex.topk_ids is None:  # tool traces: top-k at every loss token
            n_loss = len(ex.tokens) - ex.prompt_len
            ex.topk_ids, ex.topk_logprobs = random_topk(rng, vocab_size, n_loss, topk)
    return examples


def child_ours(config, batch, seq, steps, kd, topk, layout="random", counted=True):
    import mlx_student  # noqa: F401  (OpenBLAS)
    import mlx.optimizers as optim

    from mlx_student import model as M
    from mlx_student.data import Example
    from mlx_student.trainer import TrainingArgs, train

    rng = np.random.default_rng(0)
    if layout == "random":
        examples = []
        for _ in range(batch * (steps + 3)):
            tokens = rng.integers(0, config.vocab_size, seq + 1).astype(np.int32)
            ex = Example(tokens, prompt_len=1)
            if kd:
                ex.topk_ids, ex.topk_logprobs = random_topk(rng, config.vocab_size, seq, topk)
            examples.append(ex)
    else:
        examples = layout_examples(layout, batch * (steps + 3), seq, config.vocab_size, topk)
    model = M.build(config)
    loss = {"ce": 0.5, "topk_kd": 0.5} if kd else {"ce": 1.0}
    args = TrainingArgs(batch_size=batch, iters=steps + 2, max_seq_length=seq, loss=loss,
                        steps_per_eval=10**9, counted_positions=counted)
    stamps = []
    train(model, optim.AdamW(learning_rate=1e-4), examples, None, args,
          on_report=lambda r: stamps.append((time.perf_counter(), time.process_time())))
    step_s, cpu_s = (statistics.median(b[i] - a[i] for a, b in zip(stamps[1:], stamps[2:])) for i in (0, 1))
    # real input tokens per step (the batches are drawn in a seeded order: use the mean)
    tokens = sum(min(len(ex.tokens) - 1, seq) for ex in examples) / len(examples) * batch
    return step_s, mlx_peak(), tokens, cpu_s


def child_mlx_lm(config, batch, seq, steps):
    import mlx_student  # noqa: F401  (OpenBLAS)
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner import trainer as T

    from mlx_student import model as M

    rng = np.random.default_rng(0)
    data = [(rng.integers(0, config.vocab_size, seq + 1).tolist(), 0) for _ in range(batch * (steps + 3))]
    model = M.build(config)
    tps = []

    class Report(T.TrainingCallback):
        def on_train_loss_report(self, info):
            tps.append(info["tokens_per_second"])

    with tempfile.TemporaryDirectory() as d:
        args = T.TrainingArgs(batch_size=batch, iters=steps + 2, max_seq_length=seq + 1, steps_per_report=1,
                              steps_per_save=10**9, adapter_file=f"{d}/a.safetensors")
        T.train(model, optim.AdamW(learning_rate=1e-4), data, None, args, training_callback=Report())
    # mlx-lm counts the tokens of the full (B, T+1) batch; convert its median to our step time.
    return batch * (seq + 1) / statistics.median(tps[2:]), mlx_peak()


def child_torch(config, batch, seq, steps):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(**{k: v for k, v in config.to_mlx_config().items() if k != "student"})
    model = LlamaForCausalLM(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (batch, seq + 1))

    def step():
        loss = model(input_ids=x[:, :-1], labels=x[:, 1:]).loss  # HF shifts labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = timed(step, steps)
    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / timed(lambda: a @ a, 3)
    return step_s, peak


MODES = {
    "ours_ce": "(a) ours, CE",
    "ours_kd": "(b) ours, top-k KD",
    "mlx_lm": "(c) mlx-lm trainer",
    "torch": "(d) PyTorch eager",
    "tools_all": "(e) tools, all positions",
    "tools_counted": "(f) tools, counted",
    "kd_all": "(g) KD recs, all positions",
    "kd_counted": "(h) KD recs, counted",
}
MODES_PEER = ("ours_ce", "ours_kd", "mlx_lm", "torch")


def child(mode, args):
    from mlx_student.config import load_config

    config = load_config(args.config)
    tokens, seq = args.batch * args.seq, args.seq
    if mode in ("ours_ce", "ours_kd"):
        step_s, peak, _, _ = child_ours(config, args.batch, args.seq, args.steps, mode == "ours_kd", args.topk)
    elif mode == "mlx_lm":
        step_s, peak = child_mlx_lm(config, args.batch, args.seq, args.steps)
    elif mode == "torch":
        step_s, peak = child_torch(config, args.batch, args.seq, args.steps)
    else:
        layout, positions = mode.split("_")
        step_s, peak, tokens, cpu_s = child_ours(config, args.batch, args.layout_seq, args.steps, True,
                                                 args.topk, layout, positions == "counted")
        seq = tokens / args.batch  # mean input length
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    mfu = tokens * flops_per_token(config, seq) / step_s / peak
    print(json.dumps({"tokens_per_s": tokens / step_s, "step_s": step_s, "mfu": mfu,
                      "peak_gflops": peak / 1e9, "peak_rss_gb": rss / 1e9,
                      **({"cpu_s": cpu_s} if mode not in MODES_PEER else {})}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/pilot.yaml", help="model to train")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--topk", type=int, default=32, help="teacher top-k entries per token for (b), (e)-(h)")
    p.add_argument("--layout-seq", type=int, default=1024, help="max tokens per sequence for (e)-(h)")
    p.add_argument("--only", choices=list(MODES), action="append", help="run only these")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args)
    results = {}
    for mode in args.only or MODES:
        argv = [sys.executable, __file__, "--child", mode, "--config", args.config, "--batch",
                str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--topk", str(args.topk),
                "--layout-seq", str(args.layout_seq)]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{MODES[mode]} failed:\n{out.stderr[-3000:]}")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.config}, batch {args.batch} x {args.seq} tokens")
    print(f"{'step':<24}{'tokens/s':>10}{'step s':>9}{'MFU':>8}{'peak GFLOP/s':>14}{'peak RSS GB':>13}")
    for mode, r in results.items():
        print(f"{MODES[mode]:<24}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.2f}{r['mfu']:>8.1%}"
              f"{r['peak_gflops']:>14.0f}{r['peak_rss_gb']:>13.2f}")
    t = {m: r["tokens_per_s"] for m, r in results.items()}
    for a, b, goal in (("ours_ce", "mlx_lm", ">= 1.0"), ("ours_kd", "ours_ce", ">= 0.85"), ("ours_ce", "torch", ">= 1.0"),
                       ("tools_counted", "tools_all", ">= 2.0"), ("kd_counted", "kd_all", "> 1.0")):
        if a in t and b in t:
            cpu = ""
            if "cpu_s" in results[a]:  # CPU seconds a step: steadier than wall time on a busy machine
                cpu = f"; CPU time a step {results[b]['cpu_s'] / results[a]['cpu_s']:.2f}x less"
            print(f"{a} / {b}: {t[a] / t[b]:.2f}x (goal {goal}){cpu}")


if __name__ == "__main__":
    main()
