"""Make a KD data folder from a teacher over a mix of prompt sources (resumable).

    python scripts/make_kd_mix.py --config configs/kd_mix.yaml   # = mlx_student.kd_mix
"""

import mlx_student  # noqa: F401  (first: OpenBLAS before mlx loads)
from mlx_student.teacher.kd_mix import main

if __name__ == "__main__":
    main()
