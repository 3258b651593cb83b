"""Ctrl-C (SIGINT) ends mlx_student.train and mlx_student.export with one line saying what was
kept and exit status 130, as kd_mix does, never a KeyboardInterrupt traceback; and train's
--out naming a regular file is a one-line error."""

import json
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from conftest import save_tiny, train_argv, write_jsonl

from mlx_student import train

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    write_jsonl(d / "train.jsonl", [{"text": (STDLIB / "bisect.py").read_text()}])
    write_jsonl(d / "valid.jsonl", [{"text": (STDLIB / "colorsys.py").read_text()}])
    return d


def interruptible(argv):
    """The command as a terminal user runs it, with SIGINT at its default disposition: a suite
    run in the background of a non-interactive shell inherits SIGINT ignored, which exec keeps
    (and Python then never raises KeyboardInterrupt), while a handled signal is reset to the
    default by exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(ready, proc, timeout=240):
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the command never got going"
        time.sleep(0.2)


def test_train_interrupted_names_the_last_checkpoint(tmp_path, text_data):
    argv = train_argv(tmp_path, text_data, "--iters", "100000", "--steps-per-save", "1",
                      "--steps-per-eval", "100000")
    state = tmp_path / "student.trainer" / "state.json"
    proc = interruptible([sys.executable, "-m", "mlx_student.train", *argv])
    wait_for(state.exists, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    step = json.loads(state.read_text())["step"]  # what the message must name: the file's step
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"interrupted: {tmp_path / 'student'} holds the checkpoint of "
                                    f"step {step}; rerun the command with --resume to continue from it")


def test_export_interrupted_writes_nothing(tmp_path, tokenizer):
    model = save_tiny(tmp_path / "tiny", tokenizer)
    out = tmp_path / "export"
    proc = interruptible([sys.executable, "-m", "export.cli", "--model", str(model), "--out", str(out)])
    for line in proc.stdout:  # its progress: stop it in the audit, after the checkpoint is read
        if line.startswith("[2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == f"interrupted: the export wrote nothing; {out} is as it was"
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_train_out_naming_a_file_is_one_line(tmp_path, text_data, capsys):
    (tmp_path / "taken").write_text("not a run folder\n")
    argv = train_argv(tmp_path, text_data, "--iters", "1")
    argv[argv.index("--out") + 1] = str(tmp_path / "taken")
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {tmp_path / 'taken'}: exists and is "
                                                        "a file, not an output folder; choose another path")
