"""QAT: fake quantization against numpy, the straight-through gradient, the trainer's QAT phase,
and the exact hand-off to the CoreML exporter (the package's dequantized weights, read back by
the reference MIL executor, are the QAT student's weights to fp16)."""

import dataclasses
import json
import shutil
import sysconfig
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, train_argv, write_jsonl
from mlx.utils import tree_flatten

from export import cli, mil_executor
from export.compress import Compression, compress, exact_weights
from export.convert import FunctionSpec, convert_function, save_multifunction
from export.mirror import load_mirror
from mlx_student import checkpoint, train
from mlx_student import model as student_model
from mlx_student.config import ConfigError, load_config
from mlx_student.quant import (SIDECAR, dequantize, fake_quant, fake_quantized, prepare,
                               qat_settings, quantize, quantized_modules, quantized_path, record,
                               scales)
from mlx_student.trainer import TrainingArgs, make_loss

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def np_quantize(w, bits, group):
    """The exporter's symmetric quantization (coremltools' formula), in numpy float64."""
    qmax = 2 ** (bits - 1) - 1
    g = w.shape[-1] if bits == 8 else group
    wg = w.astype(np.float64).reshape(*w.shape[:-1], -1, g)
    scale = (np.abs(wg).max(-1, keepdims=True) / qmax).astype(np.float16).astype(np.float64)
    q = np.clip(np.round(wg / scale), -qmax, qmax)
    return q.reshape(w.shape), scale[..., 0], (q * scale).reshape(w.shape)


def test_known_values_and_numpy_reference():
    w = np.array([[0.6, -1.0, 0.25, 0.0, 0.1, -0.3, 0.7, 0.2],
                  [2.0, 1.1, -0.5, 0.125, -4.0, 0.0, 1.0, 3.0]], np.float32)
    q, s = quantize(mx.array(w), 8)
    np.testing.assert_array_equal(np.array(q)[0, :4], [76, -127, 32, 0])
    np.testing.assert_array_equal(np.array(s)[:, 0], np.float16([1 / 127, 4 / 127]))  # fp16
    q, s = quantize(mx.array(w), 4, group_size=4)
    np.testing.assert_array_equal(np.array(q)[1], [7, 4, -2, 0, -7, 0, 2, 5])
    np.testing.assert_array_equal(np.array(s), np.float16([[1 / 7, 0.7 / 7], [2 / 7, 4 / 7]]))
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 128)) * 0.02).astype(np.float32)
    for bits, group in ((8, 32), (4, 32), (4, 64)):
        q, s = quantize(mx.array(w), bits, group)
        rq, rs, rdq = np_quantize(w, bits, group)
        np.testing.assert_array_equal(np.array(q), rq)
        np.testing.assert_array_equal(np.array(s), rs)
        np.testing.assert_array_equal(np.array(dequantize(q, s, bits, group)), rdq)
        np.testing.assert_array_equal(np.array(fake_quant(mx.array(w), bits, group)),
                                      np.array(dequantize(q, s, bits, group)))


@pytest.mark.parametrize("bits, qmax", [(8, 127), (4, 7)])
def test_grid(bits, qmax):
    """Every row (8 bits) or group (4 bits) reaches the grid's end; quantizing again is stable."""
    w = mx.random.normal((96, 256), key=mx.random.key(1)) * 0.02
    q, s = quantize(w, bits, 32)
    groups = np.abs(np.array(q)).reshape(96, -1, 256 if bits == 8 else 32).max(-1)
    assert (groups == qmax).all()
    q2, s2 = quantize(fake_quant(w, bits, 32), bits, 32)
    np.testing.assert_array_equal(np.array(q2), np.array(q))
    np.testing.assert_allclose(np.array(s2), np.array(s), rtol=1e-6)
    zero, _ = quantize(mx.zeros((2, 64)), bits, 32)
    assert not np.array(zero).any()


def test_settings_and_paths():
    assert qat_settings(None) is None
    assert qat_settings({"bits": 4}) == {
        "bits": 4, "group_size": 32, "embeddings": False, "start_step": 0, "scales": "minmax",
        "activations": 0, "observer": "minmax", "observer_batches": 8, "ema_decay": 0.9,
        "scale_lr": 30.0}
    for bad, msg in (({"bits": 3}, "qat.bits"), ({"bitz": 8}, "unknown keys"),
                     ({"group_size": 0}, "qat.group_size"), ({"start_step": -1}, "start_step"),
                     ({"scales": "learned"}, "qat.scales: 'learned' is not one of minmax, lsq"),
                     ({"activations": 4}, "qat.activations"), ({"ema_decay": 1.0}, "ema_decay"),
                     ({"observer": "max"}, "qat.observer"), (8, "mapping")):
        with pytest.raises(ValueError, match=msg):
            qat_settings(bad)
    assert quantized_path("model.layers.1.mlp.down_proj.weight", False)
    assert not quantized_path("model.layers.1.input_layernorm.weight", True)
    assert not quantized_path("model.embed_tokens.weight", False)
    assert quantized_path("model.embed_tokens.weight", True)


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(ROOT / "configs/tiny.yaml")


def test_straight_through_gradient(tiny_config):
    """The QAT loss's gradient w.r.t. the masters is the fp gradient at the fake-quant point."""
    qat = qat_settings({"bits": 4, "embeddings": True})
    model = student_model.build(tiny_config, seed=2)
    ids = mx.random.randint(0, 49152, (2, 17), key=mx.random.key(3))
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": mx.ones((2, 16))}
    args = TrainingArgs()
    scales = mx.ones(1)

    def grads(loss_fn, m):
        def f(params):
            m.update(params)
            return loss_fn(m, batch, scales)[0]
        return mx.value_and_grad(f)(m.trainable_parameters())

    masters = model.parameters()
    loss_q, g_q = grads(make_loss(args, ["ce"], qat), model)
    model.update(masters)
    with fake_quantized(model, qat):
        loss_fp, g_fp = grads(make_loss(args, ["ce"]), model)
    np.testing.assert_allclose(loss_q.item(), loss_fp.item(), rtol=1e-6)
    g_q, g_fp = dict(tree_flatten(g_q)), dict(tree_flatten(g_fp))
    assert set(g_q) == set(g_fp)
    for k in g_q:
        np.testing.assert_allclose(np.array(g_q[k]), np.array(g_fp[k]), rtol=1e-4, atol=1e-9,
                                   err_msg=k)
    assert np.abs(np.array(g_q["model.layers.0.self_attn.q_proj.weight"])).max() > 0
    # The masters are untouched by the loss and by the block.
    for k, v in tree_flatten(model.parameters()):
        assert mx.array_equal(v, dict(tree_flatten(masters))[k]).item(), k


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """The tiny student, 2 fp steps then 2 int8 QAT steps (embedding included)."""
    tmp = tmp_path_factory.mktemp("qat")
    write_jsonl(tmp / "data" / "train.jsonl", [{"text": (STDLIB / "heapq.py").read_text()}])
    history = train.run(train.parse_args(qat_argv(tmp, tmp / "data")))
    return tmp / "student", history


def qat_argv(tmp, data):
    return train_argv(tmp, data, "--iters", "4", "--steps-per-save", "1",
                      "--qat", "bits=8,start_step=2,embeddings=true")


def test_qat_phase_and_saved_weights(qat_run):
    out, history = qat_run
    assert [h["qat"] for h in history] == [False, False, True, True]
    student = json.loads((out / "config.json").read_text())["student"]
    assert student["qat"] == {"bits": 8, "group_size": 32, "embeddings": True,
                              "scales": "minmax", "activations": 0}
    saved = mx.load(str(out / "model.safetensors"))
    sidecar = mx.load(str(out / "qat_scales.safetensors"))
    assert set(sidecar) == {k + "_scale" for k in saved if quantized_path(k, True)}
    masters = mx.load(str(checkpoint.trainer_dir(out) / "weights.safetensors"))
    for k, w in saved.items():
        assert w.dtype == mx.float32
        if not quantized_path(k, True):
            assert mx.array_equal(w, masters[k]).item(), k
            continue
        q, s = quantize(masters[k], 8)
        assert mx.array_equal(w, dequantize(q, s)).item(), k  # exactly the QAT forward's
        assert mx.array_equal(s, sidecar[k + "_scale"]).item(), k
        assert not mx.array_equal(w, masters[k]).item(), k
        assert (np.abs(np.array(quantize(w, 8)[0])).max(-1) == 127).all()
    # The trainer state keeps the run's config (qat is recorded only in the model folder).
    state = json.loads((checkpoint.trainer_dir(out) / "state.json").read_text())
    assert state["config"]["qat"] is None
    assert state["settings"]["qat"]["start_step"] == 2


class Stop(Exception):
    pass


def test_an_interrupted_qat_run_resumes_exactly(qat_run, tmp_path, monkeypatch):
    out, history = qat_run
    argv = qat_argv(tmp_path, out.parent / "data")
    real = checkpoint.save

    def save_then_stop(*a):
        real(*a)
        if a[5] == 3:  # the step: stop mid-QAT, after the trainer state is written
            raise Stop

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(Stop):
        train.run(train.parse_args(argv))
    monkeypatch.undo()
    resumed = train.run(train.parse_args(argv + ["--resume"]))
    assert [h["step"] for h in resumed] == [4] and resumed[0]["qat"]
    np.testing.assert_allclose(resumed[0]["loss"], history[3]["loss"], rtol=1e-6)
    a = mx.load(str(tmp_path / "student" / "model.safetensors"))
    b = mx.load(str(out / "model.safetensors"))
    for k in b:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-5, atol=1e-7,
                                   err_msg=k)


def test_qat_setting_from_the_config_file_and_its_errors(tmp_path):
    argv = train_argv(tmp_path, tmp_path)
    with open(tmp_path / "run.yaml", "a") as f:
        f.write("qat:\n  bits: 4\n  start_step: 8\n")
    assert train.parse_args(argv).qat == {"bits": 4, "start_step": 8}
    assert train.parse_args(argv + ["--qat", "bits=8,embeddings=true"]).qat == {
        "bits": 8, "embeddings": True}
    with pytest.raises(ConfigError, match="qat.bits: 5 is not 4 or 8"):
        train.run(train.parse_args(argv + ["--qat", "bits=5"]))
    with pytest.raises(ConfigError, match=r"qat.group_size 96 does not divide .*\(128, 256, 128\)"):
        train.run(train.parse_args(argv + ["--qat", "bits=4,group_size=96"]))


def test_exporter_picks_the_qat_compression():
    comp = dataclasses.asdict(Compression())
    qat = {"bits": 4, "group_size": 64, "embeddings": False}
    picked = cli.qat_compression(comp, qat)
    assert (picked["weights"], picked["block_size"], picked["embedding"]) == ("int4", 64, "int8")
    qat["embeddings"] = True
    picked = cli.qat_compression(comp, qat, ["weights"])
    assert (picked["weights"], picked["embedding"], picked["lm_head"]) == ("int8", "int4", "int4")
    assert cli.qat_compression(comp, None) == comp
    args = cli.parse_args(["--model", "runs/x", "--weights", "lut4", "--block-size", "16"])
    assert args.compression_flags == ["weights", "block_size"]


def mlx_name(mirror_name, layers):
    """The checkpoint's name of a mirror weight constant (the embedding: its chunk index)."""
    for i in range(layers):
        for n in PROJ:
            if f"layers_{i}_{n}_" in mirror_name:
                return f"model.layers.{i}.{'self_attn' if n in PROJ[:4] else 'mlp'}.{n}.weight"
    if "_embed_" in mirror_name:
        return int(mirror_name.split("_embed_")[1].split("_")[0])
    return None


def converted_decode(folder):
    """(mirror, its decode function at context 128 converted by coremltools, uncompressed)."""
    mirror = load_mirror(folder)
    return mirror, convert_function(mirror, FunctionSpec("decode", "decode", 1, 128))


def exported_weights(folder, tmp_path, compression, qat=None, converted=None):
    """{checkpoint weight name: (dequantized weight, integers)} read back from a saved
    one-function package by the reference MIL executor (constexpr ops materialized at load);
    with `qat` the export takes the checkpoint's integers (export.compress.exact_weights).
    `converted`: the folder's `converted_decode`, when the caller compresses it more than once."""
    mirror, decode = converted or converted_decode(folder)
    exact = exact_weights(folder, qat, mirror.offsets) if qat else None
    model = compress(decode, compression, exact)
    pkg = save_multifunction({"decode": model}, tmp_path / "m.mlpackage", "decode")
    program = mil_executor.load(pkg, "decode")
    found, chunks = {}, {}
    for op in program.constexpr_ops:
        name = mlx_name(op.output_name, mirror.config.num_hidden_layers)
        if name is None:
            continue
        pair = (program.consts[op.output_name][:, :, 0, 0], op.inputs["data"][0][1][:, :, 0, 0])
        (chunks if isinstance(name, int) else found)[name] = pair
    found["model.embed_tokens.weight"] = tuple(
        np.concatenate([chunks[j][i] for j in sorted(chunks)]) for i in (0, 1))
    return found


def check_hand_off(exported, saved, sidecar, bits, group, skip=()):
    """The package's integers are the QAT integers, and its dequantized weights the QAT
    weights in fp16, bit for bit."""
    for k, (deq, ints) in exported.items():
        if k in skip:
            continue
        w = np.array(saved[k])
        q, _ = quantize(saved[k], bits, group, sidecar[k + "_scale"].astype(mx.float32))
        np.testing.assert_array_equal(ints, np.array(q), err_msg=k)
        np.testing.assert_array_equal(deq.astype(np.float16), w.astype(np.float16), err_msg=k)


def test_exact_hand_off_to_the_int8_export(qat_run, tmp_path):
    """The int8 export of the QAT run holds its integers, and dequantizes to its weights."""
    out, _ = qat_run
    qat = json.loads((out / "config.json").read_text())["student"]["qat"]
    comp = Compression(**cli.qat_compression(dataclasses.asdict(Compression(weights="fp16")), qat))
    assert (comp.weights, comp.embedding) == ("int8", "int8")
    exported = exported_weights(out, tmp_path, comp, qat)
    assert len(exported) == 2 * 7 + 1
    check_hand_off(exported, mx.load(str(out / "model.safetensors")),
                   mx.load(str(out / "qat_scales.safetensors")), 8, 32)


def test_exact_hand_off_of_learned_scales_to_the_int4_export(tiny_config, tokenizer, tmp_path):
    """Block-wise int4 with learned (LSQ) scales, some weights clipped: the package holds the
    checkpoint's integers and fp16 scales, not coremltools' re-derived ones."""
    qat = qat_settings({"bits": 4, "group_size": 32, "scales": "lsq"})
    model = student_model.build(tiny_config, seed=5)
    prepare(model, qat, lambda: [])
    for _, m in quantized_modules(model, qat):
        m.weight_log_scale += np.log(0.7) / qat["scale_lr"]  # as if learned: group ends clip
    config = dataclasses.replace(tiny_config, qat=record(qat))
    with fake_quantized(model, qat, bare=True):
        folder = student_model.save(tmp_path / "s", model, config, tokenizer,
                                    extra={SIDECAR: scales(model, qat)})
    comp = Compression(**cli.qat_compression(dataclasses.asdict(Compression()), config.qat))
    assert (comp.weights, comp.block_size, comp.embedding) == ("int4", 32, "int8")
    converted = converted_decode(folder)
    exported = exported_weights(folder, tmp_path, comp, config.qat, converted)
    saved = mx.load(str(folder / "model.safetensors"))
    check_hand_off(exported, saved, mx.load(str(folder / SIDECAR)), 4, 32,
                   skip=("model.embed_tokens.weight",))
    ints = exported["model.layers.0.mlp.up_proj.weight"][1]
    assert (np.abs(ints) == 7).mean() > 0.05  # clipped to the grid's end
    # Without the checkpoint's scales coremltools re-derives them, and the weights move.
    (tmp_path / "d").mkdir()
    derived = exported_weights(folder, tmp_path / "d", comp, converted=converted)[
        "model.layers.0.mlp.up_proj.weight"]
    w = np.array(saved["model.layers.0.mlp.up_proj.weight"]).astype(np.float16)
    assert not np.array_equal(derived[0].astype(np.float16), w)


def test_an_off_grid_checkpoint_is_refused(qat_run, tmp_path):
    out, _ = qat_run
    folder = tmp_path / "edited"
    shutil.copytree(out, folder)
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"] *= 1.001
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    qat = json.loads((folder / "config.json").read_text())["student"]["qat"]
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight is not on the grid"):
        exact_weights(folder, qat, [0])


def test_cli_exports_a_qat_checkpoint_in_its_format(qat_run, tmp_path):
    """The checkpoint's QAT block beats the config file's compression; a flag beats both."""
    out, _ = qat_run
    cfg = tmp_path / "e.yaml"
    cfg.write_text("compression:\n  weights: int4\n  embedding: int4\n")
    args = cli.parse_args(["--model", str(out), "--config", str(cfg), "--out", str(tmp_path / "a"),
                           "--contexts", "128", "--prefill-lengths", "16", "--no-parity",
                           "--embedding", "fp16"])
    comp = cli.run(args)["compression"]
    assert (comp["weights"], comp["embedding"]) == ("int8", "fp16")
    assert comp["qat"] == {"bits": 8, "group_size": 32, "embeddings": True, "scales": "minmax",
                           "activations": 0}
