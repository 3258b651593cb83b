"""The generation API (runtime.generate) against mlx-lm's own generation on the same checkpoint."""

import mlx_lm
import pytest

from runtime.generate import GenerationParams, MLXEngine, chat_prompt, generate, stream
from conftest import save_tiny

PROMPTS = ["Say hello.", "What is 2 + 3?", "Name three colours."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("rt") / "tiny", tokenizer, seed=1)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return MLXEngine.load(teacher_dir)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return MLXEngine.load(tiny_dir)


def mlx_lm_tokens(engine, prompt, n):
    return [r.token for r in mlx_lm.stream_generate(engine.model, engine.tokenizer, prompt, max_tokens=n)]


def check_equal(engine, content, n):
    prompt = chat_prompt(engine.tokenizer, [{"role": "user", "content": content}])
    ours = generate(engine, prompt, GenerationParams(max_tokens=n))
    theirs = mlx_lm.generate(engine.model, engine.tokenizer, prompt, max_tokens=n)
    assert ours.text == theirs
    expected = [t for t in mlx_lm_tokens(engine, prompt, n) if t not in engine.tokenizer.eos_token_ids]
    assert ours.tokens == expected
    assert ours.finish_reason == ("length" if len(ours.tokens) == n else "stop")
    assert ours.generation_tokens == len(ours.tokens) and ours.prompt_tokens == len(prompt)
    return ours


def test_greedy_equals_mlx_lm_generate_tiny(tiny):
    for content in PROMPTS:
        check_equal(tiny, content, 24)


def test_greedy_equals_mlx_lm_generate_teacher_and_stops_at_eos(teacher):
    out = check_equal(teacher, "Say hi.", 32)
    assert out.finish_reason == "stop" and 0 < len(out.tokens) < 32  # ended by <|im_end|>
    assert "<|im_end|>" not in out.text


def test_stop_strings_cut_text_and_streaming_joins_to_the_same(tiny):
    prompt = chat_prompt(tiny.tokenizer, [{"role": "user", "content": "Count from 1 to 20."}])
    sampled = dict(max_tokens=40, temperature=1.0, seed=0)  # the random model's greedy text is "\n\n\n..."
    full = generate(tiny, prompt, GenerationParams(**sampled))
    middle = len(tiny.tokenizer.decode(full.tokens[:20]))
    stop = full.text[middle - 2: middle + 2]  # a stop string spanning tokens, mid-output
    assert len(stop) == 4
    pieces = list(stream(tiny, prompt, GenerationParams(**sampled, stop=["NEVER-SEEN", stop])))
    text = "".join(r.text for r in pieces)
    assert pieces[-1].finish_reason == "stop"
    assert text == full.text[: full.text.index(stop)]
    assert all(stop not in r.text for r in pieces)
    assert len(pieces) > 2  # it really streamed


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    teacher = tiny
    prompt = chat_prompt(teacher.tokenizer, [{"role": "user", "content": "Write a word."}])
    p = GenerationParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=3)
    a, b = generate(teacher, prompt, p), generate(teacher, prompt, p)
    assert a.tokens == b.tokens
    greedy = generate(teacher, prompt, GenerationParams(max_tokens=16))
    others = [generate(teacher, prompt, GenerationParams(max_tokens=16, temperature=1.5, seed=s)).tokens
              for s in range(4)]
    assert any(o != greedy.tokens for o in others)


def test_time_limit(tiny):
    out = generate(tiny, "Hello", GenerationParams(max_tokens=100_000, time_limit_s=0.3))
    assert out.finish_reason == "length" and 0 < len(out.tokens) < 100_000


def test_bad_params(tiny):
    with pytest.raises(ValueError):
        generate(tiny, "Hello", GenerationParams(max_tokens=0))
    with pytest.raises(ValueError):
        generate(tiny, [], GenerationParams(max_tokens=2))
