import dataclasses
from pathlib import Path

import pytest

from mlx_student.config import ConfigError, StudentConfig, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize(
    "name, role", [("worker_9b", "worker"), ("judge_4b", "judge"), ("drafter_4b", "drafter"),
                   ("pilot", "pilot"), ("tiny", "test")]
)
def test_shipped_configs_are_valid(name, role):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.role == role
    assert config.num_attention_heads % config.num_key_value_heads == 0


def test_worker_and_judge_contexts():
    assert load_config(CONFIGS / "worker_9b.yaml").contexts == [4096, 8192, 16384]
    worker = load_config(CONFIGS / "worker_9b.yaml")
    assert (worker.num_key_value_heads, worker.head_dim) == (8, 128)
    assert load_config(CONFIGS / "judge_4b.yaml").contexts == [512, 1024, 2048]


def write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_every_violation_is_listed_with_file_line_and_field(tmp_path):
    path = write(
        tmp_path,
        """# a comment
model:
  hidden_size: 100
  num_hidden_layers: 2
  intermediate_size: 20032
  num_attention_heads: 6
  num_key_value_heads: 4
  head_dim: 96
  vocab_size: 1000
  hiden: 3
  role: boss
""",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    expected = [
        f"{path}:3: model.hidden_size: 100 is not a multiple of 64",
        f"{path}:5: model.intermediate_size: gives an axis of 20032 > 16384, the ANE's limit",
        f"{path}:8: model.head_dim: 96 is not one of (64, 128)",
        f"{path}:7: model.num_key_value_heads: 6 attention heads are not divisible by 4 KV heads",
        f"{path}:10: model.hiden: unknown field",
        f"{path}:11: model.role: 'boss' is not one of",
    ]
    for line in expected:
        assert line in msg, (line, msg)
    assert "6 problems" in msg


def test_type_errors_and_missing_fields(tmp_path):
    path = write(
        tmp_path,
        "model:\n  hidden_size: big\n  num_hidden_layers: true\n  contexts: []\n  rms_norm_eps: -1\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:2: model.hidden_size: must be a positive integer, got 'big'" in msg
    assert f"{path}:3: model.num_hidden_layers: must be a positive integer, got True" in msg
    assert "model.contexts: must be a non-empty list of positive integers, got []" in msg
    assert "model.rms_norm_eps: must be a positive number, got -1" in msg
    for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert f"model.{name}: missing (required)" in msg


def test_context_rules(tmp_path):
    base = (CONFIGS / "tiny.yaml").read_text()
    text = base.replace("contexts: [128, 256]", "contexts: [256, 128, 32768]").replace(
        "prefill_lengths: [16, 32]", "prefill_lengths: [16, 512]"
    ) + "  max_position_embeddings: 1024\n"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert "model.contexts: [256, 128, 32768] must be strictly increasing" in msg
    assert "model.contexts: 32768 > 16384" in msg
    assert "model.max_position_embeddings: 1024 is below the largest context 32768" in msg
    assert "model.prefill_lengths: 512 exceeds the smallest context 128" in msg


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [1, 2\n", "invalid YAML"),
        ("- 1\n- 2\n", ":1: the file must hold a mapping, got list"),
        ("data: x\n", "no `model:` section"),
        ("model: 3\n", "model: must be a mapping of fields, got int"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.yaml'}: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_mlx_config_round_trip():
    config = load_config(CONFIGS / "pilot.yaml")
    d = config.to_mlx_config()
    assert d["model_type"] == "llama"
    assert d["rope_theta"] == d["rope_parameters"]["rope_theta"] == 100000.0
    assert d["student"] == {
        "role": "pilot",
        "contexts": [512, 1024],
        "prefill_lengths": [64, 128],
        "tokenizer": "models/smollm2-135m-instruct",
    }
    assert StudentConfig.from_mlx_config(d) == config
    assert dataclasses.asdict(StudentConfig.from_mlx_config(d)) == dataclasses.asdict(config)
