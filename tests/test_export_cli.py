"""The export CLI's settings and its errors (no conversion runs here; test_export_coreml runs
the whole CLI)."""

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from export import cli, convert
from mlx_student.config import ConfigError

ROOT = Path(__file__).parent.parent


def test_flags_override_the_yaml(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("model: runs/a\ncompression:\n  weights: int4\n  embedding: lut4\n"
                   "fp16_margin: 4.0\ncontexts: [512]\n")
    a = cli.parse_args(["--config", str(cfg), "--weights", "int8", "--contexts", "256", "1024"])
    assert a.model == "runs/a" and a.contexts == [256, 1024] and a.fp16_margin == 4.0
    assert a.compression["weights"] == "int8" and a.compression["embedding"] == "lut4"
    assert a.compression["block_size"] == 32 and a.parity is True and a.onnx is False
    a = cli.parse_args(["--model", "runs/b", "--config", str(ROOT / "configs/export.yaml"),
                        "--no-parity", "--onnx"])
    assert a.model == "runs/b" and a.parity is False and a.onnx is True
    assert a.compression == cli.CONFIG_DEFAULTS["compression"]


def test_bad_settings_are_reported(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("model: runs/a\nweigths: int8\n")
    with pytest.raises(ConfigError, match=r"e.yaml:2: weigths: unknown export setting"):
        cli.parse_args(["--config", str(cfg)])
    cfg.write_text("model:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="architecture mapping"):
        cli.parse_args(["--config", str(cfg)])
    with pytest.raises(ConfigError, match="no model"):
        cli.parse_args([])
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "x", "--weights", "int3"])
    cfg.write_text("model: runs/a\ncompression:\n  lut_group_size: 0\nfp16_margin: 0.5\n")
    with pytest.raises(ConfigError) as e:  # each checked at load, where it was set
        cli.parse_args(["--config", str(cfg), "--prefill-lengths", "0", "--block-size", "0",
                        "--calibration-tokens", "0"])
    assert str(e.value).splitlines()[1:] == [
        "  --prefill-lengths: must be a list of integers >= 1 (or null), got [0]",
        f"  {cfg}:4: fp16_margin: must be a number >= 1 (taps stay below 65504 / it), got 0.5",
        "  --calibration-tokens: must be an integer >= 2, got 0",
        "  --block-size: must be an integer >= 1, got 0",
        f"  {cfg}:3: compression.lut_group_size: must be an integer >= 1, got 0"]


def test_plan_and_its_errors():
    names = [s.name for s in convert.plan([512, 1024], [64, 128])]
    assert names == ["decode_ctx512", "prefill_64_ctx512", "prefill_128_ctx512",
                     "decode_ctx1024", "prefill_64_ctx1024", "prefill_128_ctx1024"]
    with pytest.raises(convert.ExportError, match="prefill length 512 exceeds the context 256"):
        convert.plan([256], [512])


def test_clear_errors_from_main(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(tmp_path / "nope")])
    assert e.value.code == 2 and "not a model folder" in capsys.readouterr().err
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(SystemExit):
        cli.main(["--model", str(folder)])
    assert "only llama students" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--model", str(folder), "--lut-mode", "kmeans", "--weights", "lut4"])


def test_old_coremltools_is_refused(monkeypatch):
    import coremltools as ct

    monkeypatch.setattr(ct, "__version__", "7.2")
    with pytest.raises(convert.ExportError, match="7.2 is too old.*>= 8.0"):
        convert.coremltools()


def test_no_space_left_is_a_clear_error(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(convert.ExportError, match=r"no space left: .*0\.02 GB.*0\.00 GB are free"):
        cli.check_space(tmp_path, 2 * 10**7)
