"""QAT vs post-training quantization (PTQ) of one student: same steps, same data, same seed.

    python scripts/bench_qat.py [--config configs/tiny.yaml] [--steps 40] [--qat-steps 10] [--bits 4]

Two runs of mlx_student.train, identical for their first steps - qat_steps steps:
  fp    every step in fp32; its checkpoint is the reference, and fake-quantized it is the PTQ
        model (what a plain export of it ships)
  qat   the last qat_steps steps quantization-aware (qat.start_step = steps - qat_steps)
Reported: held-out CE (the data's valid split) of fp, PTQ and QAT, and the quantization gap
(CE - CE_fp) of QAT as a ratio of PTQ's. Writes <out>/bench_qat.json.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx_student  # noqa: F401  (OpenBLAS on Linux, before mlx loads)
from mlx_student import model as student_model
from mlx_student import train
from mlx_student.data import load_dataset
from mlx_student.quant import fake_quantized, qat_settings
from mlx_student.trainer import TrainingArgs, evaluate


def held_out_ce(folder, qat, data, seq, batches):
    model, tokenizer, config = student_model.load(folder)
    examples = load_dataset(data, tokenizer, config.vocab_size, seq)["valid"].examples
    args = TrainingArgs(batch_size=4, max_seq_length=seq, val_batches=batches)
    with fake_quantized(model, qat):
        return evaluate(model, examples, args)["ce"]


def compare(config, data, out, steps, qat_steps, bits, group_size, seq=64, batch=4, lr=3e-3,
            val_batches=8):
    """Held-out CE of fp, PTQ and QAT, and QAT's quantization gap as a ratio of PTQ's."""
    out = Path(out)
    qat = qat_settings({"bits": bits, "group_size": group_size, "start_step": steps - qat_steps})
    base = ["--config", str(config), "--data", str(data), "--seed", "0", "--iters", str(steps),
            "--batch-size", str(batch), "--max-seq-length", str(seq), "--learning-rate", str(lr),
            "--steps-per-eval", str(10 * steps), "--steps-per-save", str(steps)]
    train.run(train.parse_args(base + ["--out", str(out / "fp")]))
    flag = ",".join(f"{k}={v}" for k, v in qat.items())
    train.run(train.parse_args(base + ["--out", str(out / "qat"), "--qat", flag]))
    ce = {
        "fp": held_out_ce(out / "fp", None, data, seq, val_batches),
        "ptq": held_out_ce(out / "fp", qat, data, seq, val_batches),
        "qat": held_out_ce(out / "qat", None, data, seq, val_batches),  # saved on the grid
    }
    gap = {k: ce[k] - ce["fp"] for k in ("ptq", "qat")}
    return {"steps": steps, "qat_steps": qat_steps, "bits": bits, "group_size": group_size,
            "held_out_ce": ce, "gap": gap, "qat_gap_over_ptq_gap": gap["qat"] / gap["ptq"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--out", default="runs/bench_qat")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--qat-steps", type=int, default=10)
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--group-size", type=int, default=32)
    a = p.parse_args(argv)
    result = compare(a.config, a.data, a.out, a.steps, a.qat_steps, a.bits, a.group_size)
    Path(a.out, "bench_qat.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
