"""The memory planner: arithmetic on the big configs, and planned vs measured peak memory."""

import json
from dataclasses import replace

import pytest
from conftest import ROOT

from mlx_student import plan
from mlx_student.config import load_config
from mlx_student.info import parameters

TOLERANCE = 0.15  # |planned / measured - 1| on this machine's MLX CPU backend
SETTINGS = [
    {},
    {"fine_tune": "lora"},
    {"fine_tune": "dora"},
    {"fine_tune": "qlora4", "batch_size": 1, "max_seq_length": 64},  # CPU quantized matmul: slow
    {"grad_checkpoint": True},
    {"optimizer": "adafactor"},
    {"topk": 32},
    {"grad_accumulation_steps": 2, "batch_size": 1},
    # few tokens: the peak is the optimizer step's (AdamW) / the end of the backward pass's
    {"batch_size": 1, "max_seq_length": 32},
    {"batch_size": 1, "max_seq_length": 32, "optimizer": "sgd"},
]


@pytest.mark.parametrize("change", SETTINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "full")
def test_planned_peak_matches_mx_get_peak_memory(change):
    config = load_config(ROOT / "configs/tiny.yaml")
    setting = replace(plan.Setting(batch_size=2, max_seq_length=128), **change)
    r = plan.measure(config, setting)  # step 2: the moments exist
    assert abs(r["ratio"] - 1) <= TOLERANCE, r


def test_worker_9b_fits_a_64_gb_mac_only_through_adapters():
    config = load_config(ROOT / "configs/worker_9b.yaml")
    t = plan.table(config, plan.Setting(batch_size=1, max_seq_length=2048))
    full = plan.plan(config, plan.Setting(max_seq_length=2048))
    p = parameters(config)["total"]
    # fp32 master + gradient + two AdamW moments: 16 bytes a parameter before activations
    assert full["bytes"]["weights"] + full["bytes"]["gradients"] + full["bytes"]["optimizer"] == 16 * p
    assert full["peak"] > 128e9
    best = t["best"][64]
    assert best["setting"]["fine_tune"] != "full" and best["peak"] <= 0.75 * 64e9
    assert t["best"][16]["setting"]["fine_tune"] == "qlora4"  # only a 4-bit base fits 12 GB
    assert all(p["peak"] > 0.75 * 128e9 for p in t["plans"] if p["setting"]["fine_tune"] == "full"
               and p["setting"]["optimizer"] == "adamw")  # AdamW's update alone: 30 bytes/param


def test_qlora_base_bytes_count_scales_and_biases():
    config = load_config(ROOT / "configs/tiny.yaml")
    s = plan.Setting(fine_tune="qlora4", weight_dtype="float32", group_size=64)
    w = plan.weights_bytes(config, s)
    emb = config.vocab_size * config.hidden_size
    # the embedding alone: half a byte a weight + an fp32 scale and bias per 64 weights
    assert w["weights"] > emb * 0.5 + emb // 64 * 8
    assert w["trainable"] == config.num_hidden_layers * 8 * sum(
        r + c for name, (r, c, _) in plan.matrices(config).items() if name in plan.ADAPTED)


def test_cli_prints_the_table_and_the_best_setting(capsys):
    plan.main(["--config", str(ROOT / "configs/worker_9b.yaml"), "--max-seq-length", "2048"])
    out = capsys.readouterr().out
    assert "64 GB:" in out and "nothing fits" not in out.split("64 GB:")[1].splitlines()[0]
    assert "qlora4" in out


def plan_json(argv, capsys):
    plan.main(argv + ["--json"])
    return json.loads(capsys.readouterr().out)["plans"][0]["setting"]


def test_cli_plans_the_configs_batch_and_length_under_the_flags(capsys):
    tiny = str(ROOT / "configs/tiny.yaml")  # batch_size: 4, max_seq_length: 128
    s = plan_json(["--config", tiny], capsys)
    assert (s["batch_size"], s["max_seq_length"], s["grad_accumulation_steps"]) == (4, 128, 1)
    s = plan_json(["--config", tiny, "--batch-size", "2", "--max-seq-length", "64"], capsys)
    assert (s["batch_size"], s["max_seq_length"]) == (2, 64)


def test_cli_refuses_bad_settings_where_they_were_set(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs/tiny.yaml").read_text().replace("batch_size: 4", "batch_sise: 4"))
    line = config.read_text().splitlines().index("batch_sise: 4") + 1
    cases = [(["--rank", "0"], "--rank: must be an integer >= 1, got 0"),
             (["--batch-size", "-1", "--topk", "-5"], "--batch-size: must be an integer >= 1, got -1\n"
                                                       "  --topk: must be an integer >= 0, got -5"),
             ([], f"{config}:{line}: batch_sise: unknown run setting")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_:
            plan.main(["--config", str(config if not flags else ROOT / "configs/tiny.yaml")] + flags)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and message in err
