"""The in-process MLX teacher: its stored top-k is the exact top-k of its full logits."""

from dataclasses import replace

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from mlx_student.teacher.local import LocalTeacher, LocalTeacherArgs, topk_of

K = 24


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return LocalTeacher(LocalTeacherArgs(str(teacher_dir), top_k=K, max_tokens=10))


def test_topk_of_is_sorted_and_exact():
    logprobs = mx.array(np.log(np.random.default_rng(0).dirichlet(np.ones(1000))).astype(np.float32))
    top = topk_of(logprobs, 10)
    expected = np.argsort(-np.array(logprobs))[:10]
    assert [i for i, _ in top] == expected.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_stored_topk_equals_topk_of_the_full_logits(teacher):
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    c = teacher.generate(messages)
    assert len(c.completion_ids) == len(c.topk) == c.usage["completion_tokens"] > 0
    prompt = teacher.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # One forward pass over prompt + completion, no KV cache: the full distribution per token.
    logits = teacher.model(mx.array([prompt + c.completion_ids]))[0, len(prompt) - 1 : -1]
    full = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    for i, (token, top) in enumerate(zip(c.completion_ids, c.topk)):
        ids, logprobs = np.array([t for t, _ in top]), np.array([lp for _, lp in top])
        assert len(top) == K and np.all(np.diff(logprobs) <= 0)
        assert token == ids[0] == full[i].argmax()  # greedy
        np.testing.assert_allclose(logprobs, full[i][ids], atol=2e-4)
        kth = np.sort(full[i])[::-1][K - 1]
        assert set(np.flatnonzero(full[i] > kth + 2e-4)) <= set(ids.tolist())
        assert full[i][ids].min() >= kth - 2e-4
    text_ids = c.completion_ids[:-1] if c.finish_reason == "stop" else c.completion_ids
    assert teacher.tokenizer.decode(text_ids) == c.text


def test_mlx_lm_generate_runs_the_default_teacher_folder(teacher):
    text = mlx_lm.generate(teacher.model, teacher.tokenizer, "def fibonacci(n):", max_tokens=6)
    assert isinstance(text, str) and text.strip()


def test_sampling_is_reproducible_per_prompt(teacher, monkeypatch):
    monkeypatch.setattr(teacher, "args", replace(teacher.args, temperature=1.0, max_tokens=6))
    t = teacher
    messages = [{"role": "user", "content": "Tell me a word."}]
    assert t.generate(messages).completion_ids == t.generate(messages).completion_ids


def test_batched_greedy_equals_one_at_a_time(teacher, monkeypatch):
    """generate_many (mlx-lm BatchGenerator, left-padded rows) gives the unbatched greedy tokens
    and top-k; a token may differ only where the unbatched top-2 are an fp32 tie."""
    monkeypatch.setattr(teacher, "args", replace(teacher.args, max_tokens=8, batch_size=3))
    convs = [[{"role": "user", "content": text}] for text in (
        "Say hi.", "Write a Python function that reverses a list of numbers.",
        "What does the json module do?", "Name a colour.", "def add(a, b):")]
    one = [teacher.generate(m) for m in convs]
    got = dict(teacher.generate_many(convs))
    assert sorted(got) == list(range(len(convs)))
    for a, b in zip(one, (got[i] for i in range(len(convs)))):
        n = next((i for i, (x, y) in enumerate(zip(a.completion_ids, b.completion_ids)) if x != y),
                 None)
        if n is not None:  # a split: only at a near-tie of the unbatched distribution
            assert a.topk[n][0][1] - a.topk[n][1][1] < 1e-3, (n, a.topk[n][:2])
            continue
        assert a.completion_ids == b.completion_ids and a.finish_reason == b.finish_reason
        assert a.text == b.text and a.usage == b.usage
        for ra, rb in zip(a.topk, b.topk):
            assert ra[0][0] == rb[0][0]
            np.testing.assert_allclose([lp for _, lp in ra], [lp for _, lp in rb], atol=1e-3)
