"""pilot/heldout.py against numpy references: per-sequence KL / CE / agreement, the batched
next-line ranking against one forward pass per candidate, and the paired bootstrap."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT

from mlx_student import model as student_model
from mlx_student.config import load_config
from pilot import heldout as ho

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def two_models():
    config = load_config(TINY)
    return student_model.build(config, seed=1), student_model.build(config, seed=2)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_sequence_stats_match_numpy(two_models):
    student, teacher = two_models
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 49152, (2, 17)).astype(np.int32) for _ in range(2)]
    stats = ho.sequence_stats({"s": student}, teacher, batches)
    assert stats["s"].shape == stats["teacher"].shape == (4, 4)
    rows = []
    for b in batches:
        lp = log_softmax(teacher(mx.array(b[:, :-1])))
        lq = log_softmax(student(mx.array(b[:, :-1])))
        kl = (np.exp(lp) * (lp - lq)).sum(-1).sum(-1)
        ce = -np.take_along_axis(lq, b[:, 1:, None].astype(np.int64), -1)[..., 0].sum(-1)
        agree = (lq.argmax(-1) == lp.argmax(-1)).sum(-1)
        rows.append(np.stack([kl, ce, agree, np.full(2, 16)], 1))
    want = np.concatenate(rows)
    # fp32 log-softmax over 49152 entries: relative error ~1e-6 per term, summed over 16 tokens
    np.testing.assert_allclose(stats["s"][:, :2], want[:, :2], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(stats["s"][:, 2:], want[:, 2:])
    assert (stats["teacher"][:, 0] == 0).all() and (stats["teacher"][:, 2] == 16).all()


def test_next_line_ranking_matches_one_pass_per_candidate(two_models, tokenizer, tmp_path):
    model, _ = two_models
    path = ROOT / "data/stdlib/test.jsonl"
    items = ho.next_line_items(path, tokenizer, 6, 24, 3, seed=0)
    docs = [json.loads(line)["text"] for line in open(path)]
    for ctx, cands in items:
        assert len(ctx) == 24 and len(cands) == 3
        true = tokenizer.decode(cands[0])
        assert any(tokenizer.decode(ctx) + true in d for d in docs)  # the line that follows
        assert all(tokenizer.decode(c) != true for c in cands[1:])
    want = []
    for ctx, cands in items:
        means = []
        for c in cands:
            tokens = mx.array([ctx + c])
            lq = log_softmax(model(tokens[:, :-1]))[0]
            means.append(np.mean([lq[len(ctx) - 1 + i, t] for i, t in enumerate(c)]))
        want.append(int(np.argmax(means)) == 0)
    np.testing.assert_array_equal(ho.next_line_correct(model, items, items_per_batch=4), want)


def test_bootstrap_is_paired_and_matches_numpy():
    rng = np.random.default_rng(3)
    a = np.column_stack([rng.random(10), rng.random(10) + 2, rng.integers(0, 5, 10), np.full(10, 5)])
    b = a.copy()
    b[:, :2] += 0.5  # b is worse than a by 0.1 per token on KL and CE in every sequence
    lines = {"a": np.array([1, 0, 1, 1]), "b": np.array([0, 0, 1, 1])}
    s = ho.summarize({"a": a, "b": b}, lines, control="a", resamples=500, seed=7)
    assert s["models"]["a"]["kl"]["value"] == pytest.approx(a[:, 0].sum() / 50)
    assert s["models"]["a"]["ppl"]["value"] == pytest.approx(np.exp(a[:, 1].sum() / 50))
    assert s["models"]["b"]["next_line"]["value"] == 0.5
    d = s["minus_control"]["b"]
    # a constant per-sequence shift: every paired resample differs by exactly 0.1
    assert d["kl"]["value"] == pytest.approx(0.1) and d["kl"]["ci95"] == pytest.approx([0.1, 0.1])
    assert d["top1_agree"]["ci95"] == [0.0, 0.0]
    idx = np.random.default_rng(7).integers(0, 10, (500, 10))
    boot = a[idx, 0].sum(1) / a[idx, 3].sum(1)
    assert s["models"]["a"]["kl"]["ci95"] == pytest.approx(np.percentile(boot, [2.5, 97.5]).tolist())
