"""Importance of every layer, attention head, MLP neuron and hidden channel of an mlx-lm llama
from forward passes over calibration tokens: the activation-based estimates of Minitron
(Muralidharan et al. 2024, arXiv 2407.14679; Sreenivas et al. 2024, arXiv 2408.11796) that
mlx_student.prune cuts by. Depth: block importance, 1 - mean cos(layer input, layer output)
(ShortGPT, arXiv 2403.03853), and the teacher's KL when one layer alone is dropped; width: the
mean L2 norm of each head's output, mean |silu(gate) * up| per neuron and mean |RMSNorm output|
per hidden channel.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .losses import forward_kl


@dataclass
class Importance:
    """Per-unit importance of a base model over `tokens` calibration tokens: `block` and
    `drop_kl` (N,) per layer; `heads` (N, n_heads) mean L2 norm of each head's output;
    `neurons` (N, intermediate) mean |silu(gate) * up|; `hidden` (hidden,) mean |norm
    output| summed over the 2N + 1 RMSNorms."""

    block: np.ndarray
    drop_kl: np.ndarray
    heads: np.ndarray
    neurons: np.ndarray
    hidden: np.ndarray
    tokens: int
    drop_kl_tokens: int


def _attention(attn, x):
    """mlx_lm's llama Attention, returning also each head's output (B, H, L, head_dim)."""
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    o = mx.fast.scaled_dot_product_attention(attn.rope(q), attn.rope(k), v, scale=attn.scale,
                                             mask="causal")
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1)), o


def _logits(model, h):
    h = model.model.norm(h)
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def _run_from(model, h, start, skip=None):
    """Logits from the residual stream `h` entering layer `start`, layer `skip` left out."""
    for j in range(start, len(model.layers)):
        if j != skip:
            h = model.layers[j](h, "causal")
    return _logits(model, h)


def importance(model, batches, drop_kl_tokens, progress=True) -> Importance:
    """Importance of every layer, head, neuron and hidden channel of `model` (an
    mlx_lm llama.Model) over `batches` (int arrays (B, L)); the drop-one-layer KL over the
    first batches holding `drop_kl_tokens` tokens. Minitron's activation-based estimates."""
    layers = model.layers
    n = len(layers)
    sums = {"block": np.zeros(n), "drop_kl": np.zeros(n), "heads": None, "neurons": None,
            "hidden": 0.0}
    tokens = kl_tokens = 0
    bar = tqdm(total=len(batches), desc="importance", unit="batch", disable=not progress)
    for inputs in batches:
        inputs = mx.array(inputs)
        h = model.model.embed_tokens(inputs)
        count = inputs.size
        states, heads, neurons, hidden = [], [], [], 0
        for layer in layers:
            states.append(h)
            x = layer.input_layernorm(h)
            r, o = _attention(layer.self_attn, x)
            mid = h + r
            y = layer.post_attention_layernorm(mid)
            act = nn.silu(layer.mlp.gate_proj(y)) * layer.mlp.up_proj(y)
            out = mid + layer.mlp.down_proj(act)
            cos = (h * out).sum(-1) / mx.maximum(
                mx.linalg.norm(h, axis=-1) * mx.linalg.norm(out, axis=-1), 1e-12)
            heads.append(mx.linalg.norm(o, axis=-1).sum(axis=(0, 2)))
            neurons.append(mx.abs(act).sum(axis=(0, 1)))
            hidden = hidden + mx.abs(x).sum(axis=(0, 1)) + mx.abs(y).sum(axis=(0, 1))
            block = (1 - cos).sum()
            mx.eval(out, heads[-1], neurons[-1], hidden, block)
            sums["block"][len(states) - 1] += block.item()
            h = out
        hidden = hidden + mx.abs(model.model.norm(h)).sum(axis=(0, 1))
        heads, neurons = np.array(mx.stack(heads)), np.array(mx.stack(neurons))
        sums["heads"] = heads if sums["heads"] is None else sums["heads"] + heads
        sums["neurons"] = neurons if sums["neurons"] is None else sums["neurons"] + neurons
        sums["hidden"] = sums["hidden"] + np.array(hidden)
        if kl_tokens < drop_kl_tokens:
            teacher = _logits(model, h)
            mask = mx.ones(inputs.shape)
            for i in range(n):
                kl = forward_kl(_run_from(model, states[i], i, skip=i), teacher, mask)
                sums["drop_kl"][i] += kl.item() * count
            kl_tokens += count
        tokens += count
        bar.update(1)
    bar.close()
    return Importance(sums["block"] / tokens, sums["drop_kl"] / max(kl_tokens, 1),
                      sums["heads"] / tokens, sums["neurons"] / tokens,
                      sums["hidden"] / tokens, tokens, kl_tokens)
