"""The fp16 headroom audit on the fp32 mirror: quiet on a healthy student, trips on one whose
weights are scaled to overflow fp16, and the CLI refuses (or warns) accordingly."""

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from export import audit, cli
from export.mirror import TAPS, load_mirror
from conftest import save_tiny


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer):
    return save_tiny(tmp_path_factory.mktemp("a") / "tiny", tokenizer, seed=5)


@pytest.fixture(scope="module")
def hot_dir(student_dir, tmp_path_factory):
    """The same student with its embedding, MLP norms and up-projections scaled up."""
    hot = tmp_path_factory.mktemp("hot") / "tiny"
    hot.mkdir()
    for f in student_dir.iterdir():
        if f.suffix != ".safetensors":
            (hot / f.name).write_bytes(f.read_bytes())
    w = load_file(str(student_dir / "model.safetensors"))
    scale = {"embed_tokens": 2e4, "post_attention_layernorm": 100, "up_proj": 300}
    for k in w:
        for name, s in scale.items():
            if name in k:
                w[k] = w[k] * np.float32(s)
    save_file(w, str(hot / "model.safetensors"), metadata={"format": "mlx"})
    return hot


def test_healthy_student_passes_with_real_text(student_dir):
    mirror = load_mirror(student_dir)
    ids = audit.calibration_ids(student_dir, length=64, rows=2)
    assert ids.shape == (2, 64) and len(np.unique(ids)) > 20  # real tokens, not padding
    result = audit.audit(mirror, ids, margin=2.0)
    assert result["ok"] and set(result["taps"]) == set(TAPS)
    for t in result["taps"].values():
        assert 0 < t["max_abs"] < 100 and t["headroom"] == pytest.approx(65504 / t["max_abs"])
    assert mirror.taps is None  # recording is switched off again
    audit.check(result, "fail")


def test_audit_trips_on_overflowing_weights(hot_dir, capsys):
    mirror = load_mirror(hot_dir)
    result = audit.audit(mirror, audit.calibration_ids(hot_dir, length=32, rows=1), margin=2.0)
    assert not result["ok"]
    over = {k for k, t in result["taps"].items() if not t["ok"]}
    assert "swiglu_product" in over
    assert result["taps"]["residual"]["max_abs"] > 1000  # the scaled embedding is seen
    # ... and the RMSNorm, which divides by max |x| before squaring, never overflows.
    assert result["taps"]["norm_mean_square"]["ok"]
    assert result["taps"]["norm_mean_square"]["max_abs"] <= 1.0
    with pytest.raises(audit.Fp16Overflow, match="swiglu_product"):
        audit.check(result, "fail")
    audit.check(result, "warn")
    assert "WARNING: fp16 headroom" in capsys.readouterr().err


def test_cli_refuses_before_converting(hot_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(hot_dir), "--out", str(out), "--no-parity"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: fp16 headroom" in err and "OVER" in err and "fp16_audit: warn" in err
    assert not out.exists()
