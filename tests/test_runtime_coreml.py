"""The CoreML engine (reference MIL executor on Linux) against the MLX engine on the same model."""

import mlx.core as mx
import mlx_lm
import pytest

from runtime.coreml_engine import CoreMLEngine
from runtime.generate import GenerationParams, MLXEngine, chat_prompt, generate

@pytest.fixture(scope="module")
def exported(peaked_tiny, tiny_coreml):
    """The peaked tiny student (conftest: final norm x4, so its next-token choices are not
    near-ties) and its fp16 package with a 16-token prefill and a decode at context 128."""
    return peaked_tiny, tiny_coreml[1]


def test_coreml_engine_greedy_matches_the_mlx_engine_in_fp16(exported):
    folder, package = exported
    coreml = CoreMLEngine.load(package, folder)
    assert coreml.backend == "executor" and coreml.context == 128 and list(coreml.prefill) == [16]
    model, tokenizer = mlx_lm.load(str(folder))
    model.set_dtype(mx.float16)  # the same fp16 model on both sides
    mlx = MLXEngine(model, tokenizer)
    params = GenerationParams(max_tokens=12)
    exact = 0
    for question in ("Name three colours.", "What is a list in Python?"):
        prompt = chat_prompt(tokenizer, [{"role": "user", "content": question}])
        assert len(prompt) > 16  # one prefill chunk, then decode steps
        ours, theirs = (generate(e, prompt, params).tokens for e in (coreml, mlx))
        assert len(ours) == len(theirs) == 12
        exact += ours == theirs
        if ours != theirs:  # only a tie within fp16 rounding may split them
            k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            model.set_dtype(mx.float32)
            logits = model(mx.array([prompt + theirs[:k]]))[0, -1]
            model.set_dtype(mx.float16)
            gap = abs(logits[ours[k]].item() - logits[theirs[k]].item())
            assert gap < 0.02 * float(mx.abs(logits).max()), (k, gap)
    assert exact  # not every prompt may end on the tie path


def test_context_overflow_and_unknown_context_are_clear_errors(exported):
    folder, package = exported
    with pytest.raises(ValueError, match=r"context 64 not exported; it has \[128\]"):
        CoreMLEngine.load(package, folder, context=64)
    with pytest.raises(ValueError, match=r"no prefill function of \[7\] tokens at context 128"):
        CoreMLEngine.load(package, folder, prefill_lengths=[7])
    assert CoreMLEngine.load(package, folder, prefill_lengths=[]).chunks(3) == [1, 1, 1]
    assert CoreMLEngine.load(package, folder, prefill_lengths=[16]).chunks(35) == [16, 16, 1, 1, 1]
    engine = CoreMLEngine.load(package, folder)
    cache = engine.make_cache()
    with pytest.raises(ValueError, match="129 tokens exceed the package's context 128"):
        engine(mx.array([list(range(129))]), cache=cache)
