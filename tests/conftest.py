import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx_student  # noqa: E402,F401  (first: picks OpenBLAS on Linux before mlx loads)
import pytest  # noqa: E402

from mlx_student import default_teacher  # noqa: E402


@pytest.fixture(scope="session")
def teacher_dir():
    """The embedded default teacher (fp32 SmolLM2-135M-Instruct), prepared once."""
    return default_teacher.prepare()


@pytest.fixture(scope="session")
def tokenizer(teacher_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(teacher_dir)
