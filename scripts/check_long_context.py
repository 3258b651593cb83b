"""A long prompt through a long-context package of the worker's head layout, on any OS.

    python scripts/check_long_context.py --context 16384 --tokens 12000 --out artifacts/longctx

Builds the narrow worker-shaped student of configs/worker_narrow.yaml (32 query / 8 KV heads,
d_head 128; seeded init, final norm x4 so logits are not near-ties), exports decode + prefill
functions at `--context` (fp16, KV state), then runs `--tokens` tokens of the Python docs through
the package's prefill chunks and decode steps (reference MIL executor on Linux, MLModel on macOS)
and through MLX, comparing every call's logits and the whole KV state against MLX fp32, gated by
the probe's fp16 error model (runtime/long_prefill.py). Writes long_prefill.json and
long_prefill.md under --out (atomically); exit status 1 when a gate fails.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import mlx_student  # noqa: F401, I001  (first: OpenBLAS on Linux before mlx loads)
from mlx_lm.utils import load_tokenizer

from export.convert import convert_function, plan, save_multifunction
from export.mirror import load_mirror
from mlx_student import model as student_model
from mlx_student.config import load_config
from mlx_student.files import write_json_atomic
from runtime.long_prefill import check, markdown

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=16384, help="KV-cache length of the package")
    p.add_argument("--tokens", type=int, default=12000, help="prompt tokens (at most --context)")
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[64, 512],
                   help="the package's prefill functions (tokens per call)")
    p.add_argument("--use-prefill-lengths", type=int, nargs="+",
                   help="run the prompt through only these prefill functions (default: all; "
                   "64 alone bounds the reference executor's memory at a 16k context)")
    p.add_argument("--mlx-step", type=int, default=512, help="MLX's own prefill chunk")
    p.add_argument("--fp16-tokens", type=int, default=1024,
                   help="prompt prefix run by mlx-lm in fp16 for the error model")
    p.add_argument("--out", default="artifacts/longctx")
    p.add_argument("--reuse", action="store_true",
                   help="check the student and package already exported under --out")
    args = p.parse_args()
    if not 0 < args.tokens <= args.context:
        sys.exit(f"check_long_context: --tokens {args.tokens} must be in 1..--context {args.context}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder, package, export_s = out / "student", out / "student.mlpackage", None
    if args.reuse:
        if not package.exists():
            sys.exit(f"check_long_context: --reuse: no {package} (run once without --reuse)")
    else:
        export_s = export(args, folder, package)
        print(f"exported {package} in {export_s:.0f} s")
    r = check(folder, package, args.tokens, context=args.context, mlx_step=args.mlx_step,
              fp16_tokens=args.fp16_tokens, prefill_lengths=args.use_prefill_lengths)
    r["seconds"]["export"] = export_s
    write_json_atomic(out / "long_prefill.json", r)
    tmp = out / ".long_prefill.md.tmp"
    tmp.write_text(markdown(r))
    tmp.replace(out / "long_prefill.md")
    print(markdown(r))
    sys.exit(0 if r["ok"] else 1)


def export(args, folder: Path, package: Path) -> float:
    """The worker-shaped student at --context, saved to `folder` and exported to `package`;
    returns the seconds the export took."""
    config = load_config(ROOT / "configs/worker_narrow.yaml")
    config = dataclasses.replace(config, contexts=[args.context], max_position_embeddings=args.context,
                                 prefill_lengths=args.prefill_lengths,
                                 tokenizer=str(ROOT / "models/smollm2-135m-instruct"))
    model = student_model.build(config, seed=7)
    model.model.norm.weight = model.model.norm.weight * 4
    student_model.save(folder, model, config, load_tokenizer(Path(config.tokenizer)))
    tic = time.perf_counter()
    mirror = load_mirror(folder)
    specs = plan(config.contexts, config.prefill_lengths)
    save_multifunction({s.name: convert_function(mirror, s) for s in specs}, package, specs[0].name)
    return time.perf_counter() - tic


if __name__ == "__main__":
    main()
