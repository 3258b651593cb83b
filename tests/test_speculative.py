"""Speculative decoding: the output is the target's greedy output, token for token."""

from pathlib import Path

import pytest

from mlx_student import model as student_model
from mlx_student.config import load_config
from runtime.generate import GenerationParams, MLXEngine, chat_prompt, generate
from runtime.speculative import generate_speculative, quantized_drafter, spec_stats

CONFIGS = Path(__file__).parent.parent / "configs"


def tiny(tmp_path_factory, tokenizer, seed):
    config = load_config(CONFIGS / "tiny.yaml")
    path = student_model.save(tmp_path_factory.mktemp("sp") / f"tiny{seed}",
                              student_model.build(config, seed=seed), config, tokenizer)
    return MLXEngine.load(path)


def test_teacher_with_quantized_drafter_equals_teacher_greedy(teacher_dir):
    target, drafter = MLXEngine.load(teacher_dir), quantized_drafter(teacher_dir, bits=4)
    prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": "Say hello."}])
    greedy = generate(target, prompt, GenerationParams(max_tokens=24))
    out, stats = generate_speculative(target, drafter, prompt, GenerationParams(max_tokens=24, num_draft_tokens=3))
    assert out.tokens == greedy.tokens and out.text == greedy.text
    assert out.finish_reason == greedy.finish_reason
    # both paths ran: some drafts were accepted, some rejected
    assert 0 < stats.accepted < stats.drafted, stats
    assert any(out.draft_flags) and not all(out.draft_flags)
    print(f"teacher + 4-bit self-drafter, k=3: acceptance {stats.acceptance:.2f}, "
          f"{stats.tokens_per_round:.2f} tokens per target pass")


def test_unrelated_drafter_still_exact(tmp_path_factory, tokenizer):
    target, drafter = tiny(tmp_path_factory, tokenizer, 1), tiny(tmp_path_factory, tokenizer, 2)
    for content in ("Hi", "Tell me a story about a cat."):
        prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": content}])
        greedy = generate(target, prompt, GenerationParams(max_tokens=30))
        for k in (1, 4):
            out, stats = generate_speculative(target, drafter, prompt,
                                              GenerationParams(max_tokens=30, num_draft_tokens=k))
            assert out.tokens == greedy.tokens
            assert stats.tokens == len(out.tokens) and stats.rounds >= len(out.tokens) / (k + 1)


def test_spec_stats():
    # k=2, 7 tokens: [D D T] [T] [D T] [D] (the last round cut by max_tokens=7)
    s = spec_stats([True, True, False, False, True, False, True], k=2, max_tokens=7)
    assert (s.rounds, s.drafted, s.accepted) == (4, 2 + 2 + 2 + 1, 4)
    assert s.acceptance == pytest.approx(4 / 7)
