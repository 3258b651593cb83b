"""make_kd_mix end to end: a real mlx_lm.server (the default teacher), the real local teacher,
real corpora; faults from the thin proxy of test_teacher in front of the real server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mlx_student.teacher import kd_mix
from mlx_student.config import ConfigError
from mlx_student.data import load_jsonl
from test_teacher import FaultProxy

ROOT = Path(__file__).parent.parent
PROMPTS = ["Count from 1 to 4.", "Name two fruits.", "What is 3+3?", "Say hi in Spanish.",
           "Name a planet.", "Give a synonym for big.", "What color is the sky?",
           "Name a prime number."]
N = 6


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "tests.jsonl"
    lines = [{"prompt": p} for p in PROMPTS] + [{"prompt": PROMPTS[0]}]  # one duplicate
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture
def proxy(server):  # conftest's real mlx_lm.server
    p = FaultProxy(server.url)
    yield p
    p.close()


def write_config(tmp_path, teacher_dir, prompt_file, url=None, **settings):
    config = {
        "teacher": "http", "base_url": url and url + "/v1", "model": "default_model",
        "teacher_tokenizer": str(teacher_dir), "student_tokenizer": str(teacher_dir),
        "out": str(tmp_path / "kd"), "num_records": N, "max_tokens": 8, "top_k": 5,
        "concurrency": 2, "valid_fraction": 0.2, "test_fraction": 0.2, "max_retries": 6,
        "sources": [{"name": "tests", "jsonl": str(prompt_file)}], **settings,
    }
    path = tmp_path / "kd_mix.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(out):
    """The whole lines of the split files (a line still being written is not one)."""
    return [json.loads(line) for split in kd_mix.SPLITS if (out / f"{split}.jsonl").exists()
            for line in (out / f"{split}.jsonl").read_text().split("\n")[:-1]]


def check_folder(out, tokenizer, n, k=5):
    """n unique records that mlx_student.data loads, with sorted, aligned top-k."""
    rs = records(out)
    assert len(rs) == n == len({r["id"] for r in rs})
    for split in kd_mix.SPLITS:
        if (out / f"{split}.jsonl").stat().st_size:
            load_jsonl(out / f"{split}.jsonl", tokenizer, 49152, 256)
    for r in rs:
        assert len(r["completion_ids"]) == len(r["topk"]) == r["usage"]["completion_tokens"]
        for token, top in zip(r["completion_ids"], r["topk"]):
            assert len(top) == k and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            assert token == top[0][0]  # greedy: the generated token is the argmax
    return rs


def test_http_teacher_writes_complete_records_and_a_rerun_does_nothing(
        tmp_path, proxy, teacher_dir, tokenizer, prompt_file):
    config = write_config(tmp_path, teacher_dir, prompt_file, proxy.url)
    manifest = kd_mix.run(kd_mix.parse_args(["--config", str(config)]))
    out = tmp_path / "kd"
    rs = check_folder(out, tokenizer, N)
    assert len(proxy.posts()) == N and manifest["status"] == "complete"
    assert {r["messages"][0]["content"] for r in rs} <= set(PROMPTS)
    assert all(r["teacher"]["sampling"]["top_logprobs"] == 5 and r["reasoning"] is None for r in rs)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["kd"] == "topk" and saved["records"] == saved["records_with_topk"] == N
    assert sum(n for split in saved["counts"].values() for n in split.values()) == N
    assert saved["student_tokenizer"]["vocab_hash"] == saved["teacher"]["tokenizer_vocab_hash"]
    assert saved["last_run"]["aligned"] == N and saved["last_run"]["mismatched"] == 0
    before = {s: (out / f"{s}.jsonl").read_bytes() for s in kd_mix.SPLITS}
    again = kd_mix.run(kd_mix.parse_args(["--config", str(config)]))
    assert len(proxy.posts()) == N and again["last_run"]["written"] == 0
    assert before == {s: (out / f"{s}.jsonl").read_bytes() for s in kd_mix.SPLITS}


def test_killed_run_resumes_to_exactly_n_unique_records(
        tmp_path, proxy, teacher_dir, tokenizer, prompt_file):
    n = 4
    config = write_config(tmp_path, teacher_dir, prompt_file, proxy.url, concurrency=1,
                          num_records=n)
    out = tmp_path / "kd"
    cmd = [sys.executable, "-m", "mlx_student.teacher.kd_mix", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(records(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = records(out)
    assert 2 <= len(first) < n
    with open(out / "train.jsonl", "a") as f:  # a crash in the middle of a write
        f.write('{"id": "torn", "messages": [{"ro')
    requests_before = len(proxy.posts())
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cut off a torn last line" in done.stderr
    rs = check_folder(out, tokenizer, n)
    assert len(proxy.posts()) - requests_before == n - len(first)
    assert [r["id"] for r in rs if r["id"] in {x["id"] for x in first}] == [x["id"] for x in first]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["last_run"]["repaired_torn_lines"]


def test_faults_lose_and_duplicate_nothing(tmp_path, proxy, teacher_dir, tokenizer, prompt_file):
    faults = ["500", "429", "drop", "hang", "500", "429"]
    # the hang outlasts the timeout; the timeout is long enough for a real answer on a busy machine
    proxy.faults, proxy.retry_after, proxy.hang_s = list(faults), 1, 14.0
    config = write_config(tmp_path, teacher_dir, prompt_file, proxy.url, timeout=12.0)
    manifest = kd_mix.run(kd_mix.parse_args(["--config", str(config)]))
    check_folder(tmp_path / "kd", tokenizer, N)  # N unique records: none lost, none twice
    assert manifest["status"] == "complete" and manifest["last_run"]["failures"] == 0
    retries = manifest["last_run"]["retries"]
    assert sorted(e[1] for e in proxy.posts()[:6]) == sorted(faults)
    assert retries >= 6 and len(proxy.posts()) == N + retries  # every retry one more POST


def test_unknown_teacher_tokenizer_falls_back_to_sequence_level(
        tmp_path, server, teacher_dir, tokenizer, prompt_file):
    config = write_config(tmp_path, teacher_dir, prompt_file, server.url,
                          teacher_tokenizer=None, num_records=2)
    manifest = kd_mix.run(kd_mix.parse_args(["--config", str(config)]))
    assert manifest["kd"] == "sequence" and "unknown" in manifest["kd_note"]
    rs = records(tmp_path / "kd")
    assert len(rs) == 2 and not any("topk" in r or "completion_ids" in r for r in rs)


def test_local_teacher_over_the_builtin_corpora_mixes_by_weight(
        tmp_path, teacher_dir, tokenizer, prompt_file):
    sources = [{"name": "stdlib_fix", "weight": 2}, {"name": "docs_recall", "weight": 1},
               {"name": "tests", "jsonl": str(prompt_file), "weight": 1}]
    config = write_config(tmp_path, teacher_dir, prompt_file, teacher="local", model=str(teacher_dir),
                          num_records=4, max_tokens=4, top_k=16, sources=sources)
    manifest = kd_mix.run(kd_mix.parse_args(["--config", str(config)]))
    rs = check_folder(tmp_path / "kd", tokenizer, 4, k=16)
    by_source = {}
    for r in rs:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    assert by_source == {"stdlib_fix": 2, "docs_recall": 1, "tests": 1}
    assert manifest["teacher"]["endpoint"] == "local" and manifest["kd"] == "topk"
    fix = next(r for r in rs if r["source"] == "stdlib_fix")["messages"][0]["content"]
    assert fix.startswith("This function from the Python standard library module")


def test_settings_errors_name_the_file_and_line(tmp_path, teacher_dir, prompt_file, capsys):
    config = write_config(tmp_path, teacher_dir, prompt_file, "http://127.0.0.1:1")
    config.write_text(config.read_text() + "temprature: 0.5\n")
    line = len(config.read_text().splitlines())
    with pytest.raises(SystemExit) as exit_info:
        kd_mix.main(["--config", str(config)])
    assert exit_info.value.code == 2
    assert f"{config}:{line}: temprature: unknown setting" in capsys.readouterr().err
    bad = write_config(tmp_path, teacher_dir, prompt_file, "http://127.0.0.1:1",
                       sources=[{"name": "no_such_builder"}])
    with pytest.raises(ConfigError, match=r"sources\[0\]: builder 'no_such_builder' unknown"):
        kd_mix.parse_args(["--config", str(bad)])
    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_text('{"prompt": "ok"}\n{"messages": "hi"}\n')
    with pytest.raises(SystemExit):
        kd_mix.main(["--config", str(config.with_name("none.yaml"))])
    assert "none.yaml: cannot read" in capsys.readouterr().err
    good = write_config(tmp_path, teacher_dir, prompt_file, "http://127.0.0.1:1")
    with pytest.raises(SystemExit):
        kd_mix.main(["--config", str(good), "--prompts", str(bad_prompts)])
    assert f"{bad_prompts}:2: field 'messages'" in capsys.readouterr().err


def test_a_folder_of_another_teacher_setup_is_refused(tmp_path, teacher_dir, prompt_file):
    config = write_config(tmp_path, teacher_dir, prompt_file, "http://127.0.0.1:1")
    out = tmp_path / "kd"
    out.mkdir()
    old = {"kind": "http", "model": "default_model", "sampling": {"temperature": 0.7}}
    (out / "manifest.json").write_text(json.dumps({"teacher": old}))
    with pytest.raises(ConfigError, match="holds records of another teacher setup"):
        kd_mix.run(kd_mix.parse_args(["--config", str(config)]))
    assert os.listdir(out) == ["manifest.json"]


def test_failures_are_counted_by_kind_and_the_first_reason_printed(
        tmp_path, proxy, teacher_dir, prompt_file, capsys):
    proxy.faults = ["500", "500"]  # no retries: two jobs fail for good
    config = write_config(tmp_path, teacher_dir, prompt_file, proxy.url, max_retries=0,
                          concurrency=1)
    with pytest.raises(SystemExit) as e:
        kd_mix.main(["--config", str(config)])
    manifest = json.loads((tmp_path / "kd" / "manifest.json").read_text())
    first = manifest["last_run"]["first_failures"][0]
    assert e.value.code == 1 and manifest["last_run"]["failure_kinds"] == {"HTTP 500": 2}
    assert "last: HTTP 500" in first
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"failures by kind: HTTP 500 x2; the first: {first} (more in {tmp_path / 'kd' / 'manifest.json'})")
