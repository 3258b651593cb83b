"""Real coremltools conversion of the tiny student through the CLI: the multifunction package is
re-loaded from disk and its spec and MIL program checked (functions, enumerated shapes, fp16
states, int8 / int4 / LUT weights), and the manifest against the checkpoint."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from export import cli
from export.compress import Compression, compress
from export.convert import describe, load_program, package_bytes, save_multifunction
from export.mirror import load_mirror
from mlx_student import model as student_model
from mlx_student.config import load_config
from mlx_student.info import parameters

ROOT = Path(__file__).parent.parent
CONTEXTS, PREFILL = (128, 256), (16,)
FUNCTIONS = {"decode_ctx128": (1, 128), "prefill_16_ctx128": (16, 128),
             "decode_ctx256": (1, 256), "prefill_16_ctx256": (16, 256)}


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_config, tokenizer):
    model = student_model.build(tiny_config, seed=4)
    return student_model.save(tmp_path_factory.mktemp("c") / "tiny", model, tiny_config, tokenizer)


@pytest.fixture(scope="module")
def exported(student_dir, tmp_path_factory):
    """The CLI's int8 export (configs/export.yaml, fewer shapes): (out folder, manifest)."""
    out = tmp_path_factory.mktemp("art") / "tiny"
    args = cli.parse_args(["--model", str(student_dir),
                           "--config", str(ROOT / "configs/export.yaml"), "--out", str(out), "--contexts", *map(str, CONTEXTS),
                           "--prefill-lengths", *map(str, PREFILL)])
    return out, cli.run(args)


@pytest.fixture(scope="module")
def program(exported):
    return load_program(exported[0] / "model.mlpackage")[1]


def test_spec_lists_functions_shapes_and_fp16_states(exported):
    d = describe(exported[0] / "model.mlpackage")
    assert set(d["functions"]) == set(FUNCTIONS)
    assert d["default_function"] == "decode_ctx128"
    for name, (T, S) in FUNCTIONS.items():
        f = d["functions"][name]
        assert f["inputs"] == {"input_ids": {"shape": [1, T], "dtype": "int32"},
                               "position": {"shape": [1], "dtype": "int32"}}
        assert f["outputs"] == {"logits": {"shape": [1, 1, 49152], "dtype": "float16"}}
        cache = {"shape": [2, 1, 64, S], "dtype": "float16"}  # layers, kv heads, head_dim, ctx
        assert f["states"] == {"k_cache": cache, "v_cache": cache}
        assert f["ops"]["slice_update"] == 4 and f["ops"]["coreml_update_state"] == 4
        assert f["ops"]["read_state"] == 2
        assert f["ops"]["conv"] == 2 * 7 + 3  # 7 projections per layer + 3 vocab chunks


def test_every_linear_weight_is_int8_per_channel(program, student_dir):
    """constexpr dequantization feeds every projection and vocab chunk, in every function;
    its int8 data times the per-row scale gives back the checkpoint's weight."""
    mirror = load_mirror(student_dir)
    sources = {f"mirror_layers_{i}_{n}_to_fp16_quantized": getattr(lyr, n)
               for i, lyr in enumerate(mirror.layers)
               for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj")}
    sources.update({f"mirror_embed_{j}_to_fp16_quantized": w for j, w in enumerate(mirror.embed)})
    for name, fn in program.functions.items():
        weights = {}
        for op in fn.operations:
            if op.op_type in ("conv", "gather"):
                w = op.weight if op.op_type == "conv" else op.x
                weights[w.op.name] = w.op
        quantized = {k: v for k, v in weights.items() if k in sources}
        assert set(quantized) == set(sources), name
        for k, op in quantized.items():
            assert op.op_type == "constexpr_blockwise_shift_scale"
            data, scale = op.data.val, op.scale.val
            assert data.dtype == np.int8 and scale.shape == (data.shape[0], 1, 1, 1)
        for k, op in weights.items():  # everything else feeding a conv/gather: RoPE tables
            if k not in sources:
                assert op.op_type == "const" and ("cos" in k or "sin" in k), k
    for k, w in list(sources.items())[:: 5]:
        op = next(o for o in program.functions["decode_ctx128"].operations if o.name == k)
        deq = op.data.val.astype(np.float32) * op.scale.val.astype(np.float32)
        ref = w.numpy()
        row_max = np.abs(ref).max(axis=1, keepdims=True)
        assert np.all(np.abs(deq - ref) <= row_max / 127 * 0.6), k  # half a step, fp16 scale


def test_compute_is_fp16(program):
    from coremltools.converters.mil.mil import types

    for fn in program.functions.values():
        for op in fn.operations:
            if op.op_type == "const":
                continue
            for v in op.outputs:
                if v.dtype is not None and types.is_float(v.dtype):
                    assert v.dtype == types.fp16, (op.op_type, op.name)


def test_weights_are_shared_and_size_per_param(exported, tiny_config):
    out, manifest = exported
    params = parameters(tiny_config)["total"]
    weights = (out / "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    # 4 functions, one copy of the weights: int8 + per-row scales + fp16 norms and RoPE.
    assert weights / params < 1.05
    assert manifest["package_bytes"] == package_bytes(out / "model.mlpackage")
    assert manifest["bytes_per_param"] == manifest["package_bytes"] / params


def test_manifest(exported, student_dir):
    out, manifest = exported
    on_disk = json.loads((out / "export_manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert sorted(p.name for p in out.iterdir()) == [".mlx_student", "export_manifest.json", "model.mlpackage"]
    h = hashlib.sha256((student_dir / "model.safetensors").read_bytes()).hexdigest()
    assert on_disk["source"]["files"]["model.safetensors"] == h
    assert on_disk["config"]["student"]["contexts"] == [128, 256]
    assert on_disk["coremltools_version"] == __import__("coremltools").__version__
    fns = {f["name"]: f for f in on_disk["functions"]}
    assert set(fns) == set(FUNCTIONS)
    assert fns["prefill_16_ctx256"]["states"]["k_cache"]["shape"] == [2, 1, 64, 256]
    assert on_disk["compression"]["weights"] == "int8"
    assert on_disk["fp16_audit"]["ok"] and set(on_disk["fp16_audit"]["taps"]) == {
        "residual", "norm_mean_square", "attention_logits", "swiglu_product", "logits"}
    parity = on_disk["mirror_parity"]
    assert parity["prefill_rel_err"] < parity["prefill_bound"]  # the probe's error model
    assert parity["decode_rel_err"] < parity["decode_bound"] and parity["ok"]
    assert parity["top1_agreement"] == 1.0


@pytest.mark.parametrize("weights,embedding,op_type,limit", [
    ("int4", "int4", "constexpr_blockwise_shift_scale", 0.6),
    ("lut4", "lut4", "constexpr_lut_to_dense", 0.6),
    ("int8", "fp16", "constexpr_blockwise_shift_scale", 2.0),
])
def test_four_bit_and_separate_embedding_precision(tiny_coreml, tmp_path, tiny_config,
                                                   weights, embedding, op_type, limit):
    """The shared fp16 conversion (conftest) compressed to each format, saved and re-read."""
    model = compress(tiny_coreml[0]["decode_ctx128"], Compression(weights=weights, embedding=embedding))
    pkg = save_multifunction({"decode": model}, tmp_path / "m.mlpackage", "decode")
    per_param = package_bytes(pkg) / parameters(tiny_config)["total"]
    print(f"{weights}/{embedding}: {per_param:.3f} bytes/param")
    assert per_param <= limit
    ops = {op.name: op for op in load_program(pkg)[1].functions["decode"].operations}
    proj = ops[next(k for k in ops if "layers_1_down_proj" in k and k.endswith(
        "_quantized" if weights.startswith("int") else "_palettized"))]
    assert proj.op_type == op_type
    if weights == "int4":
        from coremltools.converters.mil.mil import types
        assert proj.data.dtype == types.int4
        assert proj.scale.shape == (128, 256 // 32, 1, 1)  # one scale per 32 inputs of a row
    if weights == "lut4":
        assert proj.lut.shape[-2] == 16  # 16 entries per LUT
    embed = [op for k, op in ops.items() if "embed_0" in k and op.op_type != "const"
             or k == "mirror_embed_0_to_fp16"]
    assert embed and embed[0].op_type == ("const" if embedding == "fp16" else op_type)
