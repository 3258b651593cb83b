import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from export import parity
from mlx_student import model as student_model
from mlx_student.config import load_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_config, tokenizer):
    model = student_model.build(tiny_config, seed=1)
    return student_model.save(tmp_path_factory.mktemp("s") / "tiny", model, tiny_config, tokenizer)


def test_folder_is_an_mlx_lm_model_folder(student_dir, tiny_config):
    config = json.loads((student_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["student"]["role"] == "test"
    assert (student_dir / "model.safetensors").exists()
    assert (student_dir / "tokenizer.json").exists()
    model, tokenizer, loaded = student_model.load(student_dir)
    assert loaded == tiny_config
    assert student_model.num_parameters(model) == 6_587_008


def greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        logits = model(mx.array([ids]))[0, -1]
        ids.append(int(mx.argmax(logits).item()))
    return ids


def test_mlx_lm_load_and_generate(student_dir):
    model, tokenizer = mlx_lm.load(str(student_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True
    )
    # mlx-lm's own generation (KV cache, greedy sampler) equals a cache-free argmax loop.
    tokens = [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=12)]
    expected = greedy(model, prompt, len(tokens))[len(prompt):]
    assert tokens == expected
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    assert isinstance(text, str) and text


def test_transformers_loads_the_same_folder_with_the_same_logits(student_dir):
    import torch
    from transformers import LlamaForCausalLM

    model, _ = mlx_lm.load(str(student_dir))
    ids = np.random.default_rng(0).integers(0, 49152, size=(2, 40))
    ours = np.array(model(mx.array(ids)))
    hf = LlamaForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    rel = lambda a: np.abs(a - theirs).max() / np.abs(theirs).max()  # noqa: E731
    model.set_dtype(mx.float16)  # the bound: the probe's error model (export/parity.py)
    fp16 = rel(np.array(model(mx.array(ids)).astype(mx.float32)))
    assert rel(ours) < parity.bound(fp16), (rel(ours), fp16)
    assert hf.config.rope_parameters["rope_theta"] == 100000.0


def test_causality(tiny_config):
    model = student_model.build(tiny_config, seed=2)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, tiny_config.vocab_size, size=(1, 48))
    base = np.array(model(mx.array(ids)))
    for t in (0, 17, 47):
        changed = ids.copy()
        changed[0, t] = (changed[0, t] + 1234) % tiny_config.vocab_size
        out = np.array(model(mx.array(changed)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4  # token t does matter from t on


def test_init_statistics(tiny_config):
    model = student_model.build(tiny_config, seed=0)
    params = dict(tree_flatten(model.parameters()))
    q = np.array(params["model.layers.0.self_attn.q_proj.weight"])
    o = np.array(params["model.layers.0.self_attn.o_proj.weight"])
    assert abs(q.std() - 0.02) < 0.001
    assert abs(o.std() - 0.02 / np.sqrt(2 * tiny_config.num_hidden_layers)) < 0.001
    assert np.all(np.array(params["model.norm.weight"]) == 1)
    again = dict(tree_flatten(student_model.build(tiny_config, seed=0).parameters()))
    np.testing.assert_array_equal(np.array(again["model.embed_tokens.weight"]),
                                  np.array(params["model.embed_tokens.weight"]))


class FailingTokenizer:
    """Proxy in front of the real tokenizer: its save fails, as a full disk would."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def save_pretrained(self, path):
        self.tokenizer.save_pretrained(path)
        raise OSError("No space left on device")


def test_save_is_atomic(tmp_path, tiny_config, tokenizer):
    path = tmp_path / "student"
    student_model.save(path, student_model.build(tiny_config, seed=0), tiny_config, tokenizer)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(OSError, match="No space"):
        student_model.save(
            path, student_model.build(tiny_config, seed=5), tiny_config, FailingTokenizer(tokenizer)
        )
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temp folder left behind
