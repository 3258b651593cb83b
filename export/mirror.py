"""The PyTorch mirror: the student's llama re-materialized from its safetensors, in the layout
the ANE likes, with one static-shape module per exported function.

    mirror = load_mirror("runs/pilot")                    # fp32; no MLX imported
    fn = mirror.function(length=64, context=512)          # prefill chunk of 64 tokens
    logits, k, v = fn(ids, pos, k_cache, v_cache)         # explicit cache (ONNX, tests)
    fn = mirror.function(1, 512, stateful=True)           # decode, cache in fp16 buffers

Same math as mlx_lm.models.llama: GQA, non-traditional RoPE, RMSNorm, SwiGLU, causal mask.
Layout (docs/architecture.md ANE rule 7): activations are channels-first (1, C, 1, T) and
every projection is a 1x1 conv2d over (out, in, 1, 1) weights. It traces and converts
cleanly with coremltools 9 (every shape is a Python int fixed per function; tensor shapes are never read).
Measured on the tiny config: a function converts in ~2.5-5 s to ~230 non-const MIL ops (17
conv, 4 matmul), and with compute_precision fp16 no non-constant op produces fp32 (tests assert it).
The KV cache of all layers is one tensor per K and V, (layers, kv_heads, head_dim, context):
the new keys/values of a chunk are written along the last axis at `pos` without a transpose,
scores are q^T K and the output V p^T, both plain batched matmuls over the KV heads (GQA folds
the query heads of a group into the matmul rows, so the cache is never repeated).

The position `pos` (int32, shape (1,)) is an input; the RoPE angles come from fp16-safe cos/sin
tables gathered at pos + arange(T) (no fp16 angle arithmetic), and the causal mask is computed
in-graph: key j is visible to query i when j <= pos + i (int32 comparison), and the additive
mask (1 - visible) * MASK_VALUE is fp16 on device, built from scalars (no (T, S) constant).
The vocabulary lives in chunks of at most ANE_MAX_DIM rows, (n, C, 1, 1) each: the LM head is
one 1x1 conv per chunk, logits concatenated; the embedding is a gather per chunk, so a tied
table is one set of constants used by both. RMSNorm divides each token by its max |x| before
squaring, so no magnitude of the residual stream overflows its fp16 accumulator.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from mlx_student import rope
from mlx_student.config import ANE_MAX_DIM, StudentConfig
from mlx_student.hf_config import read_config, weight_files

NORM_MIN_SCALE = 2.0**-14  # fp16's smallest normal number: the RMSNorm's divisor floor
MASK_VALUE = -1e4  # additive mask; exp(-1e4 - max) is exactly 0 in fp16 and fp32
TAPS = ("residual", "norm_mean_square", "attention_logits", "swiglu_product", "logits")


class UnsupportedModel(ValueError):
    """A checkpoint the mirror cannot reproduce exactly (the message lists why)."""


def check_supported(raw: dict) -> list:
    """Problems that stop an exact mirror of an mlx-lm config.json, [] when none."""
    p = []
    if raw.get("model_type") != "llama":
        p.append(f"model_type {raw.get('model_type')!r}: only llama students are mirrored")
    for k in ("attention_bias", "mlp_bias", "rope_traditional"):
        if raw.get(k):
            p.append(f"{k}: true is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        p.append(f"hidden_act {raw['hidden_act']!r}: only silu (SwiGLU) is supported")
    if raw.get("quantization"):
        p.append("an mlx-quantized checkpoint: export from the fp32/bf16 weights")
    return p


def read_checkpoint(path):
    """(StudentConfig, {name: fp32 ndarray}) from an mlx-lm model folder, with safetensors and
    numpy only (no MLX). Reads model.safetensors or the shards listed in its index."""
    path = Path(path)
    raw = read_config(path)  # FolderConfigError names a foreign config.json's problem
    problems = check_supported(raw)
    if problems:
        raise UnsupportedModel(f"{path / 'config.json'}: cannot export: " + "; ".join(problems))
    config = StudentConfig.from_mlx_config(raw)
    weights = {}
    for f in weight_files(path):
        for k, v in load_file(str(f)).items():
            weights[k] = v.astype(np.float32)
    return config, weights


def vocab_chunks(vocab_size: int, max_rows: int = ANE_MAX_DIM) -> list:
    """Row counts of the vocabulary chunks: as equal as possible, each <= max_rows."""
    n = -(-vocab_size // max_rows)
    base, extra = divmod(vocab_size, n)
    return [base + (i < extra) for i in range(n)]


def _conv_weight(w: np.ndarray) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(w))[:, :, None, None],
                              requires_grad=False)


class Mirror(torch.nn.Module):
    """The student's weights, held once; `function(length, context)` builds static modules."""

    def __init__(self, config: StudentConfig, weights: dict, max_rows: int = ANE_MAX_DIM,
                 max_positions: int = None):
        super().__init__()
        c = self.config = config
        self.rows = vocab_chunks(c.vocab_size, max_rows)
        self.offsets = [sum(self.rows[:i]) for i in range(len(self.rows))]
        embed = weights["model.embed_tokens.weight"]
        head = embed if c.tie_word_embeddings else weights["lm_head.weight"]
        split = lambda w: torch.nn.ParameterList(  # noqa: E731
            [_conv_weight(w[o:o + n]) for o, n in zip(self.offsets, self.rows)])
        self.embed = split(embed)
        self.head = self.embed if c.tie_word_embeddings else split(head)
        names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
        self.layers = torch.nn.ModuleList()
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            layer = torch.nn.Module()
            for n in names:
                setattr(layer, n.split(".")[1], _conv_weight(weights[p + n + ".weight"]))
            for n in ("input_layernorm", "post_attention_layernorm"):
                setattr(layer, n, self._norm_weight(weights[p + n + ".weight"]))
            self.layers.append(layer)
        self.norm = self._norm_weight(weights["model.norm.weight"])
        # RoPE tables up to the largest context: (positions, head_dim / 2), as mlx-lm's RoPE
        # (with the config's rope_scaling: linear or llama3 frequencies, mlx_student.rope).
        inv = rope.inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        n = max_positions or max(c.contexts)
        ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
        self.register_buffer("cos", torch.from_numpy(np.cos(ang).astype(np.float32)))
        self.register_buffer("sin", torch.from_numpy(np.sin(ang).astype(np.float32)))
        self.taps = None  # a dict to record max |x| per tap (the fp16 audit), or None

    @staticmethod
    def _norm_weight(w):
        return torch.nn.Parameter(torch.from_numpy(w)[None, :, None, None], requires_grad=False)

    def cache_shape(self, context: int) -> tuple:
        c = self.config
        return (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, context)

    def function(self, length: int, context: int, stateful: bool = False,
                 all_logits: bool = False) -> "Function":
        return Function(self, length, context, stateful, all_logits)

    # --- the math -----------------------------------------------------------------------
    def _tap(self, name, x):
        if self.taps is not None:
            self.taps[name] = max(self.taps.get(name, 0.0), float(x.detach().abs().max()))

    def _rms_norm(self, x, w):
        """x / sqrt(mean(x^2) + eps) * w, in a form whose fp16 intermediates cannot overflow.

        Trained students grow "massive activations": the pilot's residual stream reaches
        |x| ~ 2.5e4, whose square overflows fp16 long before the mean is taken. Dividing by the
        token's max |x| first keeps every square in [0, 1]; eps moves in as (sqrt(eps) / s)^2,
        which neither overflows for tiny s nor matters for large s. Exact in real arithmetic:
        (x/s) / sqrt(mean((x/s)^2) + eps/s^2) = x / sqrt(mean(x^2) + eps).
        """
        C = self.config.hidden_size
        s = x.abs().amax(dim=1, keepdim=True).clamp_min(NORM_MIN_SCALE)
        xs = x / s
        ms = (xs * xs).sum(dim=1, keepdim=True) * (1.0 / C)  # in [1/C, 1]
        self._tap("norm_mean_square", ms)
        r = math.sqrt(self.config.rms_norm_eps) / s
        return xs * torch.rsqrt(ms + r * r) * w

    def _rope(self, x, cos, sin):
        """x (heads, head_dim, T); cos, sin (head_dim / 2, T); halves rotated (mlx non-trad)."""
        h = self.config.head_dim // 2
        x1, x2 = x[:, :h], x[:, h:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=1)

    def _embed(self, ids, T):
        out = None
        for w, off, n in zip(self.embed, self.offsets, self.rows):
            if len(self.rows) == 1:
                e = torch.index_select(w, 0, ids)
            else:
                local = ids - off
                inside = (local >= 0) & (local < n)
                e = torch.index_select(w, 0, torch.clamp(local, 0, n - 1))
                e = e * inside.to(e.dtype)[:, None, None, None]
            out = e if out is None else out + e
        # (T, C, 1, 1) -> (1, C, 1, T)
        return out.reshape(T, self.config.hidden_size).transpose(0, 1).reshape(
            1, self.config.hidden_size, 1, T)

    def forward_chunk(self, ids, pos, k_cache, v_cache, T: int, S: int, all_logits: bool):
        """ids (1, T) int32, pos (1,) int32; writes K/V at [pos, pos + T) of the (L, KVH, D, S)
        caches in place and returns logits (1, T or 1, vocab)."""
        c = self.config
        x = self.blocks(ids, pos, k_cache, v_cache, T, S)
        if not all_logits:
            x = x[:, :, :, T - 1:T]
            T = 1
        x = self._rms_norm(x, self.norm)
        logits = torch.cat([F.conv2d(x, w) for w in self.head], dim=1)  # (1, V, 1, T)
        self._tap("logits", logits)
        return logits.reshape(c.vocab_size, T).transpose(0, 1).reshape(1, T, c.vocab_size)

    def blocks(self, ids, pos, k_cache, v_cache, T: int, S: int):
        """The embedding and every layer: the residual stream (1, C, 1, T) before the final
        norm; K/V written at [pos, pos + T) of the caches in place."""
        c = self.config
        H, KVH, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        G = H // KVH
        cdt = k_cache.dtype
        start = pos
        if torch.compiler.is_exporting():  # torch.export (ONNX): bound the runtime position
            start = pos.item()
            torch._check(start >= 0)
            torch._check(start <= S - T)
        positions = pos + torch.arange(T, dtype=torch.int32)  # (T,)
        cos = torch.index_select(self.cos, 0, positions).transpose(0, 1)  # (D/2, T)
        sin = torch.index_select(self.sin, 0, positions).transpose(0, 1)
        keys = torch.arange(S, dtype=torch.int32)
        allowed = keys[None, :] <= positions[:, None]  # (T, S)
        x = self._embed(ids.reshape(T), T)
        # 0 where allowed, MASK_VALUE elsewhere; arithmetic on scalars, so no (T, S) constant
        mask = (1.0 - allowed.to(x.dtype)) * MASK_VALUE
        scale = D ** -0.5
        for i, lyr in enumerate(self.layers):
            h = self._rms_norm(x, lyr.input_layernorm)
            q = F.conv2d(h, lyr.q_proj).reshape(H, D, T)
            k = F.conv2d(h, lyr.k_proj).reshape(KVH, D, T)
            v = F.conv2d(h, lyr.v_proj).reshape(KVH, D, T)
            q = self._rope(q, cos, sin) * scale
            k = self._rope(k, cos, sin)
            k_cache[i, :, :, start:start + T] = k.to(cdt)
            v_cache[i, :, :, start:start + T] = v.to(cdt)
            K = k_cache[i].to(x.dtype)  # (KVH, D, S)
            V = v_cache[i].to(x.dtype)
            qg = q.reshape(KVH, G, D, T).permute(0, 1, 3, 2).reshape(KVH, G * T, D)
            scores = torch.matmul(qg, K)  # (KVH, G*T, S)
            self._tap("attention_logits", scores)
            scores = scores.reshape(KVH, G, T, S) + mask
            p = torch.softmax(scores, dim=-1).reshape(KVH, G * T, S)
            o = torch.matmul(V, p.transpose(1, 2))  # (KVH, D, G*T)
            o = o.reshape(KVH, D, G, T).permute(0, 2, 1, 3).reshape(1, H * D, 1, T)
            x = x + F.conv2d(o, lyr.o_proj)
            self._tap("residual", x)
            h = self._rms_norm(x, lyr.post_attention_layernorm)
            g = F.conv2d(h, lyr.gate_proj)
            u = F.conv2d(h, lyr.up_proj)
            m = F.silu(g) * u
            self._tap("swiglu_product", m)
            x = x + F.conv2d(m, lyr.down_proj)
            self._tap("residual", x)
        return x


class Function(torch.nn.Module):
    """One exported function: `length` tokens at `pos` against a `context`-long KV cache.

    stateful=False: forward(ids, pos, k_cache, v_cache) -> (logits, k_cache', v_cache'), the
    caches updated functionally (ONNX, tests). stateful=True: the caches are fp16 buffers named
    k_cache / v_cache (coremltools StateType) and forward(ids, pos) -> logits.
    """

    def __init__(self, mirror: Mirror, length: int, context: int, stateful: bool = False,
                 all_logits: bool = False):
        super().__init__()
        self.mirror, self.length, self.context = mirror, length, context
        self.stateful, self.all_logits = stateful, all_logits
        if stateful:
            shape = mirror.cache_shape(context)
            self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, ids, pos, k_cache=None, v_cache=None):
        if self.stateful:
            return self.mirror.forward_chunk(ids, pos, self.k_cache, self.v_cache,
                                             self.length, self.context, self.all_logits)
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
        logits = self.mirror.forward_chunk(ids, pos, k_cache, v_cache, self.length,
                                           self.context, self.all_logits)
        return logits, k_cache, v_cache


def load_mirror(path, max_rows: int = ANE_MAX_DIM, max_positions: int = None) -> Mirror:
    """The fp32 mirror of the student folder at `path` (RoPE tables for `max_positions`,
    by default the largest context of its config)."""
    config, weights = read_checkpoint(path)
    return Mirror(config, weights, max_rows, max_positions).eval()


def example_inputs(length: int, pos: int = 0):
    """(input_ids (1, length) int32, position (1,) int32) to trace a function with."""
    return torch.zeros((1, length), dtype=torch.int32), torch.tensor([pos], dtype=torch.int32)
