"""config.json in the shapes other tools write (mlx_student/hf_config.py): folders written by
transformers 5 (`save_pretrained`) and by mlx-lm, read as their writer meant them by every
reader (init_from, the student loader, the exporter's mirror, mlx_lm.load through the project),
or refused naming the file and the key."""

import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from conftest import save_tiny

from export import cli
from export.mirror import read_checkpoint
from mlx_student import hf_config, prune
from mlx_student import model as student_model
from mlx_student.config import ConfigError

IDS = [[1, 504, 2000, 77, 31, 9000, 12, 300]]
U16 = 2.0**-11


def hf_folder(path, tokenizer, **config):
    """A tiny llama written by transformers 5 itself (config.json, model.safetensors) plus the
    tokenizer; returns (folder, the transformers model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                      vocab_size=49152, max_position_embeddings=256, **config)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path, model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def edit_config(folder, **changes):
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    path.write_text(json.dumps(raw))


def test_transformers5_rope_parameters_give_their_own_theta_everywhere(tmp_path, tokenizer):
    folder, hf = hf_folder(tmp_path / "hf", tokenizer, rope_theta=500000.0)
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in raw and raw["rope_parameters"]["rope_theta"] == 500000.0
    assert raw["tie_word_embeddings"] is False
    assert hf_config.read_config(folder)["rope_theta"] == 500000.0
    assert prune.base_config(folder)["rope_theta"] == 500000.0  # init_from
    assert read_checkpoint(folder)[0].rope_theta == 500000.0  # the exporter's mirror
    model, _ = hf_config.load(folder)
    assert model.args.rope_theta == 500000.0 and not model.args.tie_word_embeddings
    with torch.no_grad():
        want = hf(torch.tensor(IDS)).logits.numpy()
    got = np.array(model(mx.array(IDS)))
    model.set_dtype(mx.float16)
    fp16 = rel(np.array(model(mx.array(IDS))), want)  # what fp16 rounding does to this model
    # fp32 vs fp32 within 1/8 of the model's fp16 error (the probe's error model)
    assert rel(got, want) < max(fp16, U16) / 8, (rel(got, want), fp16)
    wrong = mlx_lm.load(str(folder))[0]  # mlx-lm alone reads theta 10000: other logits
    assert wrong.args.rope_theta == 10000 and rel(np.array(wrong(mx.array(IDS))), want) > fp16


def test_rope_kinds_the_student_does_not_compute_are_refused(tmp_path, tokenizer):
    folder = save_tiny(tmp_path / "s", tokenizer)
    edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 8.0,
                                         "rope_theta": 100000.0})
    with pytest.raises(ConfigError, match=rf"{folder}/config.json: rope_parameters\.rope_type: "
                                          "'yarn' is not supported"):
        hf_config.read_config(folder)
    edit_config(folder, rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match=r"config.json: rope_scaling\.type: 'dynamic'"):
        prune.base_config(folder)
    edit_config(folder, rope_scaling=None, rope_theta=1e4,
                rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    with pytest.raises(ConfigError, match=r"rope_theta 10000.0 and rope_parameters.rope_theta "
                                          r"500000.0 differ"):
        hf_config.read_config(folder)


def test_rope_scaling_from_either_key_is_read_as_one_normalized_mapping(tmp_path, tokenizer):
    """transformers 5 puts llama3 scaling in rope_parameters; older folders in rope_scaling with
    `type`: both reach the student, the mirror and mlx-lm as the same normalized mapping."""
    folder = save_tiny(tmp_path / "s", tokenizer)
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    edit_config(folder, rope_theta=None, rope_scaling=None,
                rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **llama3})
    config = hf_config.read_config(folder)
    assert config["rope_theta"] == 5e5 and config["rope_scaling"] == {"rope_type": "llama3", **llama3}
    assert hf_config.mlx_overrides(config)["rope_scaling"] == config["rope_scaling"]
    assert read_checkpoint(folder)[0].rope_scaling == config["rope_scaling"]
    edit_config(folder, rope_parameters=None, rope_theta=1e4,
                rope_scaling={"type": "linear", "factor": 2.0})
    assert hf_config.read_config(folder)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert prune.base_config(folder)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_untied_config_without_lm_head_is_refused_by_export(tmp_path, tokenizer, capsys):
    folder = save_tiny(tmp_path / "s", tokenizer)  # tied: no lm_head.weight
    edit_config(folder, tie_word_embeddings=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(folder), "--out", str(tmp_path / "art"), "--no-parity"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"{folder}/config.json: tie_word_embeddings is false but the weights " \
           "(model.safetensors) hold no lm_head.weight" in err
    assert not (tmp_path / "art").exists()


def test_tied_folder_with_its_own_lm_head(tmp_path, tokenizer):
    """transformers writes lm_head.weight when untied; a tied config beside one that equals the
    embedding is tied; beside one that differs, refused; without the key, untied."""
    folder, hf = hf_folder(tmp_path / "hf", tokenizer)
    edit_config(folder, tie_word_embeddings=True)
    with pytest.raises(ConfigError, match=r"config.json: tie_word_embeddings is true but "
                                          r"model.safetensors holds an lm_head.weight that "
                                          "differs from model.embed_tokens.weight"):
        student_model.load(folder)
    edit_config(folder, tie_word_embeddings=None)  # absent: transformers' llama default, false
    model, _, config = student_model.load(folder)
    assert config.tie_word_embeddings is False and not model.args.tie_word_embeddings
    np.testing.assert_array_equal(np.array(model.lm_head.weight), hf.lm_head.weight.detach().numpy())
    same = tmp_path / "same"
    shutil.copytree(folder, same)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(same / "model.safetensors"), metadata={"format": "pt"})
    edit_config(same, tie_word_embeddings=True)
    assert hf_config.read_config(same)["tie_word_embeddings"] is True


def test_quantization_config_only_reads_as_mlx_lm_wrote_it(tmp_path, tokenizer):
    from mlx_lm.utils import quantize_model, save_config, save_model

    folder = save_tiny(tmp_path / "s", tokenizer)
    model, _ = hf_config.load(folder)
    config = json.loads((folder / "config.json").read_text())
    qmodel, qconfig = quantize_model(model, config, group_size=64, bits=4)
    assert qconfig["quantization"] == qconfig["quantization_config"]  # mlx-lm writes both
    q = tmp_path / "q"
    shutil.copytree(folder, q)
    save_model(q, qmodel)
    save_config({k: v for k, v in qconfig.items() if k != "quantization"}, q / "config.json")
    with pytest.raises(KeyError, match="quant_method"):  # mlx-lm alone: a bare KeyError
        mlx_lm.load(str(q))
    loaded, _ = hf_config.load(q)
    np.testing.assert_array_equal(np.array(loaded(mx.array(IDS))), np.array(qmodel(mx.array(IDS))))
    from runtime.generate import MLXEngine  # what mlx_student.serve and bench load with

    engine = MLXEngine.load(q)
    np.testing.assert_array_equal(np.array(engine(mx.array(IDS))), np.array(qmodel(mx.array(IDS))))
    edit_config(q, quantization_config={"quant_method": "hqq", "nbits": 4})
    with pytest.raises(ConfigError, match=r"config.json: quantization_config.quant_method: 'hqq' "
                                          "is not a format mlx-lm loads"):
        prune.base_config(q)
    edit_config(q, quantization_config={"weights": "int4"})
    with pytest.raises(ConfigError, match=r"quantization_config: no quant_method and no bits"):
        hf_config.load(q)


def test_missing_or_broken_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"{tmp_path}: not a model folder \(no config.json\)"):
        hf_config.read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n "hidden_size": }')
    with pytest.raises(ConfigError, match=r"config.json:2: invalid JSON: Expecting value"):
        hf_config.read_config(tmp_path)
