"""Checkpoints that survive a kill at any instant.

A checkpoint is two folders, each replaced in one rename (mlx_student.files.atomic_dir):

    runs/<name>/           the model as an mlx-lm folder (what users load), plus the run's
                           metrics.jsonl, loss.png and kd.json (which KD mode ran, mlx_student.xtok)
    runs/<name>.trainer/   everything a resume needs: fp32 master weights, optimizer state
                           (with the LR-schedule position) and state.json (step, which is also
                           the data cursor and the RNG state, config, settings)

The trainer folder is written first and is self-sufficient, so a kill between the two writes
leaves a model folder one checkpoint behind and a resumable state; a kill inside either write
leaves the previous version of that folder.
"""

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from . import model as student_model
from . import quant
from .config import ConfigError
from .files import atomic_dir, recover
from .finetune import fused

RUN_FILES = ("metrics.jsonl", "loss.png", "kd.json")  # kept across model-folder replacements


def trainer_dir(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".trainer")


def save(out, model, config, tokenizer, optimizer, step, settings: dict, qat=None):
    """Write both folders. With `qat` (a QAT step) the model folder gets the fake-quantized
    weights, exactly on the grid the exporter uses, and records `student.qat`; the trainer
    folder always keeps the fp32 masters. Both get qat_scales.safetensors (quant.scales): the
    scales the exporter uses, and what a resume restores. Under LoRA / DoRA the trainer folder
    holds only the trainable (adapter) weights and the model folder the fused model
    (finetune.fused)."""
    with atomic_dir(trainer_dir(out)) as tmp:
        trainable = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(str(tmp / "weights.safetensors"), trainable)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        state = {"step": step, "config": dataclasses.asdict(config), "settings": settings}
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        extra = {}
        if qat:
            extra[quant.SIDECAR] = quant.scales(model, qat)
            mx.save_safetensors(str(tmp / quant.SIDECAR), extra[quant.SIDECAR])
    if qat:
        config = dataclasses.replace(config, qat=quant.record(qat))
    with quant.fake_quantized(model, qat, bare=True), fused(model):
        student_model.save(out, model, config, tokenizer, keep=RUN_FILES, extra=extra)


def load(out, model, optimizer, config) -> dict:
    """Restore model and optimizer from `out`'s trainer folder; return its state.json.

    The RNG needs no file: the trainer re-seeds it from (seed, step) at every step."""
    path = trainer_dir(out)
    recover(path)
    recover(out)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path}: no trainer state to resume from")
    state = json.loads((path / "state.json").read_text())
    if state["config"] != dataclasses.asdict(config):
        raise ConfigError(f"{path}: the checkpoint was trained with another model config")
    weights = mx.load(str(path / "weights.safetensors"))
    if (path / quant.SIDECAR).exists():  # a QAT run: its learned and frozen scales
        qat = quant.qat_settings(state["settings"]["qat"])
        quant.restore(model, qat, {**mx.load(str(path / quant.SIDECAR)), **weights})
    if set(weights) != {k for k, _ in tree_flatten(model.trainable_parameters())}:
        raise ConfigError(f"{path}: the checkpoint's trainable weights differ from the run's "
                          "(another fine_tune_type, num_layers or lora_parameters?)")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return state
