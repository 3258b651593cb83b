"""MLX-native students distilled from a large teacher, exported to CoreML for the ANE.

Importing this package on Linux makes MLX use OpenBLAS: the mlx-cpu wheel bundles the
reference BLAS (~8 GFLOP/s matmul here); Debian's pthread OpenBLAS is ~30x faster. Loading it
with RTLD_GLOBAL before mlx.core binds MLX's BLAS calls to it, exactly as LD_PRELOAD would,
with nothing for the user to set. macOS uses Accelerate and is left alone.
"""

import ctypes
import os
import sys
import warnings

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)


def _use_openblas():
    if not sys.platform.startswith("linux") or os.environ.get("MLX_STUDENT_BLAS") == "reference":
        return None
    path = os.environ.get("MLX_STUDENT_BLAS") or next(
        (p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None
    )
    if path is None:
        warnings.warn(
            "OpenBLAS not found: MLX falls back to its bundled reference BLAS (~30x slower). "
            "Install it with: apt-get install libopenblas0-pthread",
            stacklevel=3,
        )
        return None
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx was imported before mlx_student, so it keeps its reference BLAS; "
            "import mlx_student first for OpenBLAS speed",
            stacklevel=3,
        )
        return None
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


BLAS = _use_openblas()
