"""mlx_student.files: atomic folder writes that never leave a half-written result and never
replace a folder the project did not write."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_student.files import MARKER, OutputExistsError, atomic_dir, claim_dir, recover

ROOT = Path(__file__).resolve().parents[1]


def write(path, name, text):
    with atomic_dir(path) as tmp:
        (tmp / name).write_text(text)


def test_a_result_replaces_its_own_earlier_result(tmp_path):
    out = tmp_path / "run"
    write(out, "a.txt", "1")
    write(out, "b.txt", "2")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "b.txt"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no temp left


def test_a_failure_leaves_the_old_result(tmp_path):
    out = tmp_path / "run"
    write(out, "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    out = tmp_path / "run"
    write(out, "a.txt", "old")
    aside = tmp_path / ".run.old-x"
    aside.mkdir()
    out.rename(aside / "run")  # the first rename done, the second never happened
    recover(out)
    assert (out / "a.txt").read_text() == "old" and not aside.exists()


def test_foreign_folders_files_and_the_current_folder_are_refused(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match=r"mine: exists and holds files no mlx-student command wrote \(precious.txt\)"):
        write(mine, "a.txt", "x")
    assert sorted(p.name for p in mine.iterdir()) == ["precious.txt"]
    afile = tmp_path / "afile"
    afile.write_text("keep")
    with pytest.raises(OutputExistsError, match="afile: exists and is a file"):
        write(afile, "a.txt", "x")
    assert afile.read_text() == "keep"
    monkeypatch.chdir(mine)
    with pytest.raises(OutputExistsError, match="is the current folder or holds it"):
        write(Path("."), "a.txt", "x")
    with pytest.raises(OutputExistsError, match="is the current folder or holds it"):
        write(Path(".."), "a.txt", "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    write(empty, "a.txt", "x")  # an empty folder is fine
    assert (claim_dir(tmp_path / "claimed") / MARKER).exists()
    write(tmp_path / "claimed", "a.txt", "x")  # a claimed folder may be replaced


def test_train_refuses_an_out_folder_of_other_files_before_training(tmp_path):
    out = tmp_path / "mydir"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    r = subprocess.run([sys.executable, "-m", "mlx_student.train", "--config", "configs/tiny.yaml",
                        "--iters", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {out}: exists and holds files no mlx-student command wrote (precious.txt)" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_jsonl_records_number_lines_and_name_the_bad_one(tmp_path):
    from mlx_student.files import jsonl_records

    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{"b": \n')
    got = []
    with pytest.raises(KeyError, match=r"x.jsonl:4: invalid JSON: Expecting value \(column 7\)"):
        for n, value in jsonl_records(path, KeyError):
            got.append((n, value))
    assert got == [(1, {"a": 1}), (3, [2])]
    with pytest.raises(ValueError, match=r"missing.jsonl: cannot read: No such file"):
        list(jsonl_records(tmp_path / "missing.jsonl"))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')  # before: a UnicodeDecodeError traceback
    with pytest.raises(KeyError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at offset 19\)"):
        list(jsonl_records(latin1, KeyError))
