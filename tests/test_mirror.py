"""The PyTorch mirror against mlx-lm on the same checkpoint (fp32), prefill and KV-cache decode."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import parity
from export.mirror import UnsupportedModel, load_mirror, read_checkpoint, vocab_chunks
from mlx_student import model as student_model
from mlx_student.config import ConfigError, load_config

CONFIGS = Path(__file__).parent.parent / "configs"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_config, tokenizer):
    model = student_model.build(tiny_config, seed=3)
    return student_model.save(tmp_path_factory.mktemp("m") / "tiny", model, tiny_config, tokenizer)


@pytest.fixture(scope="module")
def mirror(student_dir):
    return load_mirror(student_dir)


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def mlx_run(student_dir, chunks, dtype="float32"):
    """mlx-lm logits for each chunk of ids fed in turn through its KVCache."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlx_lm.load(str(student_dir))
    model.set_dtype(getattr(mx, dtype))
    cache = make_prompt_cache(model)
    return [np.array(model(mx.array(c[None]), cache=cache)[0].astype(mx.float32))
            for c in chunks]


def bound(student_dir, chunks, ref):
    """fp32 vs fp32 within the probe's error model: 1/8 of the model's own fp16 error."""
    half = mlx_run(student_dir, chunks, "float16")
    return parity.bound(max(rel(h, r) for h, r in zip(half, ref)))


def test_prefill_and_decode_match_mlx(student_dir, mirror):
    """Two prefill chunks (the second attends to the first through the cache and the causal
    mask), then step-by-step decode, each against mlx-lm with its KVCache."""
    S = 128
    ids = np.random.default_rng(0).integers(0, 49152, size=16 + 16 + 10)
    chunks = [ids[:16], ids[16:32]] + [ids[t:t + 1] for t in range(32, len(ids))]
    ref = mlx_run(student_dir, chunks)
    k = torch.zeros(mirror.cache_shape(S))
    v = torch.zeros(mirror.cache_shape(S))
    pre, dec = mirror.function(16, S, all_logits=True), mirror.function(1, S)
    pos = 0
    errs = []
    with torch.no_grad():
        for c, r in zip(chunks, ref):
            fn = pre if len(c) == 16 else dec
            logits, k, v = fn(i32(c[None]), i32([pos]), k, v)
            assert logits.shape == (1, len(c), 49152)
            errs.append(rel(logits[0].numpy(), r))
            pos += len(c)
    assert max(errs) < bound(student_dir, chunks, ref), errs  # prefill and decode
    # The cache holds exactly the written positions; the rest is untouched.
    assert torch.count_nonzero(k[..., pos:]) == 0 and torch.count_nonzero(k[..., pos - 1]) > 0


def test_last_token_logits_and_functional_cache(mirror):
    ids = i32(np.random.default_rng(1).integers(0, 49152, size=(1, 16)))
    k0 = torch.zeros(mirror.cache_shape(128))
    with torch.no_grad():
        full, _, _ = mirror.function(16, 128, all_logits=True)(ids, i32([0]), k0, k0)
        last, k1, _ = mirror.function(16, 128)(ids, i32([0]), k0, k0)
    assert last.shape == (1, 1, 49152)
    torch.testing.assert_close(last[0, 0], full[0, -1])
    assert torch.count_nonzero(k0) == 0 and torch.count_nonzero(k1) > 0  # input not mutated


def test_vocab_split():
    assert vocab_chunks(49152) == [16384] * 3
    assert vocab_chunks(163840) == [16384] * 10
    assert vocab_chunks(16384) == [16384]
    rows = vocab_chunks(50000)
    assert sum(rows) == 50000 and max(rows) <= 16384 and max(rows) - min(rows) <= 1


def test_uneven_chunks_give_the_same_logits(student_dir, mirror):
    """Many uneven chunks (embedding gathers and head convs) equal the 3-chunk split."""
    small = load_mirror(student_dir, max_rows=5000)
    assert len(small.rows) == 10 and len(set(small.rows)) == 2
    ids = np.random.default_rng(2).integers(0, 49152, size=(1, 16))
    ids[0, :4] = [0, 4915, 4916, 49151]  # chunk edges
    k = torch.zeros(mirror.cache_shape(128))
    with torch.no_grad():
        a = mirror.function(16, 128, all_logits=True)(i32(ids), i32([0]), k, k)[0]
        b = small.function(16, 128, all_logits=True)(i32(ids), i32([0]), k, k)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tied_embedding_is_stored_once(mirror, tiny_config):
    from mlx_student.info import parameters

    assert mirror.head is mirror.embed
    assert sum(p.numel() for p in mirror.parameters()) == parameters(tiny_config)["total"]


def test_reading_a_checkpoint_needs_no_mlx(student_dir):
    code = ("import sys; from export.mirror import load_mirror; m = load_mirror(sys.argv[1]); "
            "bad = [n for n in sys.modules if n == 'mlx' or n.startswith(('mlx.', 'mlx_lm'))]; "
            "assert not bad, bad; print(m.rows)")
    out = subprocess.run([sys.executable, "-c", code, str(student_dir)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[16384, 16384, 16384]"


def test_unsupported_checkpoints_are_refused(tmp_path, student_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((student_dir / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["attention_bias"] = True
    config["mlp_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="attention_bias: true.*; mlp_bias: true"):
        read_checkpoint(tmp_path)
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}  # (mlx_student/hf_config.py)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json: rope_scaling.rope_type: 'yarn'"):
        read_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        read_checkpoint(tmp_path / "missing")


def test_right_padded_last_chunk_then_decode(student_dir, mirror):
    """The runtime pattern convert.py documents: a 10-token prompt in a right-padded 16-token
    prefill, the last prompt token decoded again at its position, then normal decode steps."""
    ids = np.random.default_rng(4).integers(0, 49152, size=14)
    chunks = [ids[:10]] + [ids[t:t + 1] for t in range(10, 14)]
    ref = mlx_run(student_dir, chunks)
    padded = np.concatenate([ids[:10], np.full(6, 7, dtype=ids.dtype)])
    k = v = torch.zeros(mirror.cache_shape(128))
    dec = mirror.function(1, 128)
    with torch.no_grad():
        _, k, v = mirror.function(16, 128)(i32(padded[None]), i32([0]), k, v)
        logits, k, v = dec(i32(ids[None, 9:10]), i32([9]), k, v)
        errs = [rel(logits[0, 0].numpy(), ref[0][-1])]
        for t in range(10, 14):
            logits, k, v = dec(i32(ids[None, t:t + 1]), i32([t]), k, v)
            errs.append(rel(logits[0, 0].numpy(), ref[t - 9][0]))
    assert max(errs) < bound(student_dir, chunks, ref), errs


def test_rms_norm_survives_massive_activations_in_fp16(tmp_path, tokenizer):
    """A trained residual stream reaches |x| ~ 2.5e4: x^2 overflows fp16, the norm must not."""
    import torch

    from export.mirror import load_mirror
    from mlx_student import model as student_model
    from mlx_student.config import load_config

    config = load_config(Path(__file__).parent.parent / "configs/tiny.yaml")
    path = student_model.save(tmp_path / "s", student_model.build(config), config, tokenizer)
    mirror = load_mirror(path)
    x = torch.randn(1, config.hidden_size, 1, 8)
    x[0, 3, 0, :] = 3e4  # one massive channel, as in trained models
    x[0, :, 0, 0] *= 1e-5  # and one nearly-zero token, where eps matters
    w = mirror.norm
    ref = x.double() / torch.sqrt((x.double() ** 2).mean(dim=1, keepdim=True) + config.rms_norm_eps) * w.double()
    half = mirror.half()._rms_norm(x.half(), mirror.norm)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.double(), ref, rtol=2e-3, atol=2e-3)
