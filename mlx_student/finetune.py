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

A `model:` smaller than the base derives the student from it: fewer layers keep evenly spaced
blocks (the first and the last always), narrower widths keep the leading hidden channels, the
leading KV heads (each with its leading query heads) and the MLP neurons with the largest
|up row| x |down column|. Without `init_from` the student is randomly initialized.

The frozen base needs no optimizer state and no fp32 master; only the adapters train. The
checkpoint's model folder is always written fused (`fused`): plain float llama weights, the
adapters folded in as mlx_lm.fuse --dequantize does, so mlx_lm.load and mlx_student.export
read it unchanged.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model, load_model

from . import model as student_model
from . import rope
from .config import ConfigError, StudentConfig

FINE_TUNE_TYPES = ("full", "lora", "dora")
LORA_DEFAULTS = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": None}
QUANT_DEFAULTS = {"bits": 4, "group_size": 64}
# config.json fields of a base that our llama cannot represent: refuse rather than drop them.
UNSUPPORTED = {"attention_bias": False, "mlp_bias": False}


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


def base_config(folder) -> dict:
    """The `model:` fields of an mlx-lm llama folder, its tokenizer the student's default."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"init_from: {path}: cannot read: {e.strerror}") from None
    if raw.get("model_type") != "llama":
        raise ConfigError(f"{path}: model_type {raw.get('model_type')!r}: only llama bases map onto "
                          "the student (mlx_lm.models.llama)")
    for key, ok in UNSUPPORTED.items():
        if raw.get(key, ok) != ok:
            raise ConfigError(f"{path}: {key} {raw[key]!r} is not supported by the student's llama")
    problems = rope.check(raw.get("rope_scaling"))
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(f"{k}: {p}" for k, p in problems))
    values = StudentConfig.from_mlx_config(raw).__dict__.copy()
    values.pop("qat")
    values["tokenizer"] = values["tokenizer"] or str(folder)
    if "head_dim" not in raw:
        values["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
    return values


def keep_layers(n_base: int, n: int) -> list:
    """`n` of `n_base` blocks, evenly spaced, the first and the last always kept."""
    if n > n_base:
        raise ConfigError(f"model.num_hidden_layers: {n} is more than the base's {n_base}")
    return np.round(np.linspace(0, n_base - 1, n)).astype(int).tolist() if n > 1 else [n_base - 1]


def _select(c: StudentConfig, b: StudentConfig, layer: dict):
    """Index arrays picking the student's widths out of the base's for one layer."""
    if c.head_dim != b.head_dim:
        raise ConfigError(f"model.head_dim: {c.head_dim} differs from the base's {b.head_dim}")
    if c.num_key_value_heads > b.num_key_value_heads or c.num_attention_heads > b.num_attention_heads:
        raise ConfigError("model.num_attention_heads / num_key_value_heads: more heads than the base")
    d, group = c.head_dim, b.num_attention_heads // b.num_key_value_heads
    per_kv = c.num_attention_heads // c.num_key_value_heads
    if per_kv > group:
        raise ConfigError(f"model: {per_kv} query heads per KV head; the base has {group}")
    q_heads = [kv * group + j for kv in range(c.num_key_value_heads) for j in range(per_kv)]
    q = np.concatenate([np.arange(h * d, (h + 1) * d) for h in q_heads])
    kv = np.arange(c.num_key_value_heads * d)
    mlp = layer["mlp"]
    score = mx.linalg.norm(mlp["up_proj"]["weight"], axis=1) * mx.linalg.norm(mlp["down_proj"]["weight"], axis=0)
    neurons = np.sort(np.argsort(-np.array(score.astype(mx.float32)))[: c.intermediate_size])
    return mx.array(q), mx.array(kv), mx.array(neurons)


def _derive(c: StudentConfig, b: StudentConfig, base: dict) -> dict:
    """The student's weights cut out of the base's parameter tree."""
    if c.vocab_size != b.vocab_size:
        raise ConfigError(f"model.vocab_size: {c.vocab_size} differs from the base's {b.vocab_size}")
    if c.hidden_size > b.hidden_size or c.intermediate_size > b.intermediate_size:
        raise ConfigError("model.hidden_size / intermediate_size: wider than the base")
    h = c.hidden_size
    layers = [base["model"]["layers"][i] for i in keep_layers(b.num_hidden_layers, c.num_hidden_layers)]
    out_layers = []
    for layer in layers:
        q, kv, neurons = _select(c, b, layer)
        a, m = layer["self_attn"], layer["mlp"]
        out_layers.append({
            "self_attn": {"q_proj": {"weight": a["q_proj"]["weight"][q][:, :h]},
                          "k_proj": {"weight": a["k_proj"]["weight"][kv][:, :h]},
                          "v_proj": {"weight": a["v_proj"]["weight"][kv][:, :h]},
                          "o_proj": {"weight": a["o_proj"]["weight"][:h][:, q]}},
            "mlp": {"gate_proj": {"weight": m["gate_proj"]["weight"][neurons][:, :h]},
                    "up_proj": {"weight": m["up_proj"]["weight"][neurons][:, :h]},
                    "down_proj": {"weight": m["down_proj"]["weight"][:h][:, neurons]}},
            "input_layernorm": {"weight": layer["input_layernorm"]["weight"][:h]},
            "post_attention_layernorm": {"weight": layer["post_attention_layernorm"]["weight"][:h]},
        })
    out = {"model": {"embed_tokens": {"weight": base["model"]["embed_tokens"]["weight"][:, :h]},
                     "layers": out_layers, "norm": {"weight": base["model"]["norm"]["weight"][:h]}}}
    if not c.tie_word_embeddings:
        head = base["lm_head"] if "lm_head" in base else base["model"]["embed_tokens"]
        out["lm_head"] = {"weight": head["weight"][:, :h]}
    return out


def build_student(config: StudentConfig, args) -> nn.Module:
    """The model a run trains: random (seeded) or cut from `args.init_from`, the base
    quantized for QLoRA, adapters attached and the base frozen unless fine_tune_type is full."""
    if args.init_from:
        base, _ = load_model(Path(args.init_from), lazy=True)
        base = dequantize_model(base)
        weights = _derive(config, StudentConfig(**base_config(args.init_from)), base.parameters())
        dtype = mx.float32 if args.fine_tune_type == "full" else None  # full: fp32 masters
        weights = tree_flatten(weights)
        model = llama.Model(student_model.model_args(config))
        model.load_weights([(k, v.astype(dtype or v.dtype)) for k, v in weights])
        mx.eval(model.parameters())
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
