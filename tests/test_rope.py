"""RoPE scaling end to end: the frequencies (hand values, band edges, transformers and mlx-lm as
peers), the config schema and its refusals, and parity MLX / PyTorch mirror / CoreML package
(reference executor) at positions past 8192."""

import dataclasses
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_student import rope
from mlx_student.config import ConfigError, StudentConfig, load_config

ROOT = Path(__file__).parent.parent
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def test_llama3_frequencies_hand_values_and_band_edges():
    d, theta = 128, 500000.0
    base = 1.0 / theta ** (np.arange(0, d, 2) / d)
    inv = rope.inverse_frequencies(d, theta, LLAMA31)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4  # short wavelengths: kept
    low = wavelen > 8192 / 1  # long wavelengths: divided by the factor
    assert inv[0] == 1.0 and np.array_equal(inv[high], base[high])
    assert np.array_equal(inv[low], base[low] / 8.0)
    assert high.sum() == 29 and low.sum() == 29  # Llama 3.1's bands: 29 + 6 blended + 29
    i = 30  # a blended one, by hand: s = (8192 / w - 1) / 3, f' = (1 - s) f / 8 + s f
    s = (8192 / (2 * math.pi * theta ** (60 / 128)) - 1) / 3
    assert 0 < s < 1 and inv[i] == pytest.approx((1 - s) * base[i] / 8 + s * base[i], rel=1e-15)
    # the edges: put a wavelength exactly on each and the blend meets its neighbour band exactly
    k = 40
    w = 2 * math.pi / base[k]
    at_low = rope.inverse_frequencies(d, theta, {**LLAMA31, "original_max_position_embeddings": w})
    assert at_low[k] == base[k] / 8.0  # s = 0 on the low edge
    at_high = rope.inverse_frequencies(d, theta, {**LLAMA31, "original_max_position_embeddings": 4 * w})
    assert at_high[k] == base[k]  # s = 1 on the high edge
    assert np.array_equal(rope.inverse_frequencies(d, theta, {"type": "linear", "factor": 4.0}), base / 4)
    assert np.array_equal(rope.inverse_frequencies(d, theta, None), base)


def test_llama3_frequencies_match_transformers_and_mlx_lm():
    from mlx_lm.models.rope_utils import initialize_rope
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours = rope.inverse_frequencies(128, 500000.0, LLAMA31)
    hf = LlamaConfig(head_dim=128, hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                     rope_parameters={**LLAMA31, "rope_theta": 500000.0})
    theirs = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0].double().numpy()
    mlx = 1.0 / np.array(initialize_rope(128, 500000.0, False, LLAMA31, 131072)._freqs, np.float64)
    for peer in (theirs, mlx):  # both compute in fp32: agreement to fp32 rounding (~2^-23 x few)
        assert np.abs(ours / peer - 1).max() < 1e-6


def write_yaml(tmp_path, scaling_lines):
    text = (ROOT / "configs/tiny.yaml").read_text().replace("models/smollm2", str(ROOT / "models/smollm2"))
    path = tmp_path / "c.yaml"
    path.write_text(text + "  rope_scaling:\n" + "".join(f"    {x}\n" for x in scaling_lines))
    return path


def test_config_accepts_both_spellings_and_refuses_unsupported_kinds(tmp_path):
    c = load_config(write_yaml(tmp_path, ["type: linear", "factor: 2.0"]))
    d = c.to_mlx_config()
    assert d["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert d["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}
    c = load_config(write_yaml(tmp_path, ["rope_type: llama3", "factor: 4.0"]))
    assert c.to_mlx_config()["rope_scaling"] == {**LLAMA31, "factor": 4.0}
    assert "rope_scaling" not in StudentConfig(**{**c.__dict__, "rope_scaling": None}).to_mlx_config()
    path = write_yaml(tmp_path, ["rope_type: yarn", "factor: 4.0"])
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = path.read_text().splitlines()
    line = next(i for i, t in enumerate(lines, 1) if "rope_type: yarn" in t)
    assert str(e.value).endswith(f"{path}:{line}: model.rope_scaling.rope_type: 'yarn' is not "
                                 "supported (one of default, linear, llama3)")
    path = write_yaml(tmp_path, ["type: llama3", "factor: 4.0", "high_freq_factor: 0.5"])
    with pytest.raises(ConfigError, match=r"model.rope_scaling.high_freq_factor: 0.5 must exceed "
                                          r"low_freq_factor 1.0"):
        load_config(path)


def test_mirror_refuses_unsupported_kinds_naming_the_file(tmp_path, tokenizer):
    from conftest import save_tiny

    from export.mirror import read_checkpoint
    from mlx_student.prune import base_config

    folder = save_tiny(tmp_path / "s", tokenizer)
    raw = json.loads((folder / "config.json").read_text())
    raw["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(raw))
    message = (f"{folder / 'config.json'}: rope_scaling.type: 'dynamic' "
               "is not supported (one of default, linear, llama3)")
    with pytest.raises(ConfigError) as e:  # the one reader of foreign config.json refuses it
        read_checkpoint(folder)
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:  # a fine-tuning base is refused the same way
        base_config(folder)
    assert str(e.value) == f"init_from: {message}"
    raw["rope_scaling"] = {"type": "llama3", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(raw))
    normalized = {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert base_config(folder)["rope_scaling"] == normalized
    assert read_checkpoint(folder)[0].rope_scaling == normalized


FAR = 8192  # the second chunk's position: past 8192, 8192 positions after the first chunk
T = 16
CTX = FAR + 2 * T


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, tokenizer):
    """A tiny student with llama3 scaling from a 2048-position original (most of its
    frequencies scaled), saved as an mlx-lm folder. Its query and key weights are scaled up so
    attention is peaked and depends on the rotation, its final norm so logits are far from ties."""
    from mlx_student import model as student_model

    config = load_config(ROOT / "configs/tiny.yaml")
    config = StudentConfig(**{**config.__dict__, "contexts": [CTX], "max_position_embeddings": CTX,
                              "rope_scaling": {"rope_type": "llama3", "factor": 4.0,
                                               "original_max_position_embeddings": 2048}})
    model = student_model.build(config, seed=5)
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight = layer.self_attn.q_proj.weight * 8
        layer.self_attn.k_proj.weight = layer.self_attn.k_proj.weight * 8
    model.model.norm.weight = model.model.norm.weight * 4
    return student_model.save(tmp_path_factory.mktemp("rope") / "s", model, config, tokenizer)


def test_parity_mlx_mirror_executor_past_8192(scaled, tmp_path):
    """Chunk A at positions 0..15, chunk B at 8192..8207 (the cache between them zeros on every
    side), then a decode step at 8208: B's queries see A's keys 8192 positions back, where the
    llama3 frequencies differ most from the unscaled ones."""
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    from export import mil_executor
    from export.convert import FunctionSpec, convert_function, save_multifunction
    from export.mirror import Mirror, load_mirror, read_checkpoint
    from export.parity import rel_err

    model, _ = mlx_lm.load(str(scaled))
    assert type(model.model.layers[0].self_attn.rope).__name__ == "Llama3RoPE"
    ids = np.random.default_rng(0).integers(0, 49152, 2 * T + 1).astype(np.int32)
    cache = make_prompt_cache(model)
    model(mx.array(ids[None, :T]), cache=cache)
    for c in cache:  # zeros up to FAR, as the package's state and the mirror's cache hold
        pad = mx.zeros(c.keys.shape[:2] + (FAR - T, c.keys.shape[3]))
        c.state = (mx.concatenate([c.keys[..., :T, :], pad], axis=2),
                   mx.concatenate([c.values[..., :T, :], pad], axis=2), FAR)
    mlx_chunk = np.array(model(mx.array(ids[None, T:2 * T]), cache=cache)[0])
    mlx_step = np.array(model(mx.array(ids[None, 2 * T:]), cache=cache)[0, -1])

    def mirror_run(mirror):
        k, v = (torch.zeros(mirror.cache_shape(CTX)) for _ in range(2))
        at = lambda a, b: torch.tensor(ids[None, a:b])  # noqa: E731
        pos = lambda p: torch.tensor([p], dtype=torch.int32)  # noqa: E731
        with torch.no_grad():
            _, k, v = mirror.function(T, CTX)(at(0, T), pos(0), k, v)
            chunk, k, v = mirror.function(T, CTX, all_logits=True)(at(T, 2 * T), pos(FAR), k, v)
            step, _, _ = mirror.function(1, CTX)(at(2 * T, 2 * T + 1), pos(FAR + T), k, v)
        return chunk[0].numpy(), step[0, -1].numpy(), k, v

    chunk, step, k, v = mirror_run(load_mirror(scaled))
    # fp32 both sides; MLX forms the angle p * f in fp32, |error| <= 8208 * 2^-24 ~ 5e-4 rad on
    # the fastest pair: attention logits move by ~5e-4 x their size (~10), logits by ~1e-3
    tol = 5e-3
    errs = (rel_err(chunk, mlx_chunk), rel_err(step, mlx_step))
    assert max(errs) < tol, errs
    # the same comparison without the scaling fails by far: the check can fail
    config, weights = read_checkpoint(scaled)
    unscaled = Mirror(dataclasses.replace(config, rope_scaling=None), weights).eval()
    assert rel_err(mirror_run(unscaled)[0], mlx_chunk) > 10 * tol

    # the exported decode function (fp16, reference executor) at position 8208, its KV state
    # holding the mirror's cache: fp16 rounding (2^-11 relative per op) keeps it within ~1e-2
    spec = FunctionSpec(f"decode_ctx{CTX}", "decode", 1, CTX)
    package = save_multifunction({spec.name: convert_function(load_mirror(scaled), spec)},
                                 tmp_path / "s.mlpackage", spec.name)
    decode = mil_executor.load(package, spec.name)
    state = decode.make_state()
    state.write_state("k_cache", k.numpy())
    state.write_state("v_cache", v.numpy())
    got = decode.predict({"input_ids": ids[None, 2 * T:], "position": np.array([FAR + T], np.int32)},
                         state)["logits"][0, -1]
    assert rel_err(got, mlx_step) < 2e-2 and got.argmax() == mlx_step.argmax()
