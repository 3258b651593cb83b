"""Teacher forcing: the default teacher scores existing text into top-k and sampled targets
(mlx_student.teacher.local.score, mlx_student.teacher.score; issue 15, item 2)."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import write_jsonl

from mlx_student.data import load_dataset
from mlx_student.teacher.local import LocalTeacher, LocalTeacherArgs, sample_counts

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return LocalTeacher(LocalTeacherArgs(str(teacher_dir)))


@pytest.fixture(scope="module")
def windows(tokenizer):
    text = (STDLIB / "bisect.py").read_text()
    ids = tokenizer.encode(text)
    return [ids[:40], ids[40:73], ids[100:150]]  # different lengths: padded in one batch


def test_scores_are_the_teachers_own_distribution(teacher, windows):
    scored = {i: (t, s) for i, t, s in teacher.score(windows, top_k=8, samples=16, batch_size=3)}
    assert sorted(scored) == [0, 1, 2]
    for i, w in enumerate(windows):
        logits = teacher.model(mx.array([w[:-1]]))[0].astype(mx.float32)  # alone, unpadded
        logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        topk, sampled = scored[i]
        assert len(topk) == len(sampled) == len(w) - 1
        for pos, (row_t, row_s) in enumerate(zip(topk, sampled)):
            ref = np.sort(logprobs[pos])[::-1][:8]
            # fp32 logits of another batch shape: |err| ~ 1e-5 on values of order 10
            np.testing.assert_allclose([lp for _, lp in row_t], ref, rtol=1e-4, atol=1e-4)
            for t, lp in row_t:
                assert lp == pytest.approx(logprobs[pos, t], abs=1e-4)
            assert sum(c for _, c in row_s) == 16
            assert all(logprobs[pos, t] > -30 for t, _ in row_s)  # drawn from the support
            assert [c for _, c in row_s] == sorted((c for _, c in row_s), reverse=True)


def test_draws_are_keyed_by_seed_and_window(teacher, windows):
    def draws(seed, batch_size, ws):
        return {tuple(ws[i]): s for i, _, s in teacher.score(ws, samples=16, seed=seed,
                                                            batch_size=batch_size)}

    a = draws(0, 3, windows)
    assert draws(0, 3, windows[::-1]) == a  # batch mates and order do not matter
    assert draws(1, 3, windows) != a


def test_sample_counts_follow_the_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50) * 2
    p = np.exp(logits - np.logaddexp.reduce(logits))
    n = 20000
    (row,) = sample_counts(mx.array(np.log(p)[None].astype(np.float32)), n, mx.random.key(3))
    freq = np.zeros(50)
    for t, c in row:
        freq[t] = c / n
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-9)


def test_cli_writes_scored_records_the_trainer_loads(tmp_path, tokenizer, teacher_dir):
    data = tmp_path / "text"
    docs = [{"text": (STDLIB / name).read_text()[:1500]} for name in ("bisect.py", "heapq.py", "glob.py")]
    write_jsonl(data / "train.jsonl", docs[:2])
    write_jsonl(data / "valid.jsonl", docs[2:])
    out = tmp_path / "scored"
    cmd = [sys.executable, "-m", "mlx_student.teacher.score", "--model", str(teacher_dir), "--data",
           str(data), "--out", str(out), "--top-k", "4", "--samples", "8", "--max-seq-length", "64",
           "--max-tokens", "200", "--batch-size", "2"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["top_k"] == 4 and manifest["samples"] == 8
    splits = load_dataset(out, tokenizer, 49152, 64)
    for name, split in splits.items():
        examples = split.examples
        assert split.format == "kd" and manifest["splits"][name]["records"] == len(examples)
        assert manifest["splits"][name]["tokens"] == sum(len(ex.tokens) - 1 for ex in examples)
        assert 200 <= manifest["splits"][name]["tokens"] < 200 + 64 or name == "valid"
        for ex in examples:
            assert ex.prompt_len == 1 and ex.topk_ids.shape == (len(ex.tokens) - 1, 4)
            np.testing.assert_array_equal(ex.sampled_counts.sum(axis=1), 8)
    assert manifest["splits"]["train"]["sampled_bytes_per_token"] > 0

    bad = tmp_path / "kd"
    write_jsonl(bad / "train.jsonl", [{"prompt": "hi", "completion": "hello"}])
    proc = subprocess.run(cmd[:6] + [str(bad), "--out", str(tmp_path / "x")], check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "format 'completions'; scoring takes text records" in proc.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written
