"""The student: mlx-lm's llama (GQA, RoPE, RMSNorm, SwiGLU, causal), built from a StudentConfig.

The model class IS mlx_lm.models.llama.Model, so a saved student is a plain mlx-lm model folder
(config.json with a `student` block, model.safetensors, tokenizer files) that mlx_lm.load,
mlx_lm.generate, mlx_lm.server and transformers' LlamaForCausalLM read unchanged.
"""

import math
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models import llama
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import save_config, save_model

from .config import StudentConfig
from .files import atomic_dir
from .hf_config import mlx_overrides, read_config

INIT_STD = 0.02
# Projections that write into the residual stream; scaled by 1/sqrt(2 * layers) at init.
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def model_args(config: StudentConfig) -> llama.ModelArgs:
    return llama.ModelArgs.from_dict(config.to_mlx_config())


def build(config: StudentConfig, seed: int = 0) -> llama.Model:
    """A freshly initialized fp32 student: N(0, 0.02) weights, residual outputs scaled down
    by 1/sqrt(2 * layers) (GPT-2), norms at one."""
    model = llama.Model(model_args(config))
    key = mx.random.key(seed)
    resid_std = INIT_STD / math.sqrt(2 * config.num_hidden_layers)
    n = len(tree_flatten(model.parameters()))
    keys = iter(mx.random.split(key, n))

    def init(path, w):
        k = next(keys)
        if path.endswith("norm.weight"):
            return mx.ones_like(w)
        std = resid_std if any(f"{r}." in path for r in RESIDUAL_OUTPUTS) else INIT_STD
        return std * mx.random.normal(w.shape, dtype=mx.float32, key=k)

    model.update(tree_map_with_path(init, model.parameters()))
    mx.eval(model.parameters())
    return model


def lm_head(model: nn.Module, hidden: mx.array) -> mx.array:
    """The LM head of an mlx-lm model whose logits are ``head(model.model(inputs))`` (llama,
    mistral, qwen2/3 ...): the tied embedding's ``as_linear`` or ``lm_head``.
    hidden (..., D) -> logits (..., V). Raises ValueError for a model without that layout."""
    args, body = getattr(model, "args", None), getattr(model, "model", None)
    if getattr(args, "tie_word_embeddings", False) and hasattr(body, "embed_tokens"):
        return body.embed_tokens.as_linear(hidden)
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    raise ValueError(f"{type(model).__module__}: no lm_head or tied embedding to take logits "
                     "at chosen positions with")


def logits_at(model: nn.Module, inputs: mx.array, positions=None) -> mx.array:
    """Logits of `inputs` (B, L): (B, L, V), or with `positions` (B, P) int32 only there,
    (B, P, V): the transformer runs over all L positions, the LM head (the largest matmul of
    a small model and the (B, ., V) tensors of the loss) over P."""
    if positions is None:
        return model(inputs)
    hidden = model.model(inputs)
    return lm_head(model, mx.take_along_axis(hidden, positions[..., None], axis=1))


def num_parameters(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def save(path, model: nn.Module, config: StudentConfig, tokenizer, keep=(), extra=None) -> Path:
    """Write an mlx-lm model folder at `path`, atomically (a crash leaves the old one).

    Files named in `keep` that the old folder has (e.g. a run's metrics) are carried over;
    `extra` {file name: {name: array}} adds safetensors files (e.g. QAT scales).
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_model(tmp, model)
        mlx_config = config.to_mlx_config()
        mlx_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        save_config(mlx_config, tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
        for name, arrays in (extra or {}).items():
            mx.save_safetensors(str(tmp / name), arrays)
        for name in keep:
            if (path / name).exists():
                shutil.copy2(path / name, tmp / name)
    return path


def load(path, lazy: bool = False):
    """Load a student folder. Returns (model, tokenizer, StudentConfig)."""
    config = read_config(path)
    model, tokenizer = mlx_lm_load(str(path), lazy=lazy, model_config=mlx_overrides(config))
    return model, tokenizer, StudentConfig.from_mlx_config(config)
