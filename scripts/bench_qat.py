"""QAT vs post-training quantization (PTQ) of one trained fp student, in the exporter's formats.

    python scripts/bench_qat.py --model runs/kd_pilot/kd --data data/kd_kd_pilot-<hash> \
        [--qat-steps 60] [--lr 5e-5] [--skip-export]

Rows, each compared with the fp32 model on the data's held-out split (valid, else test):
  fp16                its weights and compute in fp16 (what an fp16 package runs)
  PTQ-int8, PTQ-4bit  round to nearest (minmax scales), int8 per channel / 4-bit in groups of
                      32, embedding included: what exporting the fp checkpoint ships
  QAT-int8, QAT-4bit  --qat-steps steps of QAT from it (mlx_student.train --init-from with
                      learned LSQ scales), self-distilled from it (forward KL to its logits)
  mlx-lm q8 / q4      mlx_lm.convert -q (affine, group 32, fp16 scales and biases): MLX's own
                      format, for reference; CoreML has no such package
Metrics: KL(fp || row) per held-out token, top-1 agreement with fp, CE on the data's tokens;
then each row's CoreML package (mlx_student.export; QAT rows carry their own integers) and its
bytes, and the parity probe of the QAT-int8 package against its int8 gate. Goals (issue 7):
QAT recovers >= 70% of the 4-bit PTQ KL; int8 within 1 point of fp16 top-1.
Writes <out>/bench_qat.json and bench_qat.md.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import mlx_student  # noqa: F401  (OpenBLAS on Linux, before mlx loads)
import mlx.core as mx
import mlx_lm
from mlx_lm.convert import convert

from export import cli as export_cli
from export import probe as export_probe
from mlx_student import train
from mlx_student.batches import iterate_batches
from mlx_student.data import load_dataset
from mlx_student.losses import cross_entropy, forward_kl
from mlx_student.quant import fake_quantized, qat_settings

QAT = "scales=lsq,embeddings=true,group_size=32,scale_lr=30"
PACKAGES = {  # row: (source, export flags); QAT rows take their format from student.qat
    "fp16": ("fp", ["--weights", "fp16", "--embedding", "fp16"]),
    "PTQ-int8": ("fp", ["--weights", "int8", "--embedding", "int8"]),
    "QAT-int8": ("qat8", []),
    "PTQ-4bit": ("fp", ["--weights", "int4", "--embedding", "int4", "--block-size", "32"]),
    "QAT-4bit": ("qat4", []),
}


def held_out(reference, model, batches):
    """Per-token means over the batches: KL(reference || model), top-1 agreement, CE."""
    kl = agree = ce = n = 0.0
    for b in batches:
        p, q, m = reference(b["inputs"]), model(b["inputs"]), b["mask"]
        count = m.sum().item()
        kl += forward_kl(q, p, m).item() * count
        ce += cross_entropy(q, b["targets"], m).item() * count
        agree += ((mx.argmax(p, -1) == mx.argmax(q, -1)) * m).sum().item()
        n += count
    return {"kl": kl / n, "top1": agree / n, "ce": ce / n}


def qat_run(fp, data, out, bits, a):
    """QAT from the fp checkpoint, self-distilled from it; returns the run's model folder."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(f"seed: {a.seed}\n")
    argv = ["--config", str(out / "run.yaml"), "--data", str(data), "--out", str(out / "model"),
            "--init-from", str(fp), "--teacher", str(fp), "--loss", "forward_kl=1",
            "--iters", str(a.qat_steps), "--batch-size", str(a.batch_size),
            "--max-seq-length", str(a.seq), "--learning-rate", str(a.lr if bits == 4 else a.lr_int8),
            "--warmup", "0",
            "--steps-per-eval", str(10 * a.qat_steps), "--steps-per-save", str(a.qat_steps),
            "--qat", f"bits={bits},{QAT}"]
    train.run(train.parse_args(argv))
    return out / "model"


def export(folder, out, flags):
    argv = ["--model", str(folder), "--out", str(out), "--no-parity", *flags]
    manifest = export_cli.run(export_cli.parse_args(argv))
    return {"package_bytes": manifest["package_bytes"],
            "bytes_per_param": manifest["bytes_per_param"]}


def table(result) -> str:
    lines = ["| row | held-out KL to fp | top-1 vs fp | CE | package | bytes/param |",
             "|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        pkg = result["packages"].get(name, {})
        size = f"{pkg['package_bytes'] / 1e6:.1f} MB" if pkg else "(no CoreML format)"
        bpp = f"{pkg['bytes_per_param']:.3f}" if pkg else ""
        lines.append(f"| {name} | {r['kl']:.5f} | {100 * r['top1']:.2f}% | {r['ce']:.4f} | "
                     f"{size} | {bpp} |")
    for bits in ("int8", "4bit"):
        lines.append(f"\nQAT recovers {100 * result['recovery'][bits]:.1f}% of the {bits} PTQ "
                     "KL ((PTQ - QAT) / PTQ).")
    if "probe" in result:
        p = result["probe"]
        lines.append(f"\nProbe of the QAT-int8 package: {'PASS' if p['ok'] else 'FAIL'} "
                     f"(top-1 {p['top1']}, KL {p['kl']}).")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--model", required=True, help="the trained fp student (mlx-lm folder)")
    p.add_argument("--data", required=True, help="its data folder (valid or test split held out)")
    p.add_argument("--out", default="runs/bench_qat")
    p.add_argument("--qat-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-5, help="4-bit QAT learning rate")
    p.add_argument("--lr-int8", type=float, default=2e-6,
                   help="int8 QAT learning rate: below the int8 grid step, or AdamW's moves "
                   "outweigh the quantization error they should fix")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-export", action="store_true", help="no packages (sizes, probe)")
    a = p.parse_args(argv)
    fp, out = Path(a.model), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folders = {"fp": fp}
    for bits in (8, 4):
        folders[f"qat{bits}"] = qat_run(fp, a.data, out / f"qat{bits}", bits, a)
    for bits in (8, 4):
        shutil.rmtree(out / f"mlxlm_q{bits}", ignore_errors=True)
        convert(str(fp), mlx_path=str(out / f"mlxlm_q{bits}"), quantize=True, q_bits=bits,
                q_group_size=32)

    reference, tokenizer = mlx_lm.load(str(fp))
    splits = load_dataset(a.data, tokenizer, reference.args.vocab_size, a.seq)
    held = splits["valid" if "valid" in splits else "test"].examples
    batches = list(iterate_batches(held, a.batch_size, a.seq, seed=a.seed))[: a.val_batches]
    rows = {}
    fp16 = mlx_lm.load(str(fp))[0]
    fp16.set_dtype(mx.float16)
    rows["fp16"] = held_out(reference, fp16, batches)
    for bits, name in ((8, "int8"), (4, "4bit")):
        ptq = qat_settings({"bits": bits, "group_size": 32, "embeddings": True})
        model = mlx_lm.load(str(fp))[0]
        with fake_quantized(model, ptq):
            rows[f"PTQ-{name}"] = held_out(reference, model, batches)
        rows[f"QAT-{name}"] = held_out(reference, mlx_lm.load(str(folders[f"qat{bits}"]))[0], batches)
    for bits in (8, 4):
        rows[f"mlx-lm q{bits}"] = held_out(reference, mlx_lm.load(str(out / f"mlxlm_q{bits}"))[0], batches)
    recovery = {n: (rows[f"PTQ-{n}"]["kl"] - rows[f"QAT-{n}"]["kl"]) / rows[f"PTQ-{n}"]["kl"]
                for n in ("int8", "4bit")}
    result = {"model": str(fp), "data": str(a.data), "held_out_tokens": sum(
        b["mask"].sum().item() for b in batches), "qat_steps": a.qat_steps,
        "lr": {"int8": a.lr_int8, "4bit": a.lr},
        "qat": QAT, "rows": rows, "recovery": recovery, "packages": {}}
    if not a.skip_export:
        for name, (source, flags) in PACKAGES.items():
            result["packages"][name] = export(folders[source], out / "packages" / name, flags)
        report = export_probe.probe(folders["qat8"], out / "packages" / "QAT-int8" / "model.mlpackage")
        export_probe.write_report(report, out / "probe_qat_int8")
        e2e = report["end_to_end"]["coreml_vs_mlx"]
        result["probe"] = {"ok": report["ok"], "top1": e2e["top1"], "kl": e2e["kl_mean"],
                           "gates": report["gates"]}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "bench_qat.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench_qat.md").write_text(table(result) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
