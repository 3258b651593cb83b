"""mlx_student.claimify end to end: bad inputs end in one clear line and nothing half-written;
real backends (MLX engine, an endpoint served by runtime.server) with constrained stage outputs;
--emit-kd records in the KD contract that mlx_student.train trains on."""

import json
import subprocess
import sys
import threading

import pytest

from arbiter.claims import claimify
from arbiter.claims.gold import EVIDENCE
from conftest import save_tiny, train_argv

ANSWER = ("Deques support fast appends at both ends. I hope this helps! "
          "Indexed access in the middle of a deque is O(n).")
VOTES_1 = ["--selection-votes", "1", "--selection-min-successes", "1", "--disambiguation-votes", "1",
           "--disambiguation-min-successes", "1"]


def fail(argv, capsys):
    with pytest.raises(SystemExit) as e:
        claimify.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("error: ")
    return last


@pytest.mark.parametrize("content,expected", [
    (b"  \n", r"a.txt: the answer is empty"),
    (b"Fine.\n\xc3\x28 broken", r"a.txt:2: answer: not UTF-8 \(byte 0xc3 at offset 6\)"),
    (b"Short. " + b"x" * 10_000 + b".", r"a.txt: sentence 2 \(characters 7-10008\) is 10001 characters long"),
])
def test_bad_answers_fail_clearly_and_write_nothing(tmp_path, capsys, content, expected):
    import re

    (tmp_path / "a.txt").write_bytes(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    err = fail(["--answer", str(tmp_path / "a.txt"), "--out", str(out)], capsys)
    assert re.search(expected, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_answers_jsonl_and_manifest_name_file_line_field(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"answer": "Fine."}) + "\n" + json.dumps({"id": "b", "answer": 3}) + "\n")
    err = fail(["--answers", str(answers), "--out", str(tmp_path / "out")], capsys)
    assert err == f"error: {answers}:2: field 'answer': expected a string"
    answers.write_text(json.dumps({"answer": "Fine."}) + "\n")
    manifest = tmp_path / "ev.json"
    item = {"id": "bad id!", "kind": "document", "source": "x", "text": "t"}
    manifest.write_text(json.dumps({"id": "m", "items": [item]}))
    err = fail(["--answers", str(answers), "--evidence", str(manifest), "--out", str(tmp_path / "out")], capsys)
    assert err == (f"error: {manifest}: $.items[0].id: 'bad id!' does not match '^[A-Za-z0-9_.:-]{{1,64}}$' "
                   "(rule: pattern)")
    assert not (tmp_path / "out").exists()


def test_failure_mid_run_leaves_no_output(tmp_path, capsys):
    """An endpoint that refuses connections fails after the run started: no output folder."""
    from mlx_student.teacher.server import free_port

    (tmp_path / "a.txt").write_text(ANSWER)
    err = fail(["--answer", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--emit-kd", str(tmp_path / "kd"),
                "--endpoint", f"http://127.0.0.1:{free_port()}/v1", "--max-retries", "0"], capsys)
    assert "failed after 1 attempts" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "arbiter.claims.claimify", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--emit-kd", "--evidence", "--endpoint", "--package", "--selection-votes", "--support"):
        assert flag in out.stdout


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("claims") / "tiny", tokenizer, seed=5)


def test_endpoint_served_by_runtime_server(tmp_path, tiny_dir):
    """Against the project's OpenAI-compatible server: the schema travels as response_format, so
    even a random model's stage outputs are all schema-valid; verification runs; KD records
    are text-only (sequence-level) from an endpoint."""
    from runtime.generate import MLXEngine
    from runtime.server import ChatServer

    server = ChatServer(MLXEngine.load(tiny_dir), {"port": 0, "max_tokens_limit": 1200})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    (tmp_path / "a.txt").write_text(ANSWER)
    try:
        claimify.main(["--answer", str(tmp_path / "a.txt"), "--question", "What is a deque?",
                       "--endpoint", f"http://{host}:{port}/v1", "--max-tokens", "1200", *VOTES_1,
                       "--evidence", str(EVIDENCE), "--out", str(tmp_path / "out"),
                       "--emit-kd", str(tmp_path / "kd"), "--kd-valid-fraction", "0"])
    finally:
        server.shutdown()
        server.server_close()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["sentences"] == 3
    assert run["schema_valid"]["selection"] == {"valid": 3, "total": 3}
    assert all(v["valid"] == v["total"] for v in run["schema_valid"].values())
    extraction = json.loads((tmp_path / "out" / "extractions.jsonl").read_text())
    assert [s["text"] for s in extraction["sentences"]] == ["Deques support fast appends at both ends.",
                                                           "I hope this helps!",
                                                           "Indexed access in the middle of a deque is O(n)."]
    verification = json.loads((tmp_path / "out" / "verification.json").read_text())
    assert len(verification["claims"]) == run["claims"]
    records = [json.loads(line) for line in (tmp_path / "kd" / "train.jsonl").read_text().splitlines()]
    assert len(records) == json.loads((tmp_path / "kd" / "manifest.json").read_text())["records"] > 0
    assert all("topk" not in r and r["teacher"]["endpoint"].endswith("/v1/chat/completions") for r in records)


def test_emit_kd_records_train_a_student(tmp_path, tiny_dir, tokenizer):
    """--emit-kd from an MLX engine: records in the KD contract with the grammar-masked teacher
    top-k (greedy: each token is its position's top-1); mlx_student.data loads them and
    mlx_student.train runs top-k KD on them."""
    from mlx_student import train
    from mlx_student.data import load_jsonl

    (tmp_path / "a.txt").write_text(ANSWER)
    claimify.main(["--answer", str(tmp_path / "a.txt"), "--model", str(tiny_dir), "--max-tokens", "1200",
                   *VOTES_1, "--out", str(tmp_path / "out"), "--emit-kd", str(tmp_path / "kd"),
                   "--kd-top-k", "4", "--kd-valid-fraction", "0"])
    records = [json.loads(line) for line in (tmp_path / "kd" / "train.jsonl").read_text().splitlines()]
    assert records and all(r["source"].startswith("claimify:") for r in records)
    for r in records:
        assert set(r) >= {"id", "messages", "completion", "reasoning", "teacher", "finish_reason", "usage",
                          "completion_ids", "topk"}
        assert r["finish_reason"] == "stop" and tokenizer.decode(r["completion_ids"]) == r["completion"]
        assert len(r["topk"]) == len(r["completion_ids"])
        for token, top in zip(r["completion_ids"], r["topk"]):
            assert top[0][0] == token  # greedy under the mask: the decoded token is the masked top-1
            assert all(a[1] >= b[1] for a, b in zip(top, top[1:])) and top[0][1] <= 0
    split = load_jsonl(tmp_path / "kd" / "train.jsonl", tokenizer, 49152, 2048)
    assert (split.format, len(split.examples), split.truncated) == ("kd", len(records), 0)
    train.main(train_argv(tmp_path / "run", tmp_path / "kd", "--iters", "2", "--max-seq-length", "512",
                          "--batch-size", "2", loss={"topk_kd": 1.0}))
    assert (tmp_path / "run" / "student" / "config.json").exists()
