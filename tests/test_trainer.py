"""Trainer guarantees: exact resume, kills at any instant, splits of the global batch."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import ROOT, train_argv, write_jsonl

from mlx_student import checkpoint, train
from mlx_student.trainer import TrainingArgs, evaluate

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    write_jsonl(d / "train.jsonl", [{"text": (STDLIB / "heapq.py").read_text()}])
    return d


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def cli(argv):
    return [sys.executable, "-m", "mlx_student.train", *argv]


def test_killed_run_resumes_with_the_same_losses(tmp_path, text_data):
    whole = tmp_path / "whole"
    subprocess.run(cli(train_argv(whole, text_data, "--iters", "8")), check=True, capture_output=True)

    cut = tmp_path / "cut"
    argv = train_argv(cut, text_data, "--iters", "8", "--steps-per-save", "4")
    proc = subprocess.Popen(cli(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = cut / "student" / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # after the step-4 checkpoint, mid-run
    proc.wait()
    assert json.loads((checkpoint.trainer_dir(cut / "student") / "state.json").read_text())["step"] == 4

    subprocess.run(cli(argv + ["--resume"]), check=True, capture_output=True)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9))
    np.testing.assert_allclose(losses(cut / "student"), losses(whole / "student"), rtol=1e-6)


KILLER = r"""
import os, signal, sys
import mlx_student
import mlx.core as mx, mlx.optimizers as optim
from pathlib import Path
from mlx_lm.utils import load_tokenizer
from mlx_student import checkpoint, model as M
from mlx_student.config import load_config

where, out, tok_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
config = load_config(sys.argv[4])
model, opt = M.build(config, seed=0), optim.AdamW(learning_rate=1e-3)
tokenizer = load_tokenizer(tok_dir)
opt.init(model.trainable_parameters())
checkpoint.save(out, model, config, tokenizer, opt, 1, {})
model = M.build(config, seed=1)  # what step 2 would write

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

if where == "trainer-write":  # after the weights, before the optimizer state
    real = mx.save_safetensors
    mx.save_safetensors = lambda f, *a, **k: die() if "optimizer" in f else real(f, *a, **k)
elif where == "swap":  # between the two renames of the trainer folder's swap
    real_rename, calls = Path.rename, []
    def rename(self, target):
        calls.append(self)
        if len(calls) == 2:
            die()
        return real_rename(self, target)
    Path.rename = rename
elif where == "model-write":  # trainer state written, model folder half-written
    tokenizer.save_pretrained = die
checkpoint.save(out, model, config, tokenizer, opt, 2, {})
"""


@pytest.mark.parametrize("where, step", [("trainer-write", 1), ("swap", 1), ("model-write", 2)])
def test_kill_during_a_save_leaves_a_usable_checkpoint(tmp_path, teacher_dir, where, step):
    out = tmp_path / "student"
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, where, str(out), str(teacher_dir), str(ROOT / "configs/tiny.yaml")],
        capture_output=True, text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    from mlx_student import model as M
    from mlx_student.config import load_config
    import mlx.optimizers as optim

    config = load_config(ROOT / "configs/tiny.yaml")
    model, opt = M.build(config, seed=7), optim.AdamW(learning_rate=1e-3)
    assert checkpoint.load(out, model, opt, config)["step"] == step
    expected = M.build(config, seed=0 if step == 1 else 1)
    np.testing.assert_array_equal(np.array(model.model.norm.weight), np.array(expected.model.norm.weight))
    np.testing.assert_array_equal(
        np.array(model.model.embed_tokens.weight), np.array(expected.model.embed_tokens.weight)
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    # The model folder is the step-1 model whatever the kill interrupted.
    loaded, _ = mlx_lm.load(str(out))
    np.testing.assert_array_equal(
        np.array(loaded.model.embed_tokens.weight),
        np.array(M.build(config, seed=0).model.embed_tokens.weight),
    )


def test_gradient_accumulation_gives_the_same_steps(tmp_path, text_data):
    _, one = run(tmp_path / "a", text_data, "--iters", "4")
    _, two = run(tmp_path / "b", text_data, "--iters", "4", "--grad-accumulation-steps", "4")
    np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in one], rtol=1e-5)


def run(tmp_path, data, *flags, loss=None):
    history = train.run(train.parse_args(train_argv(tmp_path, data, *flags, loss=loss)))
    return tmp_path / "student", history


def test_two_process_data_parallel_matches_one_process(tmp_path, text_data):
    _, one = run(tmp_path / "one", text_data, "--iters", "5")
    argv = train_argv(tmp_path / "two", text_data, "--iters", "5")
    launch = Path(sys.executable).parent / "mlx.launch"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [str(launch), "-n", "2", "--backend", "ring", "--starting-port", "40123",
         str(Path(sys.executable).parent / "mlx_student.train"), *argv],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # fp32 sums in another order: agreement to ~1e-6 relative, well inside 1e-4.
    np.testing.assert_allclose(losses(tmp_path / "two" / "student"), [h["loss"] for h in one], rtol=1e-4)


def test_evaluation_of_the_teacher_against_itself(teacher_dir, kd_data):
    """The teacher's own greedy tokens and top-k: agreement 1, KL to its top-k 0."""
    from mlx_student.data import load_dataset

    model, tokenizer = mlx_lm.load(str(teacher_dir))
    examples = load_dataset(kd_data, tokenizer, 49152, 64)["valid"].examples
    args = TrainingArgs(batch_size=2, max_seq_length=64, loss={"ce": 1.0, "topk_kd": 1.0})
    out = evaluate(model, examples, args)
    assert out["top1_agree"] == pytest.approx(1.0)
    assert out["kl_topk"] == pytest.approx(0.0, abs=1e-4)
    assert out["topk_kd"] == pytest.approx(0.0, abs=1e-4)
    assert out["ppl"] == pytest.approx(np.exp(out["ce"]))
    assert out["ce"] < 1.0  # its own greedy text is likely under it
    # a split smaller than one batch (a small valid split) is evaluated whole, not refused
    whole = evaluate(model, examples, TrainingArgs(batch_size=8, max_seq_length=64,
                                                   loss={"ce": 1.0, "topk_kd": 1.0}))
    for key, value in out.items():
        assert whole[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_gradient_checkpointing_and_bf16_compute(tmp_path, text_data):
    out, fp32 = run(tmp_path / "fp32", text_data, "--iters", "3")
    # mlx-lm's grad_checkpoint patches the layer class for the whole process: run it apart.
    argv = train_argv(tmp_path / "ckpt", text_data, "--iters", "3", "--grad-checkpoint")
    subprocess.run(cli(argv), check=True, capture_output=True)
    np.testing.assert_allclose(losses(tmp_path / "ckpt" / "student"), [h["loss"] for h in fp32], rtol=1e-5)

    out, bf16 = run(tmp_path / "bf16", text_data, "--iters", "3", "--compute-dtype", "bfloat16")
    np.testing.assert_allclose([h["loss"] for h in bf16], [h["loss"] for h in fp32], rtol=2e-2)
    assert [h["loss"] for h in bf16] != [h["loss"] for h in fp32]  # it did compute in bf16
    weights = mx.load(str(checkpoint.trainer_dir(out) / "weights.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.float32}  # masters stay fp32
