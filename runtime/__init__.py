"""Generation over MLX and CoreML; constrained decoding; speculative decoding; server; bench."""

import mlx_student  # noqa: F401  (first: picks OpenBLAS on Linux before mlx loads)
