import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlx_lm
import numpy as np
import pytest

from mlx_student import train
from mlx_student.trainer import schedule

from conftest import train_argv, write_jsonl

ROOT = Path(__file__).parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """Real text: a few standard-library modules."""
    d = tmp_path_factory.mktemp("text")
    docs = [{"text": (STDLIB / name).read_text()} for name in ("bisect.py", "heapq.py", "colorsys.py")]
    write_jsonl(d / "train.jsonl", docs[:2])
    write_jsonl(d / "valid.jsonl", docs[2:])
    return d


def run_train(tmp_path, data, *flags, loss=None):
    argv = train_argv(tmp_path, data, *flags, loss=loss)
    history = train.run(train.parse_args(argv))
    return tmp_path / "student", history


def test_ce_training_learns_and_saves_an_mlx_lm_folder(tmp_path, text_data, teacher_dir):
    out, history = run_train(tmp_path, text_data, "--iters", "30", "--steps-per-eval", "15")
    losses = [h["loss"] for h in history]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert losses[0] == pytest.approx(np.log(49152), abs=0.3)  # init: near-uniform logits
    valid = [h["valid"] for h in history if "valid" in h]
    assert len(valid) == 2 and valid[1]["ce"] < valid[0]["ce"]
    assert valid[1]["ppl"] == pytest.approx(np.exp(valid[1]["ce"]))
    log = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 31))
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model, tokenizer = mlx_lm.load(str(out))
    assert mlx_lm.generate(model, tokenizer, "def bisect", max_tokens=4)


def test_topk_kd_training_moves_the_student_towards_the_teacher(tmp_path, kd_data):
    _, history = run_train(tmp_path, kd_data, "--iters", "25", loss={"ce": 0.5, "topk_kd": 0.5})
    kd = [h["topk_kd"] for h in history]
    assert set(history[0]) >= {"ce", "topk_kd", "loss", "grad_norm", "lr"}
    assert history[0]["loss"] == pytest.approx(0.5 * history[0]["ce"] + 0.5 * kd[0], rel=1e-5)
    assert np.mean(kd[-5:]) < 0.5 * np.mean(kd[:5])


def test_learning_rate_schedule():
    lr = schedule(1e-3, iters=100, warmup=10, min_lr_ratio=0.1)
    assert lr(0).item() == 0
    assert lr(5).item() == pytest.approx(5e-4)
    assert lr(10).item() == pytest.approx(1e-3)
    assert lr(100).item() == pytest.approx(1e-4, rel=1e-3)


def test_cli_reports_bad_settings_with_file_and_line(tmp_path, capsys):
    """(In process: test_run_settings_are_checked_at_load_and_listed_together and test_trainer
    run the real `python -m mlx_student.train`.)"""
    config = tmp_path / "run.yaml"
    text = (ROOT / "configs/tiny.yaml").read_text() + "batchsize: 4\n"
    config.write_text(text)
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(config)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    line = len(text.splitlines())
    assert f"{config}:{line}: batchsize: unknown run setting" in err


def test_run_settings_are_checked_at_load_and_listed_together(tmp_path, kd_data, capsys):
    """Every bad run setting is named with its file and line (or its flag) before anything
    runs, and a batch larger than the data is refused at load, not at step 1."""
    config = tmp_path / "run.yaml"
    text = (ROOT / "configs/tiny.yaml").read_text().replace(
        "models/smollm2", str(ROOT / "models/smollm2"))
    lines = text.splitlines()
    text += "jsd_beta: 1.0\nloss:\n  jsd: 1.0\nwarmup: -1\noptimizer: adam\n"
    config.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "mlx_student.train", "--config", str(config),
                           "--learning-rate", "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    n = len(lines)
    for want in (f"{config}:{n + 1}: jsd_beta: must be a number in (0, 1)",
                 f"{config}:{n + 2}: loss: jsd distil a teacher's full logits",
                 f"{config}:{n + 4}: warmup: must be an integer >= 0, got -1",
                 f"{config}:{n + 5}: optimizer: 'adam' is not one of adamw, adafactor, sgd",
                 "--learning-rate: must be a number > 0, got 0.0"):
        assert want in proc.stderr, (want, proc.stderr)
    assert "5 setting problems" in proc.stderr

    with pytest.raises(SystemExit) as e:
        train.main(train_argv(tmp_path, kd_data, "--batch-size", "8", loss={"topk_kd": 1.0}))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"--batch-size: 8 is more than the 6 sequences of {kd_data / 'train.jsonl'}" in err
    assert not (tmp_path / "student").exists()
