"""ONNX export of the mirror (prefill, and decode with explicit KV inputs/outputs) run by
onnxruntime against the mirror: one call at a random position and cache, and a whole
prefill + decode chain with the caches passed from call to call."""

import numpy as np
import pytest
import torch

from export.mirror import load_mirror
from export.onnx_export import export_onnx
from conftest import save_tiny

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, tokenizer):
    return load_mirror(save_tiny(tmp_path_factory.mktemp("o") / "tiny", tokenizer, seed=6))


@pytest.fixture(scope="module")
def exported(mirror, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return folder, export_onnx(mirror, folder, prefill_lengths=[16], contexts=[128])


def test_files_and_single_call_parity(exported):
    folder, entry = exported
    assert entry["files"] == {"prefill_16": "prefill_16.onnx", "decode": "decode.onnx"}
    assert entry["context"] == 128 and entry["max_rel_err"] < 1e-4
    s = ort.InferenceSession(str(folder / "decode.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in s.get_inputs()] == [
        ("input_ids", [1, 1]), ("position", [1]), ("k_cache", [2, 1, 64, 128]),
        ("v_cache", [2, 1, 64, 128])]
    assert [o.name for o in s.get_outputs()] == ["logits", "k_cache_out", "v_cache_out"]


def test_prefill_then_decode_chain_matches_the_mirror(exported, mirror):
    folder, _ = exported
    sess = {n: ort.InferenceSession(str(folder / f"{n}.onnx"), providers=["CPUExecutionProvider"])
            for n in ("prefill_16", "decode")}
    ids = np.random.default_rng(7).integers(0, 49152, size=24).astype(np.int32)
    shape = mirror.cache_shape(128)
    k = v = np.zeros(shape, np.float32)
    tk = tv = torch.zeros(shape)
    steps = [("prefill_16", 0, ids[:16])] + [("decode", t, ids[t:t + 1]) for t in range(16, 24)]
    for name, pos, chunk in steps:
        logits, k, v = sess[name].run(None, {"input_ids": chunk[None],
                                             "position": np.array([pos], np.int32),
                                             "k_cache": k, "v_cache": v})
        fn = mirror.function(len(chunk), 128)
        with torch.no_grad():
            ref, tk, tv = fn(torch.from_numpy(chunk[None]), torch.tensor([pos], dtype=torch.int32),
                             tk, tv)
        ref = ref.numpy()
        assert np.abs(logits - ref).max() / np.abs(ref).max() < 1e-4, (name, pos)
        assert logits.argmax() == ref.argmax()
    np.testing.assert_allclose(k, tk.numpy(), rtol=1e-4, atol=1e-5)
    assert np.count_nonzero(k[..., 24:]) == 0 and np.count_nonzero(k[..., 23]) > 0
