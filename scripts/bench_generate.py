"""Generation benchmark of the MLX engine vs mlx_lm.generate (see runtime/bench.py).

    python scripts/bench_generate.py [--model runs/pilot] [--draft-bits 4] [...]

Without --model it uses runs/pilot when trained, else builds a random pilot-config student
(configs/pilot.yaml, the teacher's tokenizer) into artifacts/bench/random_pilot once.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_student  # noqa: E402,F401  (first: OpenBLAS on Linux)
from runtime import bench  # noqa: E402


def default_model() -> str:
    trained = ROOT / "runs/pilot"
    if (trained / "config.json").exists():
        return str(trained)
    path = ROOT / "artifacts/bench/random_pilot"
    if not (path / "config.json").exists():
        from mlx_lm.utils import load_tokenizer

        from mlx_student import model as student_model
        from mlx_student.config import load_config

        config = load_config(ROOT / "configs/pilot.yaml")
        tokenizer = load_tokenizer(ROOT / "models/smollm2-135m-instruct")
        student_model.save(path, student_model.build(config, seed=0), config, tokenizer)
    return str(path)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--model" not in argv:
        argv = ["--model", default_model()] + argv
    bench.main(argv)
