"""Students from existing models, and parameter-efficient distillation with mlx-lm's own
LoRA / DoRA layers.

A run's settings (mlx_student.train) pick how the student starts and what it trains:

    init_from: models/llama-8b-mlx   # an mlx-lm llama folder (mlx_lm.convert output); its
                                     # config.json fills what `model:` leaves out, and its
                                     # tokenizer is the student's unless `model.tokenizer` says
    fine_tune_type: lora             # full | lora | dora
    num_layers: -1                   # the last N blocks get adapters (-1: all), as mlx_lm.lora
    lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0, keys: null}   # keys: e.g.
                                     # [self_attn.q_proj, self_attn.v_proj]; null: every linear
    quantize_base: {bits: 4, group_size: 64}   # QLoRA: the frozen base in mlx's affine format

A `model:` smaller than the base derives the student from it by mlx_student.prune's simplest
cut (`even+norm`): fewer layers keep evenly spaced blocks (the first and the last always),
narrower widths keep the leading hidden channels, the leading KV heads (each with its leading
query heads) and the MLP neurons with the largest |up row| x |down column|. Cuts chosen by
importance over calibration text: run mlx_student.prune first and start from its folder.
Without `init_from` the student is randomly initialized.

The frozen base needs no optimizer state and no fp32 master; only the adapters train. The
checkpoint's model folder is always written fused (`fused`): plain float llama weights, the
adapters folded in as mlx_lm.fuse --dequantize does, so mlx_lm.load and mlx_student.export
read it unchanged.
"""

from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model, load_model

from . import model as student_model
from . import prune
from .config import StudentConfig
from .hf_config import mlx_overrides, read_config

FINE_TUNE_TYPES = ("full", "lora", "dora")
LORA_DEFAULTS = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": None}
QUANT_DEFAULTS = {"bits": 4, "group_size": 64}


def lora_settings(value) -> dict:
    """`lora_parameters` with defaults filled in. Raises ValueError."""
    value = value or {}
    unknown = sorted(set(value) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"lora_parameters: unknown keys {unknown}; known: {list(LORA_DEFAULTS)}")
    lora = {**LORA_DEFAULTS, **value}
    if isinstance(lora["rank"], bool) or not isinstance(lora["rank"], int) or lora["rank"] < 1:
        raise ValueError(f"lora_parameters.rank: must be a positive integer, got {lora['rank']!r}")
    if not 0 <= lora["dropout"] < 1:
        raise ValueError(f"lora_parameters.dropout: must be in [0, 1), got {lora['dropout']!r}")
    return lora


def check_settings(args, config: StudentConfig):
    """The fine-tuning run settings, checked together. Raises ValueError naming the setting."""
    if args.fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"fine_tune_type: {args.fine_tune_type!r} is not one of {FINE_TUNE_TYPES}")
    args.lora_parameters = lora_settings(args.lora_parameters)
    if args.fine_tune_type == "full":
        if args.quantize_base:
            raise ValueError("quantize_base: a quantized base only trains through adapters; "
                             "set fine_tune_type: lora or dora (QLoRA)")
    elif args.qat:
        raise ValueError(f"qat: QAT trains the full weights; with fine_tune_type "
                         f"{args.fine_tune_type} fuse the adapters first, then run a full QAT phase")
    if not (args.num_layers == -1 or 0 < args.num_layers <= config.num_hidden_layers):
        raise ValueError(f"num_layers: {args.num_layers} must be -1 (all) or 1..{config.num_hidden_layers}")
    if args.quantize_base:
        q = {**QUANT_DEFAULTS, **args.quantize_base}
        if set(q) != set(QUANT_DEFAULTS) or q["bits"] not in (2, 3, 4, 5, 6, 8) or q["group_size"] not in (32, 64, 128):
            raise ValueError(f"quantize_base: expected {{bits: 2-8, group_size: 32|64|128}}, got {args.quantize_base!r}")
        widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim)
        if any(w % q["group_size"] for w in widths):
            raise ValueError(f"quantize_base.group_size {q['group_size']} does not divide the widths {widths}")
        args.quantize_base = q


def build_student(config: StudentConfig, args) -> nn.Module:
    """The model a run trains: random (seeded) or cut from `args.init_from`, the base
    quantized for QLoRA, adapters attached and the base frozen unless fine_tune_type is full."""
    if args.init_from:
        base, _ = load_model(Path(args.init_from), lazy=True,
                             model_config=mlx_overrides(read_config(args.init_from)))
        base = dequantize_model(base).parameters()
        base_cfg = StudentConfig(**prune.base_config(args.init_from))
        cut = prune.plan(config, base_cfg, "even", "norm", base)
        dtype = mx.float32 if args.fine_tune_type == "full" else None  # full: fp32 masters
        model = prune.build(config, cut, base, dtype)
    else:
        model = student_model.build(config, seed=args.seed)
    if args.fine_tune_type == "full":
        return model
    if args.quantize_base:
        nn.quantize(model, **args.quantize_base)
    model.freeze()
    linear_to_lora_layers(model, args.num_layers, args.lora_parameters,
                          use_dora=args.fine_tune_type == "dora")
    mx.eval(model.parameters())
    return model


@contextmanager
def fused(model: nn.Module):
    """Inside the block `model` holds plain float layers: each LoRA / DoRA layer fused as
    mlx_lm.fuse --dequantize does, each other quantized layer dequantized. The adapters and
    the quantized base are put back after. A no-op for a fully fine-tuned model."""
    adapters = [(n, m) for n, m in model.named_modules() if hasattr(m, "fuse")]
    inside = tuple(n + "." for n, _ in adapters)
    quantized = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and not n.startswith(inside)]
    if not adapters and not quantized:
        yield model
        return
    plain = [(n, m.fuse(dequantize=True)) for n, m in adapters]
    plain += [(n, _dequantized(m)) for n, m in quantized]
    model.update_modules(tree_unflatten(plain))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(adapters + quantized))


def _dequantized(m) -> nn.Module:
    w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, mode=m.mode)
    plain = nn.Embedding(*w.shape) if isinstance(m, nn.QuantizedEmbedding) else nn.Linear(*w.shape[::-1], bias=False)
    plain.weight = w
    return plain
