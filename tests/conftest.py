import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: N workers share the cores; one BLAS / OpenMP thread each (set before
    # mlx_student loads OpenBLAS and before torch starts its pool; subprocesses inherit it).
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import mlx_student  # noqa: E402,F401  (first: picks OpenBLAS on Linux before mlx loads)
import pytest  # noqa: E402

from mlx_student.teacher import default as default_teacher  # noqa: E402


@pytest.fixture(scope="session")
def teacher_dir():
    """The embedded default teacher (fp32 SmolLM2-135M-Instruct), prepared once."""
    return default_teacher.prepare()


@pytest.fixture(scope="session")
def tokenizer(teacher_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(teacher_dir)


ROOT = Path(__file__).parent.parent


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def save_tiny(path, tokenizer, seed=0):
    """A freshly initialized tiny student (configs/tiny.yaml) saved as an mlx-lm folder."""
    from mlx_student import model as student_model
    from mlx_student.config import load_config

    config = load_config(ROOT / "configs" / "tiny.yaml")
    return student_model.save(path, student_model.build(config, seed=seed), config, tokenizer)


def train_argv(tmp_path, data, *flags, loss=None):
    """mlx_student.train arguments for the tiny student; `loss` goes into the config file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "run.yaml"
    text = (ROOT / "configs/tiny.yaml").read_text()
    text = text.replace("models/smollm2", str(ROOT / "models/smollm2"))
    if loss:
        text += "loss:\n" + "".join(f"  {k}: {v}\n" for k, v in loss.items())
    config.write_text(text)
    return ["--config", str(config), "--data", str(data), "--out", str(tmp_path / "student"),
            "--seed", "0", "--batch-size", "4", "--max-seq-length", "64",
            "--learning-rate", "3e-3", "--warmup", "2", *flags]


@pytest.fixture(scope="session")
def server(teacher_dir, tmp_path_factory):
    """A real mlx_lm.server serving the default teacher on loopback (mlx_student.teacher.server),
    started once for every test that talks to it; stopped at the end of the session."""
    from mlx_student.teacher import server as teacher_server

    log = tmp_path_factory.mktemp("server") / "server.log"
    with teacher_server.serve(teacher_dir, log_path=log) as s:
        yield s


PEAKED_NORM_SCALE = 4.0  # random init gives near-uniform next-token distributions (top-1 p
# ~2e-4), where top-1 is a coin toss between near-ties; a larger final norm scale (a lower
# softmax temperature) gives a peaked head and a long tail, like a trained model's.


@pytest.fixture(scope="session")
def peaked_tiny(tmp_path_factory, tokenizer):
    """The tiny student (configs/tiny.yaml, seed 4, contexts [128], prefill lengths [16]) with
    its final norm scaled by PEAKED_NORM_SCALE, saved as an mlx-lm folder. Read-only: copy it
    before changing it."""
    import mlx.core as mx

    from mlx_student import model as student_model
    from mlx_student.config import load_config

    config = load_config(ROOT / "configs" / "tiny.yaml")
    config.contexts, config.prefill_lengths = [128], [16]
    model = student_model.build(config, seed=4)
    model.model.norm.weight = model.model.norm.weight * PEAKED_NORM_SCALE
    mx.eval(model.parameters())
    return student_model.save(tmp_path_factory.mktemp("peaked") / "tiny", model, config, tokenizer)


@pytest.fixture(scope="session")
def tiny_coreml(peaked_tiny, tmp_path_factory):
    """peaked_tiny converted once by real coremltools (export/convert.py, fp16 compute, no
    compression): ({function name: MLModel} for decode_ctx128 and prefill_16_ctx128, the
    multifunction package saved from them, default function decode_ctx128). Shared by every
    test that needs a converted tiny student; `compress` returns new models, never edits these."""
    from export.convert import FunctionSpec, convert_function, save_multifunction
    from export.mirror import load_mirror

    mirror = load_mirror(peaked_tiny)
    specs = [FunctionSpec("decode_ctx128", "decode", 1, 128),
             FunctionSpec("prefill_16_ctx128", "prefill", 16, 128)]
    models = {s.name: convert_function(mirror, s) for s in specs}
    package = save_multifunction(models, tmp_path_factory.mktemp("coreml") / "tiny.mlpackage",
                                 specs[0].name)
    return models, package


@pytest.fixture(scope="session")
def kd_data(tmp_path_factory, teacher_dir):
    """A KD data folder from the real default teacher run in-process: its greedy completions
    and, at every completion token, the top-8 of its full distribution."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    model, tokenizer = mlx_lm.load(str(teacher_dir))
    records = []
    for i in range(6):
        messages = [{"role": "user", "content": f"Count from {i} to {i + 5}."}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        completion = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=12)]
        logits = model(mx.array([list(prompt) + completion]))[0, len(prompt) - 1 : -1]
        logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        top = np.argsort(-logprobs, axis=-1)[:, :8]
        records.append({
            "id": str(i), "messages": messages, "completion": tokenizer.decode(completion),
            "reasoning": None, "teacher": {"model": "smollm2-135m-instruct"},
            "finish_reason": "length", "usage": {}, "completion_ids": completion,
            "topk": [[[int(t), float(lp[t])] for t in row] for row, lp in zip(top, logprobs)],
        })
    data = tmp_path_factory.mktemp("kd")
    write_jsonl(data / "train.jsonl", records)
    write_jsonl(data / "valid.jsonl", records[:4])
    return data


# -- cross-tokenizer KD (mlx_student.xtok): a second real tokenizer, trained here ------------
@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE (vocab 8192, ChatML specials) trained on the first MiB of the local
    corpus (data/stdlib/train.jsonl) in about a second: the student tokenizer of the
    cross-tokenizer tests (the default teacher's is SmolLM2's)."""
    from mlx_student.bpe import train_byte_bpe

    return train_byte_bpe(ROOT / "data/stdlib/train.jsonl", tmp_path_factory.mktemp("bpe") / "bpe",
                          vocab_size=8192, max_bytes=1 << 20)


@pytest.fixture(scope="session")
def bpe_tokenizer(bpe_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(bpe_dir)
