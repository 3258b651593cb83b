"""The static ANE lint (export/ane_lint.py) on small programs that real coremltools saves here:
each rule fires on the op that breaks it, names it, and stays quiet on a clean fp16 program."""

import json
import sys

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol, types  # noqa: E402

from export import ane_lint  # noqa: E402


def save(prog, path, precision=ct.precision.FLOAT32):
    model = ct.convert(prog, minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    model.save(str(path))
    return path


def by_rule(findings):
    out = {}
    for f in findings:
        out.setdefault(f.rule, []).append(f)
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """An fp16 block: 1x1 conv, RMS-norm-like reduce, softmax, silu: nothing to report."""
    w = np.random.RandomState(0).randn(16, 8, 1, 1).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8, 1, 4), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x):
        n = mb.mul(x=x, y=mb.rsqrt(x=mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[1], keep_dims=True)))
        h = mb.conv(x=n, weight=w, name="proj")
        return mb.silu(x=mb.softmax(x=h, axis=1), name="out")

    return save(prog, tmp_path_factory.mktemp("lint") / "clean.mlpackage")


def test_clean_fp16_program_has_no_findings(clean):
    assert ane_lint.lint(clean) == []


def test_fp32_compute_is_flagged_per_op(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 8))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.softmax(x=mb.linear(x=x, weight=np.ones((4, 8), np.float32), name="lin"), name="sm")

    findings = by_rule(ane_lint.lint(save(prog, tmp_path / "f.mlpackage")))
    assert [(f.op, f.name, f.severity) for f in findings["fp32-compute"]] == [
        ("linear", "lin", "warning"), ("softmax", "sm", "warning")]
    assert "fp32" in str(findings["fp32-compute"][0]) and "main" in str(findings["fp32-compute"][0])


def test_wide_dims_gathers_int_math_and_cpu_ops(tmp_path):
    table = np.random.RandomState(1).randn(100, 8).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 20000), dtype=types.fp16),
                             mb.TensorSpec(shape=(3,), dtype=types.int32),
                             mb.TensorSpec(shape=(4, 8), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(wide, ids, h):
        scaled = mb.mul(x=wide, y=np.float16(2.0), name="wide_mul")
        flat = mb.reshape(x=scaled, shape=[20000], name="wide_reshape")
        pos = mb.add(x=ids, y=np.int32(1), name="pos")
        emb = mb.gather(x=table, indices=pos, axis=0, name="embed")
        picked = mb.gather(x=h, indices=ids, axis=0, name="pick")
        top = mb.topk(x=h, k=2, axis=-1, name="top")
        return flat, emb, picked, top[0]

    findings = by_rule(ane_lint.lint(save(prog, tmp_path / "w.mlpackage")))
    wide = {f.name: f.severity for f in findings["dim-above-16384"]}
    assert wide == {"wide": "warning", "wide_mul": "error", "wide_reshape": "warning"}
    assert [(f.name, f.severity) for f in findings["gather-table"]] == [("embed", "info")]
    assert [(f.name, f.severity) for f in findings["gather-activation"]] == [("pick", "warning")]
    assert [f.name for f in findings["int-arithmetic"]] == ["pos"]
    assert "from inputs" in findings["int-arithmetic"][0].message
    assert [f.op for f in findings["cpu-op"]] == ["topk"]
    assert "fp32-compute" not in findings


def test_dynamic_shapes_are_errors(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(get_new_symbol(), 8), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x):
        return mb.relu(x=x, name="r")

    findings = by_rule(ane_lint.lint(save(prog, tmp_path / "d.mlpackage")))
    assert {(f.op, f.name) for f in findings["dynamic-shape"]} >= {("input", "x"), ("relu", "r")}
    assert all(f.severity == "error" for f in findings["dynamic-shape"])


def test_int4_blockwise_weights_are_noted(tmp_path):
    lin = torch.nn.Linear(64, 32, bias=False).eval()
    mlmodel = ct.convert(torch.jit.trace(lin, (torch.zeros(1, 64),)),
                         inputs=[ct.TensorType(name="x", shape=(1, 64))],
                         minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    opt = ct.optimize.coreml
    cfg = opt.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block",
                                      block_size=16, weight_threshold=0)
    path = tmp_path / "q.mlpackage"
    opt.linear_quantize_weights(mlmodel, opt.OptimizationConfig(global_config=cfg)).save(str(path))
    findings = by_rule(ane_lint.lint(path))
    assert [f.op for f in findings["int4-blockwise"]] == ["constexpr_blockwise_shift_scale"]


def test_cli(tmp_path, clean, capsys):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 20000), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x):
        return mb.exp(x=x, name="e")

    bad = save(prog, tmp_path / "bad.mlpackage")
    assert ane_lint.run(ane_lint.build_parser().parse_args([str(bad), "--json"])) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["main"]["error"] == {"dim-above-16384": 1}
    assert report["findings"][-1]["op"] == "exp" and report["findings"][-1]["name"] == "e"
    assert ane_lint.run(ane_lint.build_parser().parse_args([str(clean)])) == 0
    assert ane_lint.run(ane_lint.build_parser().parse_args([str(bad), "--fail-on", "never"])) == 0


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the Linux refusal")
def test_compute_plan_says_it_needs_macos(clean):
    with pytest.raises(RuntimeError, match="macOS"):
        ane_lint.compute_plan(clean)


@pytest.mark.parametrize("flex", ["enumerated", "range"])
def test_enumerated_shapes_are_info_and_ranges_are_errors(tmp_path, flex):
    lin = torch.nn.Linear(8, 8).eval()
    shape = (ct.EnumeratedShapes(shapes=[(1, 4, 8), (1, 16, 8)]) if flex == "enumerated"
             else (1, ct.RangeDim(1, 64), 8))
    mlmodel = ct.convert(torch.jit.trace(lin, (torch.zeros(1, 4, 8),)),
                         inputs=[ct.TensorType(name="x", shape=shape, dtype=np.float16)],
                         minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    mlmodel.save(str(tmp_path / "e.mlpackage"))
    findings = ane_lint.lint(tmp_path / "e.mlpackage")
    if flex == "enumerated":
        assert [(f.rule, f.severity, f.name) for f in findings] == [("enumerated-shapes", "info", "x")]
    else:
        errors = {(f.op, f.name) for f in findings if f.rule == "dynamic-shape" and f.severity == "error"}
        assert ("input", "x") in errors and any(op == "linear" for op, _ in errors)


def test_cli_refuses_what_is_not_a_package_in_one_line(tmp_path, clean, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "x.json").write_text('{"functions": ["main"]}\n')
    cases = [([str(tmp_path / "folder")], f"{tmp_path / 'folder'}: not an .mlpackage (no Manifest.json)"),
             ([str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no such file or folder"),
             ([str(tmp_path / "x.json")], f"{tmp_path / 'x.json'}: not a CoreML model"),
             ([str(clean), "--function", "nope"], f"{clean}: no function 'nope' (the package has main)")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            ane_lint.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
