"""Random-sampled KD targets (arXiv 2503.16870): the loss against a float64 numpy reference,
its gradient's unbiasedness, and sampled records through mlx_student.data (issue 15, item 2)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import write_jsonl
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_student import losses
from mlx_student.batches import iterate_batches
from mlx_student.data import DataError, load_jsonl

RTOL, ATOL = 1e-5, 1e-6


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ref_sampled_kd(logits, ids, counts, mask):
    """sum over masked positions of KL(counts / N || q), one position at a time, / mask sum."""
    total = 0.0
    for b, l in zip(*np.nonzero(mask)):
        log_q = np_log_softmax(logits[b, l])
        n = counts[b, l].sum()
        for i, c in zip(ids[b, l], counts[b, l]):
            if c > 0:
                p = c / n
                total += mask[b, l] * p * (np.log(p) - log_q[i])
    return total / max(mask.sum(), 1.0)


def make_batch(seed, B=3, L=5, V=13, S=6, N=16):
    """N draws per position from a random teacher, as distinct ids with counts, padded to S
    entries (count 0, id 0); masked positions hold extreme logits and garbage counts."""
    rng = np.random.default_rng(seed)
    mask = rng.random((B, L)) < 0.6
    mask[0] = False
    mask[-1, 0] = True
    logits = np.where(mask[..., None], rng.normal(size=(B, L, V)) * 3, rng.choice([-1e4, 1e4], (B, L, V)))
    p = np.exp(np_log_softmax(rng.normal(size=(B, L, V)) * 2))
    ids = np.zeros((B, L, S), np.int32)
    counts = np.zeros((B, L, S), np.float32)
    for b in range(B):
        for l in range(L):
            draws = rng.choice(V, size=N, p=p[b, l])
            u, c = np.unique(draws, return_counts=True)
            u, c = u[np.argsort(-c, kind="stable")][:S], np.sort(c)[::-1][:S]  # keep the S most drawn
            ids[b, l, : len(u)], counts[b, l, : len(c)] = u, c
    return logits.astype(np.float32), ids, counts, mask


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), float_mask=st.booleans())
def test_sampled_kd_matches_reference(seed, float_mask):
    logits, ids, counts, mask = make_batch(seed)
    m = mask.astype(np.float32) * (0.5 if float_mask else 1.0)
    out = losses.sampled_kd(mx.array(logits), mx.array(ids), mx.array(counts), mx.array(m))
    assert out.shape == () and out.dtype == mx.float32
    np.testing.assert_allclose(out.item(), ref_sampled_kd(logits, ids, counts, m), rtol=RTOL, atol=ATOL)


def test_gradient_is_student_minus_empirical_teacher():
    logits, ids, counts, mask = make_batch(3)
    grad = np.array(mx.grad(lambda x: losses.sampled_kd(x, mx.array(ids), mx.array(counts),
                                                           mx.array(mask)))(mx.array(logits)))
    q = np.exp(np_log_softmax(logits))
    p_hat = np.zeros_like(q)
    for b, l, s in zip(*np.nonzero(counts)):
        p_hat[b, l, ids[b, l, s]] += counts[b, l, s] / counts[b, l].sum()
    expected = (q - p_hat) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, expected, rtol=RTOL, atol=ATOL)
    assert (grad[~mask] == 0).all()


def test_gradient_is_unbiased_where_topk_is_not():
    """Mean of the sampled-KD gradient over many independent draws -> the dense forward-KL
    gradient q - p, within 5 standard errors; the top-k (K=4, tail bucket) gradient is off."""
    rng = np.random.default_rng(0)
    V, N, R = 13, 16, 4000
    teacher = rng.normal(size=V) * 1.5
    p = np.exp(np_log_softmax(teacher))
    logits = mx.array(np.tile(rng.normal(size=V).astype(np.float32), (R, 1))[None])
    draws = rng.multinomial(N, p, size=R).astype(np.float32)  # (R, V) counts
    ids = mx.array(np.tile(np.arange(V, dtype=np.int32), (R, 1))[None])
    mask = mx.ones((1, R))
    # the loss is a mean over the R positions: R * grad is each draw's own gradient
    g = R * np.array(mx.grad(lambda x: losses.sampled_kd(x, ids, mx.array(draws[None]), mask))(logits))[0]
    dense = R * np.array(mx.grad(lambda x: losses.forward_kl(
        x, mx.array(np.tile(teacher, (R, 1))[None].astype(np.float32)), mask))(logits))[0]
    stderr = g.std(axis=0) / np.sqrt(R)
    assert np.all(np.abs(g.mean(axis=0) - dense[0]) <= 5 * stderr + 1e-6)
    top = np.argsort(-p)[:4]
    tk = R * np.array(mx.grad(lambda x: losses.topk_kd(
        x, mx.array(np.tile(top, (R, 1))[None].astype(np.int32)),
        mx.array(np.tile(np.log(p[top]), (R, 1))[None].astype(np.float32)), mask))(logits))[0]
    assert np.abs(tk[0] - dense[0]).max() > 20 * stderr.max()  # truncation moves the target


def test_sampled_records_load_and_batch(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "Say hi."}]
    completion = tokenizer.encode("Hi there", add_special_tokens=False)
    sampled = [[[t, 12], [7, 4]] for t in completion]
    text_ids = tokenizer.encode("def f(x):\n    return x")
    scored = [[[t, 16]] for t in text_ids[1:]]
    write_jsonl(tmp_path / "train.jsonl", [
        {"messages": messages, "completion": "Hi there", "finish_reason": "length",
         "completion_ids": completion, "sampled": sampled},
        {"text": "def f(x):\n    return x", "ids": text_ids, "sampled": scored,
         "topk": [[[t, -0.1]] for t in text_ids[1:]]},
    ])
    split = load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 64)
    assert split.format == "kd"
    kd, text = split.examples
    assert text.prompt_len == 1 and text.tokens.tolist() == text_ids
    np.testing.assert_array_equal(kd.sampled_counts, [[12, 4]] * len(completion))
    np.testing.assert_array_equal(text.sampled_ids[:, 0], text_ids[1:])
    np.testing.assert_array_equal(text.sampled_counts, [[16, 0]] * (len(text_ids) - 1))
    batch = next(iterate_batches(split.examples, 2, 64))
    n = len(text_ids) - 1
    targets = np.array(batch["targets"])
    (t_row,) = [j for j in range(2) if targets[j, :n].tolist() == text_ids[1:]]
    sampled_ids, counts = np.array(batch["sampled_ids"]), np.array(batch["sampled_counts"])
    np.testing.assert_array_equal(np.array(batch["kd_mask"]), np.array(batch["mask"]))
    assert np.array(batch["mask"])[t_row].sum() == n  # scored text: every target counts
    np.testing.assert_array_equal(sampled_ids[t_row, :n, 0], text_ids[1:])
    assert counts[t_row, :n].tolist() == [[16, 0]] * n
    assert counts[1 - t_row].sum() == 16 * len(completion)
    # loss on a batch: finite, and zero for a student that puts all mass where the teacher's draws fell
    # a student sure of each target: KL 0 where all draws fell on it (the scored text), and
    # on the kd record's draws split 12/4 it pays 0.25 * (log 0.25 + 1e4) at each token
    logits = mx.where(mx.arange(49152) == batch["targets"][..., None], 1e4, 0.0)
    loss = losses.sampled_kd(logits, batch["sampled_ids"], batch["sampled_counts"], batch["kd_mask"])
    kd_tokens = len(completion)
    expected = kd_tokens * (0.75 * np.log(0.75) + 0.25 * (np.log(0.25) + 1e4)) / (kd_tokens + n)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("sampled, message", [
    ([[[5, 0]]], "expected an [id, count] pair of an integer and a positive integer, got [5, 0]"),
    ([[[5, 1.5]]], "got [5, 1.5]"),
    ([[[99999, 1]]], "outside"),
])
def test_bad_sampled_entries_name_line_and_field(tmp_path, tokenizer, sampled, message):
    ids = tokenizer.encode("x = 1")
    good = {"text": "x = 1", "ids": ids, "sampled": [[[t, 1]] for t in ids[1:]]}
    bad = {**good, "sampled": sampled + good["sampled"][1:]}
    write_jsonl(tmp_path / "train.jsonl", [good, bad])
    with pytest.raises(DataError) as e:
        load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 64)
    assert "train.jsonl:2: field 'sampled[0][0]'" in str(e.value) and message in str(e.value)
