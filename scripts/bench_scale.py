"""Worker feasibility study: can the 9B worker be distilled on one 64 GB M1 Max, and how fast?

    python scripts/bench_scale.py [--layers 2 --factor 8 --seq 256 --steps 4]

1. Measured here: a scaled-down worker (configs/worker_9b.yaml with every width, head count
   and the vocabulary divided by --factor, so the width ratios stay; --layers blocks) trains
   --steps steps of top-k KD under each fine-tune type with the real trainer: seconds a step,
   mx.get_peak_memory(), the planner's peak for the same setting, and the step time as a ratio
   to full fine-tuning measured in the same run.
2. Extrapolated by the planner (mlx_student.plan) to the full worker_9b on a 64 GB M1 Max:
   batch 1 x --mac-seq tokens, bf16 compute, a bf16 base under LoRA / DoRA, AdamW, gradient
   checkpointing only where it is needed to fit in USABLE_FRACTION of 64 GB.
3. Hours per 10k KD prompts on the Mac: TOKENS_PER_PROMPT tokens a prompt (prompt +
   completion, one epoch), training FLOPs a token over M1_MAX_FLOPS x MFU (assumed, stated
   in the table's footer). Training FLOPs a token: forward 2 x matmul parameters + attention;
   backward twice that for full training, once for adapters (frozen weights need no weight
   gradient, only the activation gradient); +1 forward with gradient checkpointing.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import mlx_student  # noqa: F401  (first: OpenBLAS before mlx)
from mlx_student import plan
from mlx_student.config import load_config
from mlx_student.info import matrices, parameters

ROOT = Path(__file__).parent.parent
M1_MAX_FLOPS = 10.4e12  # M1 Max 32-core GPU peak (Apple's figure)
MFU = 0.35  # assumed share of it a bf16 training step reaches in MLX on Metal
TOKENS_PER_PROMPT = 2048  # prompt + teacher completion of one KD record
PROMPTS = 10_000
TOPK = 32


def scaled(c, factor, layers):
    """The worker with widths, heads and vocabulary / factor (ratios kept) and fewer layers."""
    return replace(c, hidden_size=c.hidden_size // factor, intermediate_size=c.intermediate_size // factor,
                   num_attention_heads=c.num_attention_heads // factor,
                   num_key_value_heads=max(1, c.num_key_value_heads // factor),
                   vocab_size=c.vocab_size // factor, num_hidden_layers=layers)


def train_flops_per_token(c, fine_tune, seq, ckpt):
    """Forward: 2 x matmul parameters (the input embedding is a lookup) + causal attention."""
    m = matrices(c)
    dense = sum(r * k * n for name, (r, k, n) in m.items() if name != "embed_tokens")
    if c.tie_word_embeddings:
        dense += c.vocab_size * c.hidden_size
    forward = 2 * dense + 2 * c.num_hidden_layers * seq * c.num_attention_heads * c.head_dim
    backward = 2 * forward if fine_tune == "full" else forward
    return forward + backward + (forward if ckpt else 0)


def mac_setting(c, fine_tune, seq):
    """The AdamW bf16 setting of `fine_tune` for the Mac, checkpointing only if needed."""
    s = plan.Setting(batch_size=1, max_seq_length=seq, fine_tune=fine_tune, compute_dtype="bfloat16",
                     weight_dtype="float32" if fine_tune == "full" else "bfloat16", topk=TOPK)
    p = plan.plan(c, s)
    if p["peak"] > plan.USABLE_FRACTION * 64e9:
        s = replace(s, grad_checkpoint=True)
        p = plan.plan(c, s)
    return s, p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--factor", type=int, default=8, help="divide widths, heads and vocabulary by this")
    ap.add_argument("--layers", type=int, default=2, help="blocks of the scaled-down worker")
    ap.add_argument("--seq", type=int, default=256, help="tokens a sequence, measured here")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4, help="steps a setting (the first compiles)")
    ap.add_argument("--mac-seq", type=int, default=2048, help="tokens a sequence on the Mac")
    args = ap.parse_args()

    worker = load_config(ROOT / "configs/worker_9b.yaml")
    small = scaled(worker, args.factor, args.layers)
    print(f"scaled-down worker: h {small.hidden_size}, i {small.intermediate_size}, heads "
          f"{small.num_attention_heads}/{small.num_key_value_heads} x {small.head_dim}, vocab "
          f"{small.vocab_size}, {small.num_hidden_layers} layers = {parameters(small)['total'] / 1e6:.1f} M "
          f"parameters; batch {args.batch_size} x {args.seq}, top-{TOPK} KD, fp32, AdamW, {args.steps} steps")
    rows, full_s = [], None
    for ft in plan.FINE_TUNES:
        s = plan.Setting(batch_size=args.batch_size, max_seq_length=args.seq, fine_tune=ft, topk=TOPK)
        r = plan.measure(small, s, steps=args.steps)
        full_s = full_s or r["step_s"]
        ms, mp = mac_setting(worker, ft, args.mac_seq)
        flops = train_flops_per_token(worker, ft, args.mac_seq, ms.grad_checkpoint)
        tok_s = M1_MAX_FLOPS * MFU / flops
        rows.append((ft, r, ms, mp, tok_s, PROMPTS * TOKENS_PER_PROMPT / tok_s / 3600))
        print(f"  measured {ft}: {r['step_s']:.2f} s/step, peak {r['measured'] / 1e6:.0f} MB", flush=True)

    print("\n| fine-tune | here: s/step | vs full | here: peak MB | planned MB | planned/measured "
          "| worker_9b on 64 GB: setting | planned peak GB | fits | Mac tokens/s | hours / 10k prompts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ft, r, ms, mp, tok_s, hours in rows:
        fits = mp["peak"] <= plan.USABLE_FRACTION * 64e9
        base = {"full": "fp32 masters", "lora": "bf16 base", "dora": "bf16 base"}.get(ft, f"{ft[5:]}-bit base")
        setting = f"bf16 compute, {base}" + (", ckpt" if ms.grad_checkpoint else "")
        print(f"| {ft} | {r['step_s']:.2f} | {r['step_s'] / full_s:.2f}x | {r['measured'] / 1e6:.0f} | "
              f"{r['planned'] / 1e6:.0f} | {r['ratio']:.3f} | {setting} | {mp['peak'] / 1e9:.1f} | "
              f"{'yes' if fits else 'no'} | {tok_s:.0f} | {hours:.0f}" + ("" if fits else " (does not fit)") + " |")
    print(f"\nAssumptions: fits = planned peak <= {plan.USABLE_FRACTION:.0%} of 64 GB; M1 Max GPU "
          f"{M1_MAX_FLOPS / 1e12:.1f} TFLOPS at {MFU:.0%} MFU (assumed, not measured: no Mac here); "
          f"{TOKENS_PER_PROMPT} tokens per KD prompt, one epoch, batch 1 x {args.mac_seq}, top-{TOPK} "
          "targets; FLOPs per token from train_flops_per_token, so a quantized base costs no more "
          "than a bf16 one on Metal. The measured rows ran on this machine's CPU in fp32: the "
          "LoRA / DoRA step-time ratios to full fine-tuning carry over; the QLoRA ones show MLX's "
          "slow CPU quantized matmul, not Metal's.")


if __name__ == "__main__":
    main()
