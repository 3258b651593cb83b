"""mlx_student.judge_train and judge_eval end to end on a separable set of real-text pairs."""

import json
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from arbiter.judge import eval as judge_eval
from arbiter.judge import train as judge_train
from conftest import ROOT
from judge_pairs import write_folder


def config_file(tmp_path):
    text = (ROOT / "configs/judge_tiny.yaml").read_text()
    path = tmp_path / "judge.yaml"
    path.write_text(text.replace("models/smollm2", str(ROOT / "models/smollm2")))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("pairs"), n_train=256, n_valid=32, n_test=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs, teacher_dir):
    tmp = tmp_path_factory.mktemp("judge")
    argv = ["--config", str(config_file(tmp)), "--data", str(pairs), "--out", str(tmp / "judge"),
            "--steps-per-eval", "1000", "--steps-per-save", "1000"]  # configs/judge_tiny.yaml
    # CPU seconds of the whole run (load, 80 steps, validation, save): on an idle machine the
    # wall time is at most this, and unlike wall time it does not grow when the cores are shared
    tic = time.process_time()
    history = judge_train.run(judge_train.parse_args(argv))
    return tmp / "judge", history, time.process_time() - tic


def test_tiny_judge_separates_the_set_within_a_minute(trained, pairs):
    path, history, seconds = trained
    assert len(history) == 80 and history[-1]["valid"]["acc"] >= 0.9
    assert seconds < 60, f"training took {seconds:.1f} CPU s"
    from arbiter.judge.model import load
    from arbiter.judge.pairs import read_split

    judge, tokenizer, _ = load(path)
    rows = read_split(pairs, "test")
    m = judge_eval.summary_metrics(judge_eval.score_rows(judge, tokenizer, rows), rows)
    assert m["acc"] >= 0.9, m
    lines = (path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 81))


def test_judge_eval_cli_writes_the_table_with_baselines(trained, pairs, tmp_path):
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "arbiter.judge.eval", "--judge", str(trained[0]),
                        "--data", str(pairs), "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "eval.json").read_text())
    sys_ = report["systems"]
    assert set(sys_) == {"judge", "random", "longer"} and report["calibration"] == "valid"
    assert sys_["judge"]["acc_ties_excluded"] >= 0.9
    assert sys_["judge"]["acc_ties_excluded"] > max(sys_["random"]["acc_ties_excluded"],
                                                    sys_["longer"]["acc_ties_excluded"])
    assert sys_["judge"]["position_consistency"] == 1.0
    assert sys_["judge"]["pairs"] == 64
    md = (out / "eval.md").read_text()
    assert "| judge | " in md and "| longer | " in md and "EVIDENCE_COMPLETENESS" in md


def test_killed_run_resumes_with_the_same_losses(tmp_path):
    pairs = write_folder(tmp_path / "pairs", n_train=64, n_valid=0, n_test=0)
    (pairs / "valid.jsonl").unlink()

    def cli(out):
        return [sys.executable, "-m", "arbiter.judge.train", "--config", str(config_file(tmp_path)),
                "--data", str(pairs), "--out", str(out), "--iters", "8", "--batch-size", "4",
                "--steps-per-save", "4", "--steps-per-eval", "1000"]

    def losses(out):
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    subprocess.run(cli(tmp_path / "whole"), check=True, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen(cli(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = cut / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # after the step-4 checkpoint, mid-run
    proc.wait()
    assert json.loads((tmp_path / "cut.trainer/state.json").read_text())["step"] == 4
    subprocess.run(cli(cut) + ["--resume"], check=True, capture_output=True)
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, 9))
    np.testing.assert_allclose(losses(cut), losses(tmp_path / "whole"), rtol=1e-6)
    wa = mx.load(str(tmp_path / "whole.trainer/weights.safetensors"))
    wb = mx.load(str(tmp_path / "cut.trainer/weights.safetensors"))
    for k in wa:
        np.testing.assert_array_equal(np.array(wa[k]), np.array(wb[k]))


def test_kd_target_is_the_teachers_preference_kept_for_resume(tmp_path, teacher_dir):
    data = write_folder(tmp_path / "pairs", n_train=4, n_valid=0, n_test=0)
    (data / "valid.jsonl").unlink()
    args = ["--config", str(config_file(tmp_path)), "--data", str(data), "--out", str(tmp_path / "j"),
            "--iters", "2", "--batch-size", "2", "--max-length", "64", "--loss",
            "pairwise=0.5,clause=0.2,kd=0.3", "--kd-teacher", str(teacher_dir)]
    history = judge_train.run(judge_train.parse_args(args))
    assert set(history[0]) >= {"pairwise", "clause", "kd"}
    prefs = json.loads((tmp_path / "j.trainer/teacher_preferences.json").read_text())
    assert len(prefs) == 4 and all(0 < p < 1 for p in prefs.values())
    from arbiter.judge.kd import Teacher
    from arbiter.judge.pairs import read_split

    rows = read_split(data, "train")
    both = Teacher.load(teacher_dir, max_length=512).preferences(rows[:1])[0]
    assert [prefs[r["id"]] for r in rows[:1]] == pytest.approx(both.tolist(), abs=1e-5)


def test_cli_refuses_a_malformed_row_and_an_unknown_setting(tmp_path, pairs, capsys):
    """Through main() in process (test_killed_run_resumes_with_the_same_losses runs the real
    `python -m arbiter.judge.train`): exit 2, the file, line and field, nothing written."""
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = (pairs / "train.jsonl").read_text().splitlines()
    broken = json.loads(rows[2])
    del broken["b"]["text"]
    (bad / "train.jsonl").write_text("\n".join([rows[0], rows[1], json.dumps(broken)]) + "\n")
    cfg = config_file(tmp_path)

    def refused(argv):
        with pytest.raises(SystemExit) as e:
            judge_train.main(["--config", str(cfg), "--data", str(bad), *argv])
        assert e.value.code == 2
        return capsys.readouterr().err

    err = refused(["--out", str(tmp_path / "o")])
    assert f"{bad}/train.jsonl:3: $.b: 'text' is a required property (rule: required)" in err
    assert not (tmp_path / "o").exists()
    cfg.write_text(cfg.read_text() + "  lerning_rate: 1\n")
    line = cfg.read_text().splitlines().index("  lerning_rate: 1") + 1
    assert f"{cfg}:{line}: judge.lerning_rate: unknown judge setting" in refused([])


def test_run_says_how_many_candidates_max_length_cuts(tmp_path, tokenizer, capsys):
    data = write_folder(tmp_path / "pairs", n_train=6, n_valid=0, n_test=0)
    (data / "valid.jsonl").unlink()
    from arbiter.judge.model import encode
    from arbiter.judge.pairs import read_split

    rows = read_split(data, "train")
    full = [len(encode(tokenizer, r["prompt"], r[s]["text"], 10**9)) for r in rows for s in "ab"]
    limit = sorted(full)[len(full) // 2]  # about half are cut
    args = ["--config", str(config_file(tmp_path)), "--data", str(data), "--out", str(tmp_path / "j"),
            "--iters", "1", "--batch-size", "2", "--max-length", str(limit)]
    judge_train.run(judge_train.parse_args(args))
    cut = sum(n > limit for n in full)
    assert 0 < cut < len(full)
    assert (f"{cut} of {len(full)} train candidates are longer than --max-length {limit} and are cut"
            in capsys.readouterr().out)
