"""Tests for mlx_student.info: its arithmetic against the built model's real parameters."""

import dataclasses
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_student import info
from mlx_student.config import StudentConfig, load_config
from mlx_student.model import build, num_parameters

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
WORKER_9B = ROOT / "configs" / "worker_9b.yaml"


def tiny():
    return load_config(TINY)


def untied():
    return dataclasses.replace(tiny(), tie_word_embeddings=False)


def mha():
    """num_key_value_heads == num_attention_heads, untied, 3 layers."""
    return StudentConfig(hidden_size=256, num_hidden_layers=3, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                         vocab_size=1000, tie_word_embeddings=False, contexts=[128])


CONFIGS = {"tiny": tiny, "untied": untied, "mha": mha}


def run_info(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mlx_student.info", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module", params=list(CONFIGS))
def built(request):
    config = CONFIGS[request.param]()
    return config, build(config)


def test_parameter_count_matches_built_model(built):
    config, model = built
    p = info.parameters(config)
    assert p["total"] == num_parameters(model)
    flat = dict(tree_flatten(model.parameters()))
    assert p["embedding"] == flat["model.embed_tokens.weight"].size
    assert p["lm_head"] == (flat["lm_head.weight"].size if "lm_head.weight" in flat else 0)
    assert ("lm_head.weight" in flat) == (not config.tie_word_embeddings)
    layer0 = {k: v.size for k, v in flat.items() if k.startswith("model.layers.0.")}
    assert p["per_layer"]["total"] == sum(layer0.values())
    assert p["per_layer"]["attention"] == sum(v for k, v in layer0.items() if "self_attn" in k)
    assert p["per_layer"]["mlp"] == sum(v for k, v in layer0.items() if ".mlp." in k)
    assert p["final_norm"] == flat["model.norm.weight"].size


def reference_bytes(model):
    """Bytes per format, counted over the real parameter shapes: 2-D weights quantized
    (rows = outputs, columns = inputs), 1-D weights fp16."""
    out = {"fp16": 0, "int8": 0, "int4": 0}
    for _, w in tree_flatten(model.parameters()):
        if w.ndim == 1:
            for fmt in out:
                out[fmt] += 2 * w.size
            continue
        assert w.ndim == 2
        rows, cols = w.shape
        out["fp16"] += np.zeros(w.shape, np.float16).nbytes
        out["int8"] += np.zeros(w.shape, np.int8).nbytes + np.zeros(rows, np.float16).nbytes
        groups = np.zeros((rows, math.ceil(cols / 32)), np.float16)  # one scale per 32 inputs
        out["int4"] += rows * cols // 2 + groups.nbytes
    return out


def test_weight_bytes_match_reference(built):
    config, model = built
    ref = reference_bytes(model)
    for fmt in ("fp16", "int8", "int4"):
        assert info.weight_bytes(config, fmt) == ref[fmt], fmt
    assert info.weight_bytes(config, "fp16") == 2 * num_parameters(model)


def test_decode_bytes_skip_only_untied_input_embedding():
    t, u = tiny(), untied()
    for fmt in ("fp16", "int8", "int4"):
        assert info.weight_bytes(t, fmt, decode=True) == info.weight_bytes(t, fmt)
        table = info.matrix_bytes(u.vocab_size, u.hidden_size, fmt)
        assert info.weight_bytes(u, fmt, decode=True) == info.weight_bytes(u, fmt) - table
        # untied: the LM head is read, the input table is not -> same as tied
        assert info.weight_bytes(u, fmt, decode=True) == info.weight_bytes(t, fmt)


def test_kv_bytes_and_tokens_per_s_by_hand():
    c = tiny()  # 2 layers, 1 KV head, head_dim 64
    assert info.kv_bytes(c, 128) == 2 * 2 * 1 * 64 * 128 * 2 == 65_536
    assert info.kv_bytes(c, 256) == 131_072
    assert info.tokens_per_s(4e9, 400.0) == pytest.approx(100.0)
    assert info.tokens_per_s(1.1e9, 55.0) == pytest.approx(50.0)
    # tiny, tied, fp16: 2 * 6,587,008 weight bytes + 65,536 KV bytes at ctx 128
    row = info.info(c)["decode"][0]
    assert row["context"] == 128
    assert row["bytes_per_token"]["fp16"] == 13_174_016 + 65_536
    assert row["tokens_per_s"]["gpu"]["fp16"] == pytest.approx(400e9 / 13_239_552)
    assert row["tokens_per_s"]["ane"]["fp16"] == pytest.approx(55e9 / 13_239_552)


def test_module_does_not_import_mlx():
    code = "import sys, mlx_student.info; assert 'mlx.core' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_json_on_tiny():
    r = run_info("--config", TINY, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["parameters"]["total"] == 6_587_008 == num_parameters(build(tiny()))
    assert [row["context"] for row in d["decode"]] == [128, 256]
    assert d["formats"]["int4"]["bytes"] == info.weight_bytes(tiny(), "int4")


def test_cli_human_on_tiny():
    r = run_info("--config", TINY)
    assert r.returncode == 0, r.stderr
    assert "6,587,008 (6.59 M)" in r.stdout
    assert "upper bounds" in r.stdout.lower() and "group 32" in r.stdout


def test_cli_bad_config_exits_2(tmp_path):
    text = TINY.read_text().replace("hidden_size: 128", "hidden_size: -100")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "  colour: red\n")
    lines = bad.read_text().splitlines()
    line_of = {k: next(i + 1 for i, s in enumerate(lines) if s.strip().startswith(k + ":"))
               for k in ("hidden_size", "colour")}
    r = run_info("--config", bad)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    for field, line in line_of.items():
        assert f"{bad}:{line}: model.{field}:" in r.stderr


def test_cli_worker_9b_is_8_to_9_billion_within_10s():
    assert WORKER_9B.exists(), f"{WORKER_9B} is missing"
    start = time.perf_counter()
    r = run_info("--config", WORKER_9B, timeout=30)
    wall = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert wall < 10, f"took {wall:.1f} s"
    m = re.search(r"Parameters: ([\d,]+) \((\d+\.\d\d) B\)", r.stdout)
    assert m, r.stdout
    assert 8e9 <= int(m.group(1).replace(",", "")) < 9e9
