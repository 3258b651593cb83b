"""Students from existing models and parameter-efficient distillation (mlx_student.finetune):
mlx-lm's own LoRA / DoRA layers, QLoRA on a quantized base, fused checkpoints that mlx_lm
loads and mlx_student exports, and resume."""

import json
from types import SimpleNamespace

import mlx.core as mx
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from conftest import ROOT, train_argv
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from export import cli, probe
from mlx_student import checkpoint, finetune, prune, train
from mlx_student import model as student_model
from mlx_student.config import ConfigError, StudentConfig, load_config
from mlx_student.data import load_dataset
from mlx_student.trainer import TrainingArgs
from mlx_student.trainer import train as train_loop

NORM_SCALE = 4.0  # a peaked head, like a trained model's (see tests/test_probe.py)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny student saved as an mlx-lm folder: the model the adapters train on."""
    config = load_config(ROOT / "configs/tiny.yaml")
    config.contexts, config.prefill_lengths = [128], [16]
    model = student_model.build(config, seed=3)
    model.model.norm.weight = model.model.norm.weight * NORM_SCALE
    mx.eval(model.parameters())
    return student_model.save(tmp_path_factory.mktemp("base") / "tiny", model, config, tokenizer)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_kd_lowers_the_loss_and_the_fused_folder_loads_exports_and_probes(tmp_path, base, kd_data):
    argv = train_argv(tmp_path, kd_data, "--iters", "10", "--init-from", str(base), "--fine-tune-type",
                      "lora", "--steps-per-eval", "100", loss={"topk_kd": 1.0})
    train.main(argv)
    out = tmp_path / "student"
    kd = [r["topk_kd"] for r in metrics(out)]
    assert np.mean(kd[-3:]) < kd[0] - 0.05, kd
    adapters = mx.load(str(checkpoint.trainer_dir(out) / "weights.safetensors"))
    assert adapters and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in adapters)

    # the fused folder = the base with mlx-lm's LoRA layers and the trained adapters
    ids = mx.array([[1, 504, 2000, 77, 31, 9000, 12]])
    fused, _ = mlx_lm.load(str(out))
    ref, _ = mlx_lm.load(str(base))
    linear_to_lora_layers(ref, -1, finetune.lora_settings({}))
    ref.load_weights(list(adapters.items()), strict=False)
    want = np.array(ref(ids), np.float64)
    rel = lambda x: np.linalg.norm(np.array(x, np.float64) - want) / np.linalg.norm(want)  # noqa
    # fp32 vs fp32 (folded W + s B A vs the LoRA layers), bounded by the probe's error model:
    # below 1/8 of what fp16 rounding does to this model (export/probe.py, mirror_err_ratio)
    fused_err = rel(fused(ids))
    ref.set_dtype(mx.float16)
    assert fused_err < max(rel(ref(ids)), probe.FP16_UNIT_ROUNDOFF) * probe.COMMON_GATES[
        "mirror_err_ratio"], fused_err
    assert not np.allclose(np.array(fused(ids)), np.array(mlx_lm.load(str(base))[0](ids)), atol=1e-3)

    art = tmp_path / "art"
    cli.main(["--model", str(out), "--out", str(art), "--weights", "fp16", "--embedding", "fp16",
              "--contexts", "128", "--prefill-lengths", "16", "--calibration-tokens", "64"])
    probe.main(["--model", str(out), "--package", str(art / "model.mlpackage"), "--out",
                str(tmp_path / "probe"), "--windows", "2"])  # exits 1 on a failed gate
    report = json.loads((tmp_path / "probe" / "probe_report.json").read_text())
    assert report["ok"] and report["end_to_end"]["coreml_vs_mlx"]["top1"] >= 0.99, report["gates"]


def test_qlora_base_stays_frozen_and_adapters_train(base, kd_data, tokenizer):
    config = load_config(ROOT / "configs/tiny.yaml")
    args = SimpleNamespace(init_from=str(base), fine_tune_type="lora", num_layers=-1, qat=None,
                           lora_parameters={"rank": 4, "keys": ["self_attn.q_proj", "mlp.down_proj"]},
                           quantize_base={"bits": 4}, seed=0)
    finetune.check_settings(args, config)
    model = finetune.build_student(config, args)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert any(k.endswith("q_proj.linear.scales") for k in before)  # a quantized base
    assert all(".q_proj." in k or ".down_proj." in k for k in trainable)
    splits = load_dataset(kd_data, tokenizer, config.vocab_size, 64)
    targs = TrainingArgs(batch_size=4, iters=2, max_seq_length=64, steps_per_eval=100,
                         loss={"topk_kd": 1.0})
    train_loop(model, optim.AdamW(learning_rate=1e-2), splits["train"].examples, None, targs)
    after = dict(tree_flatten(model.parameters()))
    for k, v in before.items():
        assert np.array_equal(v, np.array(after[k])) == (k not in trainable), k  # frozen == same
    with finetune.fused(model):  # plain float layers, adapters folded in
        assert not any("lora" in k or "scales" in k for k, _ in tree_flatten(model.parameters()))
    assert any("lora_b" in k for k, _ in tree_flatten(model.parameters()))  # put back


def test_lora_resume_gives_the_uninterrupted_losses(tmp_path, base, kd_data, monkeypatch):
    flags = ("--iters", "4", "--init-from", str(base), "--fine-tune-type", "dora", "--steps-per-save", "2")
    train.main(train_argv(tmp_path / "whole", kd_data, *flags, loss={"topk_kd": 1.0}))

    save = checkpoint.save

    class Killed(Exception):
        pass

    def save_then_die(out, model, config, tokenizer, optimizer, step, *a, **k):
        save(out, model, config, tokenizer, optimizer, step, *a, **k)
        if step == 2:
            raise Killed

    argv = train_argv(tmp_path / "cut", kd_data, *flags, loss={"topk_kd": 1.0})
    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        train.main(argv)
    monkeypatch.setattr(checkpoint, "save", save)
    train.main(argv + ["--resume"])
    cut, whole = metrics(tmp_path / "cut" / "student"), metrics(tmp_path / "whole" / "student")
    assert [r["step"] for r in cut] == list(range(1, 5))
    np.testing.assert_allclose([r["loss"] for r in cut], [r["loss"] for r in whole], rtol=1e-6)


def test_student_cut_from_a_larger_base_keeps_its_layers_heads_and_tokenizer(teacher_dir, tmp_path):
    (tmp_path / "cut.yaml").write_text(
        "model:\n  role: test\n  num_hidden_layers: 3\n  hidden_size: 512\n  intermediate_size: 1024\n"
        "  num_attention_heads: 4\n  num_key_value_heads: 2\n  contexts: [128]\n  prefill_lengths: [16]\n")
    values = prune.base_config(teacher_dir)
    config = load_config(tmp_path / "cut.yaml", values)
    assert config.tokenizer == str(teacher_dir) and config.vocab_size == 49152
    args = SimpleNamespace(init_from=str(teacher_dir), fine_tune_type="full", seed=0)
    model = finetune.build_student(config, args)
    base, _ = mlx_lm.load(str(teacher_dir))
    layers = prune.keep_layers(30, 3)
    assert layers == [0, 14, 29]
    for mine, theirs in zip(model.model.layers, (base.model.layers[i] for i in layers)):
        q = np.array(theirs.self_attn.q_proj.weight)
        # KV heads 0 and 1, each with its first two query heads (the base groups 3 per KV head)
        rows = np.concatenate([np.arange(h * 64, h * 64 + 64) for h in (0, 1, 3, 4)])
        np.testing.assert_array_equal(np.array(mine.self_attn.q_proj.weight), q[rows][:, :512])
        np.testing.assert_array_equal(np.array(mine.self_attn.k_proj.weight),
                                      np.array(theirs.self_attn.k_proj.weight)[:128, :512])
        up, down = np.array(theirs.mlp.up_proj.weight), np.array(theirs.mlp.down_proj.weight)
        keep = np.sort(np.argsort(-np.linalg.norm(up, axis=1) * np.linalg.norm(down, axis=0))[:1024])
        np.testing.assert_array_equal(np.array(mine.mlp.down_proj.weight), down[:512][:, keep])
    assert model.model.embed_tokens.weight.dtype == mx.float32  # fp32 masters for full training


def test_bad_settings_name_the_setting(tmp_path, teacher_dir):
    config = load_config(ROOT / "configs/tiny.yaml")
    bad = [({"fine_tune_type": "ia3"}, "fine_tune_type"),
           ({"quantize_base": {"bits": 4}}, "quantize_base"),
           ({"fine_tune_type": "lora", "qat": {"bits": 8}}, "qat"),
           ({"fine_tune_type": "lora", "lora_parameters": {"alpha": 16}}, "lora_parameters"),
           ({"fine_tune_type": "lora", "num_layers": 9}, "num_layers")]
    for change, name in bad:
        args = SimpleNamespace(**{"fine_tune_type": "full", "lora_parameters": None, "quantize_base": None,
                                  "qat": None, "num_layers": -1, **change})
        with pytest.raises(ValueError, match=name):
            finetune.check_settings(args, config)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(ConfigError, match="only llama"):
        prune.base_config(tmp_path)
    big = StudentConfig(**{**prune.base_config(teacher_dir), "num_hidden_layers": 40})
    with pytest.raises(ConfigError, match="more than the base's 30"):
        finetune.build_student(big, SimpleNamespace(init_from=str(teacher_dir), fine_tune_type="full", seed=0))
