"""The judge as one CoreML package (a score function per length, int8), run on the reference
MIL executor against the MLX judge within the fp16 + int8 error model."""

import json
import subprocess
import sys

import pytest

from arbiter.judge import export as judge_export
from arbiter.judge import model as judge_model
from export.compress import role
from export.convert import describe
from judge_pairs import make_rows
from test_judge import tiny_judge


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("jexp")
    judge, config = tiny_judge(seed=3)
    folder = judge_model.save(tmp / "judge", judge, config, tokenizer)
    rows = make_rows(2, seed=8)
    texts = [(r["prompt"], r[k]["text"]) for r in rows for k in "ab"]  # two pairs, a then b
    manifest = judge_export.export_judge(folder, tmp / "out", [32, 64], "int8", texts)
    return tmp / "out", manifest


def test_one_package_a_score_function_per_length_int8(exported):
    out, manifest = exported
    d = describe(out / "judge.mlpackage")
    assert set(d["functions"]) == {"score_32", "score_64"} and d["default_function"] == "score_32"
    f = d["functions"]["score_64"]
    assert f["inputs"] == {"input_ids": {"shape": [1, 64], "dtype": "int32"},
                           "length": {"shape": [1], "dtype": "int32"}}
    assert set(f["outputs"]) == {"score", "clause_logits"}
    assert f["outputs"]["clause_logits"]["shape"] == [1, 5]
    # every projection and the embedding int8 (constexpr dequantization); the heads stay fp16
    quantized = {n: op for n, op in f["weights"].items() if role(n) in ("weights", "embedding")}
    assert len(quantized) == 7 * 2 + 3, f["weights"]  # 2 layers x 7 projections, 3 vocab chunks
    assert set(quantized.values()) == {"constexpr_blockwise_shift_scale"}
    assert {op for n, op in f["weights"].items() if "weight" in n and role(n) is None} == {"const"}
    assert json.loads((out / "judge_export.json").read_text())["lengths"] == [32, 64]


def test_package_scores_agree_with_mlx_through_the_executor(exported):
    _, manifest = exported
    for name in ("score_32", "score_64"):
        v = manifest["verify"][name]
        assert v["rows"] == 4 and v["max_err_over_tol"] < 1.0, v  # inside the error model
        assert v["margin_sign_agreement"] == 1.0
        assert v["clause_max_abs_err"] < 0.05


def test_cli_refuses_a_folder_that_is_not_a_judge(tmp_path, tokenizer):
    from conftest import save_tiny

    plain = save_tiny(tmp_path / "plain", tokenizer)
    r = subprocess.run([sys.executable, "-m", "arbiter.judge.export", "--judge", str(plain),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{plain}/config.json: student.judge: missing (not a judge checkpoint)" in r.stderr
    assert not (tmp_path / "o").exists()
