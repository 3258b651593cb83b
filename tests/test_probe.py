"""The parity probe (export/probe.py, export/taps.py) on real components: a tiny student saved by
mlx_student, converted by real coremltools (fp16, and int8 compressed) and re-loaded from disk,
run by mlx-lm, the PyTorch mirror and the reference MIL executor. The fp16 and int8 packages pass
their gates; a package with one deliberately perturbed weight fails, and the taps localize it."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coremltools")

from export import mil_executor, probe, probe_report  # noqa: E402
from export import taps as tp  # noqa: E402
from export.compress import Compression, compress  # noqa: E402
from export.convert import FunctionSpec, convert_function, save_multifunction  # noqa: E402
from export.mirror import load_mirror  # noqa: E402
from mlx_student import model as student_model  # noqa: E402
from mlx_student.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).parent.parent
SPECS = [FunctionSpec("decode_ctx128", "decode", 1, 128),
         FunctionSpec("prefill_16_ctx128", "prefill", 16, 128)]
LAYERS = 2
NORM_SCALE = 4.0  # random init gives near-uniform next-token distributions (top-1 p ~2e-4),
# where top-1 is a coin toss between near-ties; a larger final norm scale (a lower softmax
# temperature) gives a peaked head and a long tail, like a trained model's.


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    import mlx.core as mx

    config = load_config(ROOT / "configs" / "tiny.yaml")
    config.contexts, config.prefill_lengths = [128], [16]
    model = student_model.build(config, seed=4)
    model.model.norm.weight = model.model.norm.weight * NORM_SCALE
    mx.eval(model.parameters())
    return student_model.save(tmp_path_factory.mktemp("probe") / "tiny", model, config, tokenizer)


def _save(models, folder: Path, comp: Compression) -> Path:
    folder.mkdir(parents=True)
    pkg = save_multifunction(models, folder / "model.mlpackage", SPECS[0].name)
    manifest = {"format": "mlx-student-export/1", "package": "model.mlpackage",
                "compression": comp.describe()}
    (folder / "export_manifest.json").write_text(json.dumps(manifest))
    return pkg


@pytest.fixture(scope="module")
def packages(student, tmp_path_factory):
    """{"fp16": package, "int8": package}: one conversion, saved as is and int8-compressed."""
    mirror = load_mirror(student)
    models = {s.name: convert_function(mirror, s) for s in SPECS}
    root = tmp_path_factory.mktemp("art")
    out = {"fp16": _save(models, root / "fp16", Compression(weights="fp16", embedding="fp16"))}
    int8 = Compression(weights="int8", embedding="int8")
    out["int8"] = _save({k: compress(m, int8) for k, m in models.items()}, root / "int8", int8)
    return out


def _probe(student, package, out, *flags):
    """Run the CLI in-process; returns (exit status, report dict)."""
    try:
        probe.main(["--model", str(student), "--package", str(package), "--out", str(out),
                    *flags])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, json.loads((out / "probe_report.json").read_text())


@pytest.fixture(scope="module")
def fp16_report(student, packages, tmp_path_factory):
    return _probe(student, packages["fp16"], tmp_path_factory.mktemp("fp16_report"))


def test_fp16_package_passes_with_every_tap(fp16_report):
    code, r = fp16_report
    assert code == 0 and r["ok"], r["gates"]
    assert r["backends"]["coreml_backend"] == "executor"
    assert "reference MIL executor" in r["backends"]["coreml"]
    names = tp.tap_names(LAYERS)
    assert r["tap_names"] == names and r["unmapped_coreml_taps"] == []
    assert list(r["taps"]["coreml_vs_mlx"]) == names == list(r["taps"]["mirror_vs_mlx"])
    u = probe.FP16_UNIT_ROUNDOFF
    assert list(r["taps"]["mlx_fp16_vs_mlx"]) == names
    for n in names:
        c, m = r["taps"]["coreml_vs_mlx"][n], r["taps"]["mirror_vs_mlx"][n]
        e16 = r["taps"]["mlx_fp16_vs_mlx"][n]["rel_err"]
        assert c["fp16_rel_err"] == m["fp16_rel_err"] == e16 > u / 8, n  # fp16 weights round
        assert m["err_ratio"] == m["rel_err"] / max(e16, u) < 2**-3, (n, m)  # the error model
        assert c["err_ratio"] == c["rel_err"] / max(e16, u) < 8, (n, c)
        assert c["rel_err"] > u / 8 and c["cosine"] > 1 - (8 * max(e16, u)) ** 2, (n, c)
        assert c["max_abs_err"] > m["max_abs_err"] and c["nonfinite"] == 0
        assert 1 < r["headroom"][n]["fp16_headroom"] == pytest.approx(
            65504 / r["headroom"][n]["max_abs"])
    e2e = r["end_to_end"]["coreml_vs_mlx"]
    assert e2e["positions"] == 4 * 17 and len(e2e["per_step"]) == 17
    assert e2e["prefill"]["positions"] == 4 and e2e["decode"]["positions"] == 64
    assert e2e["top1"] >= 0.99 and 0 < e2e["kl_mean"] < 0.01
    assert r["end_to_end"]["mlx_top1_prob_mean"] > 0.02  # peaked enough for top-1 to mean much
    assert r["end_to_end"]["mirror_vs_mlx"]["top1"] == 1.0
    # KL of a logit perturbation d is ~ Var_p(d) / 2 <= max |d|^2 / 2 (fp32: second order)
    assert r["end_to_end"]["mirror_vs_mlx"]["kl_max"] <= \
        r["taps"]["mirror_vs_mlx"]["logits"]["max_abs_err"] ** 2
    assert {g["gate"] for g in r["gates"]} == set(probe.GATE_KEYS)
    assert r["gates_applied"]["tap_err_ratio"] == 8 and r["gates_applied"]["top1"] == 0.99
    assert r["gates_applied"]["mirror_err_ratio"] == 0.125
    assert r["text"]["path"].endswith("traceback.py") and r["weight_format"] == "fp16"
    assert set(r["fp16_audit"]) == {"mirror.residual", "mirror.norm_mean_square",
                                    "mirror.attention_logits", "mirror.swiglu_product",
                                    "mirror.logits"}
    assert set(r["coreml_tap_vars"]) == {"prefill_16_ctx128", "decode_ctx128"}
    assert r["coreml_tap_vars"]["decode_ctx128"]["logits"] == "logits"


def test_report_files_exist_and_agree(fp16_report):
    from PIL import Image

    _, r = fp16_report
    files = {k: Path(v) for k, v in r["files"].items()}
    assert sorted(p.name for p in files["json"].parent.iterdir()) == sorted(probe_report.FILES.values())
    md = files["markdown"].read_text()
    assert md.startswith("# Probe report: PASS") and r["run_id"] in md
    assert "reference MIL executor" in md
    for g in r["gates"]:
        assert f"| {g['gate']} | {probe.fmt_value(g['value'])} |" in md
    for n, c in r["taps"]["coreml_vs_mlx"].items():
        assert f"| {n} | {probe.fmt_value(c['max_abs_err'])} | {probe.fmt_value(c['rel_err'])} |" in md
    e = r["end_to_end"]["coreml_vs_mlx"]
    assert f"| coreml | {e['positions']} | {probe.fmt_value(e['top1'])} | {probe.fmt_value(e['kl_mean'])} |" in md
    png = Image.open(files["plot"])
    assert png.format == "PNG" and png.size[0] >= 600
    assert png.text["Description"] == r["run_id"]


def test_int8_package_passes_the_int8_gate(student, packages, fp16_report, tmp_path):
    code, r = _probe(student, packages["int8"], tmp_path, "--windows", "3")
    assert code == 0 and r["ok"], r["gates"]
    assert r["weight_format"] == "int8" and r["gates_applied"]["top1"] == 0.95
    assert r["end_to_end"]["coreml_vs_mlx"]["top1"] >= 0.95
    worst = lambda rep: max(c["rel_err"] for c in rep["taps"]["coreml_vs_mlx"].values())  # noqa
    assert worst(r) > 2 * worst(fp16_report[1])  # the quantization error is visible
    assert r["unmapped_coreml_taps"] == []  # constexpr-dequantized weights keep their names


def _perturb(package: Path, weight: str, scale: float):
    """Scale one fp16 weight blob of a saved package in place (shared by every function)."""
    spec, weights = mil_executor.read_spec(package)
    offsets = {op.attributes["val"].blobFileValue.offset
               for f in spec.mlProgram.functions.values()
               for b in f.block_specializations.values() for op in b.operations
               if op.type == "const" and op.outputs[0].name == weight}
    assert len(offsets) == 1, offsets
    blob = bytearray((weights / "weight.bin").read_bytes())
    meta = np.frombuffer(bytes(blob[offsets.pop():][:64]), np.uint64)
    size, start = int(meta[1]), int(meta[2])
    w = np.frombuffer(bytes(blob[start:start + size]), np.float16)
    blob[start:start + size] = (w.astype(np.float32) * scale).astype(np.float16).tobytes()
    (weights / "weight.bin").write_bytes(bytes(blob))


def test_perturbed_weight_fails_and_is_localized(student, packages, tmp_path, capsys):
    folder = tmp_path / "bad"
    shutil.copytree(packages["fp16"].parent, folder)
    _perturb(folder / "model.mlpackage", "mirror_layers_1_down_proj_to_fp16", 1.5)
    code, r = _probe(student, folder / "model.mlpackage", tmp_path / "report", "--windows", "2")
    err = capsys.readouterr().err
    assert code == 1 and not r["ok"]
    failed = {g["gate"]: g for g in r["gates"] if not g["ok"]}
    assert "tap_err_ratio" in failed and "gate tap_err_ratio" in err
    assert f"{failed['tap_err_ratio']['value']:.3g}" in err
    cm = r["taps"]["coreml_vs_mlx"]
    first_bad = next(n for n in r["tap_names"] if cm[n]["err_ratio"] >= 8)
    assert first_bad == "layers.1.mlp" and cm["layers.1.mlp"]["rel_err"] > 0.3
    assert all(cm[n]["err_ratio"] < 8 for n in r["tap_names"][:r["tap_names"].index(first_bad)])
    assert r["taps"]["mirror_vs_mlx"]["layers.1.mlp"]["err_ratio"] < 2**-3  # the package's fault
    assert (tmp_path / "report" / "probe_report.md").read_text().startswith(
        "# Probe report: FAIL: tap_err_ratio")


# ---------------------------------------------------------------- pieces
def test_mlx_runner_is_mlx_lm_itself(student):
    """The layer-by-layer MLX evaluation gives mlx-lm's own logits, prefill and decode."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    runner = tp.MLXRunner(student)
    ids = np.random.RandomState(1).randint(0, 49152, 20)
    cache = make_prompt_cache(runner.model)
    runner.reset()
    want = np.array(runner.model(mx.array(ids[None, :16]), cache=cache))[0, -1]
    got = runner.step(ids[:16], 0)
    assert got["embeddings"].shape == (16, 128) and got["logits"].shape == (1, 49152)
    np.testing.assert_allclose(got["logits"][0], want, rtol=0, atol=1e-5)
    for t in range(16, 20):
        want = np.array(runner.model(mx.array(ids[None, t:t + 1]), cache=cache))[0, -1]
        np.testing.assert_allclose(runner.step(ids[t:t + 1], t)["logits"][0], want, atol=1e-5)


def test_tap_map_follows_dataflow_not_names(packages):
    """Each mapped var is produced by the op the map claims: o_proj / down_proj convs, the
    residual adds, the LM-head input; the program's own op names are unrelated to the taps."""
    prog = mil_executor.load(packages["int8"], "decode_ctx128")
    mapping, unmapped = tp.package_tap_map(prog, LAYERS)
    assert unmapped == [] and sorted(mapping.values()) == sorted(tp.tap_names(LAYERS))
    producer = {v.name: op for op in prog.ops for v in op.outputs}
    for var, tap in mapping.items():
        kind = tap.split(".")[-1]
        op = producer[var]
        if kind in ("attention", "mlp"):
            w = op.inputs["weight"][0][1]
            assert op.type == "conv" and f"layers_{tap.split('.')[1]}_" in w
            assert ("o_proj" if kind == "attention" else "down_proj") in w
        elif kind.startswith("residual"):
            assert op.type == "add"
    assert producer[next(v for v, t in mapping.items() if t == "logits")].outputs[0].name == \
        "logits"


def test_choose_functions_and_gates():
    names = ["decode_ctx128", "prefill_16_ctx128", "prefill_64_ctx128", "decode_ctx256",
             "prefill_16_ctx256", "prefill_64_ctx256"]
    assert probe.choose_functions(names) == {
        "context": 128, "prefill_length": 64, "prefill": "prefill_64_ctx128",
        "decode": "decode_ctx128", "calls": [64],
        "prefills": {16: "prefill_16_ctx128", 64: "prefill_64_ctx128"}}
    # a window's prompt across chunk boundaries: the longest prefill that fits, then decode calls
    long = probe.choose_functions(names, 256, prompt_tokens=150, decode_steps=4)
    assert long["calls"] == [64, 64, 16] + [1] * 6 and long["prefill_length"] == 64
    assert probe.choose_functions(names, 256, 16, prompt_tokens=40)["calls"] == [16, 16] + [1] * 8
    with pytest.raises(probe.ProbeError, match="prompt 250 \\+ 16 decode steps exceed context 256"):
        probe.choose_functions(names, 256, prompt_tokens=250)
    assert probe.choose_functions(names, 256, 16)["prefill"] == "prefill_16_ctx256"
    assert probe.choose_functions(names, decode_steps=100)["prefill_length"] == 16
    with pytest.raises(probe.ProbeError, match="no prefill_32_ctx128"):
        probe.choose_functions(names, prefill=32)
    with pytest.raises(probe.ProbeError, match="decode_ctxS"):
        probe.choose_functions(["main"])
    assert probe.weight_format({}) == "fp16"
    assert probe.weight_format({"compression": {"weights": "int8", "embedding": "fp16"}}) == "int8"
    assert probe.weight_format({"compression": {"weights": "int8", "embedding": "lut4"}}) == "lut4"


def test_gate_settings_from_yaml_and_flags(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: runs/a\npackage: artifacts/a/model.mlpackage\nwindows: 2\n"
                   "gates:\n  kl: 0.02\n  int8:\n    top1: 0.97\n    fp16_headroom: off\n")
    a = probe.parse_args(["--config", str(cfg), "--gates", "top1=0.9", "--decode-steps", "8"])
    assert a.model == "runs/a" and a.windows == 2 and a.decode_steps == 8
    g8 = probe.resolve_gates("int8", a.gates)
    assert g8["kl"] == 0.02 and g8["top1"] == 0.9 and g8["fp16_headroom"] is None
    assert probe.resolve_gates("fp16", a.gates)["fp16_headroom"] == 2.0
    a = probe.parse_args(["--config", str(cfg)])
    assert probe.resolve_gates("int8", a.gates)["top1"] == 0.97
    assert probe.resolve_gates("fp16", a.gates)["top1"] == 0.99
    with pytest.raises(ConfigError, match="unknown gate 'top5'"):
        probe.parse_args(["--model", "m", "--package", "p", "--gates", "top5=1"])
    with pytest.raises(ConfigError, match="--model"):
        probe.parse_args([])


def test_bad_run_settings_name_their_line_or_flag(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("model: runs/a\npackage: a.mlpackage\nwindows: 0\ndecode_steps: two\n")
    with pytest.raises(ConfigError) as e:
        probe.parse_args(["--config", str(cfg), "--context", "-5"])
    assert str(e.value).splitlines() == [
        f"{cfg}:4: decode_steps: must be an integer >= 1, got 'two'",
        f"{cfg}:3: windows: must be an integer >= 1, got 0",
        "--context: must be an integer >= 1, got -5"]


def test_nonfinite_values_fail_and_stay_valid_json():
    c = tp.compare(np.array([np.inf, 1.0, 2.0]), np.array([1.0, 1.0, 2.0]))
    assert c["nonfinite"] == 1 and c["rel_err"] == np.inf and c["fp16_headroom"] == 0
    c = probe.error_ratios({"logits": c}, {"logits": c})["logits"]  # the fp16 model overflowed
    assert c["err_ratio"] == np.inf and c["fp16_rel_err"] == np.inf
    report = {"taps": {"coreml_vs_mlx": {"logits": c}, "mirror_vs_mlx": {"logits": c}},
              "end_to_end": {"coreml_vs_mlx": {"top1": 1.0, "kl_mean": np.inf, "positions": 3}},
              "headroom": {"logits": {"max_abs": 2.0, "fp16_headroom": 32752.0}}}
    gates = {g["gate"]: g["ok"] for g in probe.evaluate_gates(report, probe.resolve_gates(
        "fp16", {}))}
    assert gates == {"tap_err_ratio": False, "top1": True, "kl": False, "mirror_err_ratio": False,
                     "fp16_headroom": True}
    # an fp16 overflow inside a norm (the trained pilot's case) is seen by the mirror's audit taps
    report["fp16_audit"] = {"mirror.norm_mean_square": {"max_abs": 1.5e7, "fp16_headroom": 0.004}}
    failed = [g for g in probe.evaluate_gates(report, probe.resolve_gates("fp16", {}))
              if g["gate"] == "fp16_headroom"][0]
    assert not failed["ok"] and "mirror.norm_mean_square" in failed["detail"]
    text = json.dumps(probe_report._json_safe(report), allow_nan=False)
    assert json.loads(text)["taps"]["coreml_vs_mlx"]["logits"]["rel_err"] == "inf"


def test_errors_exit_2(student, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["--model", str(student), "--package", str(tmp_path / "none.mlpackage")])
    assert e.value.code == 2 and "no such package" in capsys.readouterr().err


def test_default_text_is_held_out():
    """traceback.py falls in the stdlib corpus' test split (scripts/make_text_corpus.py)."""
    spec = importlib.util.spec_from_file_location("corpus", ROOT / "scripts/make_text_corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    assert probe.default_text_path().name == "traceback.py"
    assert corpus.split_of("traceback.py", valid=0.05, test=0.05) == "test"


def test_windows_across_prefill_chunks(tmp_path, tokenizer):
    """A 300-token window at context 512 goes in as 4 x 64 + 2 x 16 prefill chunks and 12
    decode calls, then 4 decode steps, each call at the running position through the KV state
    the earlier chunks wrote; every tap of every call stays within the fp16 error model."""
    import dataclasses

    config = load_config(ROOT / "configs" / "tiny.yaml")
    config = dataclasses.replace(config, contexts=[512], prefill_lengths=[16, 64],
                                 max_position_embeddings=512)
    model = student_model.build(config, seed=4)
    model.model.norm.weight = model.model.norm.weight * NORM_SCALE
    student = student_model.save(tmp_path / "tiny512", model, config, tokenizer)
    specs = [FunctionSpec("decode_ctx512", "decode", 1, 512),
             FunctionSpec("prefill_16_ctx512", "prefill", 16, 512),
             FunctionSpec("prefill_64_ctx512", "prefill", 64, 512)]
    mirror = load_mirror(student)
    folder = tmp_path / "pkg"
    folder.mkdir()
    save_multifunction({s.name: convert_function(mirror, s) for s in specs},
                       folder / "model.mlpackage", specs[0].name)
    code, r = _probe(student, folder / "model.mlpackage", tmp_path / "out", "--prompt-tokens",
                     "300", "--decode-steps", "4", "--windows", "2")
    assert code == 0 and r["ok"], r["gates"]
    t = r["text"]
    assert t["calls"] == {"64": 4, "16": 2, "1": 12} and t["prompt_tokens"] == 300
    assert t["functions"]["prefills"] == ["prefill_16_ctx512", "prefill_64_ctx512"]
    e2e = r["end_to_end"]["coreml_vs_mlx"]
    assert e2e["positions"] == 2 * 22 and len(e2e["per_step"]) == 22
    assert e2e["prefill"]["positions"] == 2 * 6 and e2e["decode"]["positions"] == 2 * 16
    assert e2e["top1"] >= 0.99 and e2e["kl_mean"] < 0.01
    for n in tp.tap_names(LAYERS):
        c, m = r["taps"]["coreml_vs_mlx"][n], r["taps"]["mirror_vs_mlx"][n]
        assert c["err_ratio"] < 8 and m["err_ratio"] < 2**-3 and c["nonfinite"] == 0, (n, c, m)
    assert set(r["coreml_tap_vars"]) == {s.name for s in specs}
