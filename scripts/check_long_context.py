"""A long prompt through a long-context package of the worker's head layout, on any OS.

    python scripts/check_long_context.py --context 16384 --tokens 12000 --out artifacts/longctx

Builds the narrow worker-shaped student of configs/worker_narrow.yaml (32 query / 8 KV heads,
d_head 128; seeded init, final norm x4 so logits are not near-ties), exports decode + prefill
functions at `--context` (fp16, KV state), then runs `--tokens` tokens of the Python docs through
the package's prefill chunks and decode steps (reference MIL executor on Linux, MLModel on macOS)
and through MLX, comparing logits and the whole KV state (runtime/long_prefill.py). Writes
long_prefill.json and long_prefill.md under --out.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import mlx_student  # noqa: F401, I001  (first: OpenBLAS on Linux before mlx loads)
from mlx_lm.utils import load_tokenizer

from export.convert import convert_function, plan, save_multifunction
from export.mirror import load_mirror
from mlx_student import model as student_model
from mlx_student.config import load_config
from runtime.long_prefill import check, markdown

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=12000)
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[64, 512])
    p.add_argument("--out", default="artifacts/longctx")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(ROOT / "configs/worker_narrow.yaml")
    config = dataclasses.replace(config, contexts=[args.context], max_position_embeddings=args.context,
                                 prefill_lengths=args.prefill_lengths,
                                 tokenizer=str(ROOT / "models/smollm2-135m-instruct"))
    model = student_model.build(config, seed=7)
    model.model.norm.weight = model.model.norm.weight * 4
    folder = student_model.save(out / "student", model, config, load_tokenizer(Path(config.tokenizer)))
    tic = time.perf_counter()
    mirror = load_mirror(folder)
    specs = plan(config.contexts, config.prefill_lengths)
    package = save_multifunction({s.name: convert_function(mirror, s) for s in specs},
                                 out / "student.mlpackage", specs[0].name)
    export_s = time.perf_counter() - tic
    r = check(folder, package, args.tokens)
    r["seconds"]["export"] = export_s
    (out / "long_prefill.json").write_text(json.dumps(r, indent=2))
    (out / "long_prefill.md").write_text(markdown(r))
    print(markdown(r))
    print(f"export {export_s:.0f} s")


if __name__ == "__main__":
    main()
