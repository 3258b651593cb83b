"""MLX on Linux runs its matmuls through OpenBLAS once mlx_student is imported."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the BLAS swap concerns the Linux mlx-cpu wheel"
)

CHILD = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    {imports}
import numpy as np
a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)
c = np.array(mx.array(a) @ mx.array(b))
err = float(np.abs(c - a.astype(np.float64) @ b).max())
maps = open("/proc/self/maps").read()
print(json.dumps({{"openblas": "openblas-pthread" in maps, "err": err,
                  "warnings": [str(w.message) for w in caught]}}))
"""


def run_child(imports, **env):
    code = CHILD.format(imports=imports)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, **env},
    )
    return json.loads(proc.stdout)


def test_importing_mlx_student_binds_openblas():
    out = run_child("import mlx_student; import mlx.core as mx")
    assert out["openblas"] and out["err"] < 1e-3 and not out["warnings"]


def test_reference_blas_can_be_chosen():
    out = run_child("import mlx_student; import mlx.core as mx", MLX_STUDENT_BLAS="reference")
    assert not out["openblas"] and out["err"] < 1e-3


def test_importing_mlx_first_warns():
    out = run_child("import mlx.core as mx; import mlx_student")
    assert not out["openblas"]
    assert any("import mlx_student first" in w for w in out["warnings"])
