"""Weight fake-quantization for quantization-aware training (QAT), in the exporter's formats.

The formats are export/compress.py's, so the CoreML export of a QAT checkpoint re-derives the
very scales and integers the student trained with:

  bits 8  symmetric per output channel: scale = max|w_row| / 127, q in [-127, 127]
  bits 4  symmetric per `group_size` inputs of a row: scale = max|w_group| / 7, q in [-7, 7]

Scales come from a min/max observer (absmax), so nothing clips. The forward pass sees the
dequantized weight q * scale; the backward pass is the straight-through estimator,
w + stop_gradient(dequant(w) - w), an identity for the gradient. The fp32 master weights are
never replaced: `fake_quantize` maps a parameter tree (inside the loss, like a compute-dtype
cast), `fake_quantized(model, qat)` swaps the quantized values in for a block (evaluation,
saving) and puts the masters back.

    qat = qat_settings({"bits": 8, "start_step": 160})   # a run's `qat:` setting
    with fake_quantized(model, qat):
        save(model)                                       # weights exactly on the grid
"""

from contextlib import contextmanager

import mlx.core as mx
from mlx.utils import tree_map_with_path

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDINGS = ("embed_tokens", "lm_head")
DEFAULTS = {"bits": 8, "group_size": 32, "embeddings": False, "start_step": 0}
RECORDED = ("bits", "group_size", "embeddings")  # what config.json's student block keeps


def qat_settings(value):
    """A run's `qat:` mapping with defaults filled in (None: QAT off). Raises ValueError."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"qat: must be a mapping like {DEFAULTS} or null, got {value!r}")
    unknown = sorted(set(value) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"qat: unknown keys {unknown}; known: {list(DEFAULTS)}")
    qat = {**DEFAULTS, **value}
    if qat["bits"] not in (4, 8):
        raise ValueError(f"qat.bits: {qat['bits']!r} is not 4 or 8")
    for k, least in (("group_size", 1), ("start_step", 0)):
        v = qat[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"qat.{k}: must be an integer >= {least}, got {v!r}")
    if not isinstance(qat["embeddings"], bool):
        raise ValueError(f"qat.embeddings: must be true or false, got {qat['embeddings']!r}")
    return qat


def _groups(w, bits, group_size):
    """w as (..., groups, group): one group per row (8 bits) or per `group_size` inputs."""
    n = w.shape[-1]
    g = n if bits == 8 else group_size
    if n % g:
        raise ValueError(f"QAT group size {g} does not divide the input width {n}")
    return w.reshape(*w.shape[:-1], n // g, g)


def quantize(w, bits=8, group_size=32):
    """Symmetric absmax quantization: (integers as floats, shaped like w; scales, one per
    row (8 bits) or per group of a row (4 bits), shaped (..., groups))."""
    qmax = 2 ** (bits - 1) - 1
    wg = _groups(w, bits, group_size)
    absmax = mx.max(mx.abs(wg), axis=-1, keepdims=True)
    scale = mx.where(absmax > 0, absmax / qmax, 1.0)  # an all-zero group stays zero
    q = mx.clip(mx.round(wg / scale), -qmax, qmax)
    return q.reshape(w.shape), scale.squeeze(-1)


def dequantize(q, scale, bits=8, group_size=32):
    return (_groups(q, bits, group_size) * scale[..., None]).reshape(q.shape)


def fake_quant(w, bits=8, group_size=32):
    """The dequantized weight forward, the identity backward (straight-through estimator).
    The forward value is exactly dequantize(quantize(w)): w and it are within half a step,
    so the difference and the sum are exact in floating point (Sterbenz)."""
    wq = dequantize(*quantize(w, bits, group_size), bits, group_size)
    return w + mx.stop_gradient(wq - w)


def quantized_path(path: str, embeddings: bool) -> bool:
    """Whether the parameter at `path` (e.g. model.layers.0.mlp.up_proj.weight) is quantized:
    every linear of the layers, and with `embeddings` the vocabulary table and LM head."""
    parts = path.split(".")
    names = LINEARS + (EMBEDDINGS if embeddings else ())
    return parts[-1] == "weight" and len(parts) > 1 and parts[-2] in names


def fake_quantize(params, qat):
    """The parameter tree with each quantized weight through `fake_quant` (differentiable)."""
    bits, group, emb = qat["bits"], qat["group_size"], qat["embeddings"]
    return tree_map_with_path(
        lambda p, w: fake_quant(w, bits, group) if quantized_path(p, emb) else w, params)


@contextmanager
def fake_quantized(model, qat):
    """Inside the block the model holds its fake-quantized weights (exactly on the grid);
    the fp32 masters are put back after. A no-op when `qat` is None."""
    if not qat:
        yield model
        return
    masters = model.parameters()
    model.update(fake_quantize(masters, qat))
    mx.eval(model.parameters())
    try:
        yield model
    finally:
        model.update(masters)


def record(qat) -> dict:
    """The QAT block of a checkpoint's config.json `student` block."""
    return {k: qat[k] for k in RECORDED}
