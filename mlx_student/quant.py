"""Fake quantization for quantization-aware training (QAT), in the exporter's formats.

Weights (every linear of the layers; with `embeddings` the vocabulary table and LM head too):

  bits 8  symmetric per output channel: q in [-127, 127], one scale per row
  bits 4  symmetric per `group_size` inputs of a row: q in [-7, 7], one scale per group

Scales are fp16 values, as the CoreML package stores them, so the dequantized weight q * s is
exactly what the package computes (`scales` setting):

  minmax  the absmax observer of the current weights, s = fp16(max|w| / qmax): nothing clips
  lsq     learned (LSQ, Esser et al. 2020): a trainable scale per row / group, initialized to
          the minmax scale when QAT starts; weights beyond the grid's end clip and get no
          gradient. It is trained as its logarithm over `scale_lr` (`weight_log_scale`, as
          TQT, Jain et al. 2020, trains log2 thresholds), so an Adam step changes a scale by
          a relative amount about learning rate x scale_lr, whatever its magnitude

The forward pass sees the dequantized weight; the backward pass is the straight-through
estimator (the identity through rounding, zero where clipping says so). The fp32 master
weights are never replaced: `fake_quantize` maps a parameter tree (inside the loss, like a
compute-dtype cast), `fake_quantized(model, qat)` swaps the quantized values in for a block.

Activations (`activations: 8`, for W8A8 / W4A8 studies): the input of every quantized linear
is fake-quantized to int8, symmetric per tensor. An observer (`observer`: `minmax`, the
running max of |x|, or `ema`, its moving average with `ema_decay`) watches `observer_batches`
training batches when QAT starts, then its scale is frozen (`input_scale`, never trained).
The CoreML export keeps fp16 activations (activation quantization needs calibration by
prediction, which only macOS has); the study is MLX's.

The scales a checkpoint trained with go to `qat_scales.safetensors` beside its weights
(`scales()`), from which the exporter takes the very integers and scales (export/compress.py).
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDINGS = ("embed_tokens", "lm_head")
SCALES = ("minmax", "lsq")
OBSERVERS = ("minmax", "ema")
DEFAULTS = {"bits": 8, "group_size": 32, "embeddings": False, "start_step": 0,
            "scales": "minmax", "activations": 0, "observer": "minmax", "observer_batches": 8,
            "ema_decay": 0.9, "scale_lr": 30.0}
RECORDED = ("bits", "group_size", "embeddings", "scales", "activations")  # student.qat
SIDECAR = "qat_scales.safetensors"
WEIGHT_SCALE, LOG_SCALE, INPUT_SCALE = "weight_scale", "weight_log_scale", "input_scale"


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
    if qat["activations"] not in (0, 8):
        raise ValueError(f"qat.activations: {qat['activations']!r} is not 0 (off) or 8")
    for k, least in (("group_size", 1), ("start_step", 0), ("observer_batches", 1)):
        v = qat[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"qat.{k}: must be an integer >= {least}, got {v!r}")
    if not isinstance(qat["embeddings"], bool):
        raise ValueError(f"qat.embeddings: must be true or false, got {qat['embeddings']!r}")
    for k, known in (("scales", SCALES), ("observer", OBSERVERS)):
        if qat[k] not in known:
            raise ValueError(f"qat.{k}: {qat[k]!r} is not one of {', '.join(known)}")
    if not qat["scale_lr"] > 0:
        raise ValueError(f"qat.scale_lr: must be > 0, got {qat['scale_lr']!r}")
    if not 0 <= qat["ema_decay"] < 1:
        raise ValueError(f"qat.ema_decay: must be in [0, 1), got {qat['ema_decay']!r}")
    return qat


def _groups(w, bits, group_size):
    """w as (..., groups, group): one group per row (8 bits) or per `group_size` inputs."""
    n = w.shape[-1]
    g = n if bits == 8 else group_size
    if n % g:
        raise ValueError(f"QAT group size {g} does not divide the input width {n}")
    return w.reshape(*w.shape[:-1], n // g, g)


def _fp16(x):
    return x.astype(mx.float16).astype(mx.float32)


def _ste(value, x):
    """`value` forward, the gradient of `x` backward; both exact (x - x is 0)."""
    return mx.stop_gradient(value) + (x - mx.stop_gradient(x))


def minmax_scale(w, bits=8, group_size=32):
    """fp16(max|w_group| / qmax), shaped (..., groups); 1 for an all-zero group."""
    absmax = mx.max(mx.abs(_groups(w, bits, group_size)), axis=-1)
    scale = _fp16(absmax / (2 ** (bits - 1) - 1))
    return mx.where(scale > 0, scale, 1.0)


def quantize(w, bits=8, group_size=32, scale=None):
    """(integers as floats, shaped like w; the scales, (..., groups)). `scale` None: the
    minmax observer's."""
    qmax = 2 ** (bits - 1) - 1
    if scale is None:
        scale = minmax_scale(w, bits, group_size)
    q = mx.clip(mx.round(_groups(w, bits, group_size) / scale[..., None]), -qmax, qmax)
    return q.reshape(w.shape), scale


def dequantize(q, scale, bits=8, group_size=32):
    return (_groups(q, bits, group_size) * scale[..., None]).reshape(q.shape)


def fake_quant(w, bits=8, group_size=32):
    """Minmax scales: dequantize(quantize(w)) forward, the identity backward."""
    return _ste(dequantize(*quantize(w, bits, group_size), bits, group_size), w)


def lsq_fake_quant(w, log_scale, bits=8, group_size=32, scale_lr=1.0):
    """Learned scales s = exp(scale_lr * log_scale): q * fp16(s) forward, q = round(clip(w / s));
    backward LSQ's: dw is the identity where |w / s| < qmax and 0 where it clips; ds is
    q - w / s inside and q at the clip (d log_scale = scale_lr * s * ds)."""
    qmax = 2 ** (bits - 1) - 1
    wg = _groups(w, bits, group_size)
    scale = mx.exp(scale_lr * log_scale)
    s = _ste(_fp16(scale), scale)[..., None]
    x = mx.clip(wg / s, -qmax, qmax)
    q = _ste(mx.round(x), x)
    return (q * s).reshape(w.shape)


def act_fake_quant(x, scale, qmax=127):
    """Symmetric per-tensor activation fake-quant with a frozen scale: round(x / s) * s
    forward, clipped to +-qmax * s; the gradient is the identity inside, 0 where it clips."""
    lim = qmax * scale
    xc = mx.clip(x, -lim, lim)
    return _ste(mx.round(xc / scale) * scale, xc)


def quantized_path(path: str, embeddings: bool) -> bool:
    """Whether the parameter at `path` (e.g. model.layers.0.mlp.up_proj.weight) is quantized:
    every linear of the layers, and with `embeddings` the vocabulary table and LM head."""
    parts = path.split(".")
    names = LINEARS + (EMBEDDINGS if embeddings else ())
    return parts[-1] == "weight" and len(parts) > 1 and parts[-2] in names


def fake_quantize(params, qat):
    """The parameter tree with each quantized weight fake-quantized (differentiable): with
    its module's learned `weight_log_scale` when it has one, else minmax."""
    bits, group, emb = qat["bits"], qat["group_size"], qat["embeddings"]

    def walk(tree, path):
        if isinstance(tree, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(tree)]
        if not isinstance(tree, dict):
            return tree
        out = {k: walk(v, f"{path}.{k}" if path else k) for k, v in tree.items()}
        if "weight" in tree and quantized_path(f"{path}.weight", emb):
            s = tree.get(LOG_SCALE)
            w = tree["weight"]
            out["weight"] = (fake_quant(w, bits, group) if s is None
                             else lsq_fake_quant(w, s, bits, group, qat["scale_lr"]))
        return out

    return walk(params, "")


class ActQuantLinear(nn.Linear):
    """An nn.Linear (same parameter names) whose input is fake-quantized to int8 with its
    frozen `input_scale`. While `observer` is set, it reports its input instead."""

    def __init__(self, linear: nn.Linear, scale: float = 1.0):
        nn.Module.__init__(self)
        for k, v in linear.items():
            setattr(self, k, v)
        self.input_scale = mx.array(scale, mx.float32)
        self.freeze(keys=[INPUT_SCALE], recurse=False)
        self.observer = None

    def __call__(self, x):
        if self.observer is not None:
            self.observer(x)
        else:
            x = act_fake_quant(x, self.input_scale)
        return super().__call__(x)


def quantized_modules(model, qat):
    """[(path, module)] of the modules whose weight QAT quantizes."""
    names = LINEARS + (EMBEDDINGS if qat["embeddings"] else ())
    return [(p, m) for p, m in model.named_modules()
            if p.split(".")[-1] in names and "weight" in m]


def _replace(model, path, module):
    *parents, name = path.split(".")
    parent = model
    for p in parents:
        parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
    setattr(parent, name, module)


def observe(model, batches, qat):
    """Wrap each quantized linear as ActQuantLinear with the observer's frozen input scale,
    from its input over `batches` (the weights fake-quantized while it watches)."""
    seen = {}
    for path, m in quantized_modules(model, qat):
        if isinstance(m, nn.Linear) and not isinstance(m, ActQuantLinear):
            m = ActQuantLinear(m)
            _replace(model, path, m)
        if isinstance(m, ActQuantLinear):
            m.observer = lambda x, p=path: seen.setdefault(p, []).append(mx.max(mx.abs(x)))
    with fake_quantized(model, qat):
        for batch in batches:
            mx.eval(model(batch["inputs"]), seen)
    for path, m in quantized_modules(model, qat):
        if not isinstance(m, ActQuantLinear):
            continue
        values = [v.item() for v in seen[path]]
        absmax = values[0]
        for v in values[1:]:
            absmax = (max(absmax, v) if qat["observer"] == "minmax"
                      else qat["ema_decay"] * absmax + (1 - qat["ema_decay"]) * v)
        m.input_scale = mx.array(max(absmax, 1e-8) / 127, mx.float32)
        m.observer = None


def prepare(model, qat, batches):
    """At the start of the QAT phase: LSQ scales initialized to minmax, and with activation
    quantization the observers run over `batches()`; what a model already has (a resumed
    run) is kept. Returns whether anything new was added (the optimizer needs its state)."""
    added = False
    if qat["scales"] == "lsq":
        for _, m in quantized_modules(model, qat):
            if LOG_SCALE not in m:
                s = minmax_scale(m.weight, qat["bits"], qat["group_size"])
                m.weight_log_scale = mx.log(s) / qat["scale_lr"]
                added = True
    if qat["activations"] and not any(isinstance(m, ActQuantLinear) for _, m in model.named_modules()):
        observe(model, batches(), qat)
        added = True
    return added


def scales(model, qat) -> dict:
    """{'<module>.weight_scale': fp16 scales, '<module>.input_scale': ...} of every quantized
    module: what the checkpoint's qat_scales.safetensors holds."""
    out = {}
    for path, m in quantized_modules(model, qat):
        s = m.get(LOG_SCALE)
        s = minmax_scale(m.weight, qat["bits"], qat["group_size"]) if s is None else _fp16(mx.exp(qat["scale_lr"] * s))
        out[f"{path}.{WEIGHT_SCALE}"] = s.astype(mx.float16)
        if isinstance(m, ActQuantLinear):
            out[f"{path}.{INPUT_SCALE}"] = m.input_scale
    return out


def restore(model, qat, saved: dict):
    """Give a freshly built model the QAT state in `saved` (a trainer folder's scales() and
    weights): learned log scales, and activation quantizers with their frozen input scales."""
    for path, m in quantized_modules(model, qat):
        if qat["scales"] == "lsq" and f"{path}.{LOG_SCALE}" in saved:
            m.weight_log_scale = saved[f"{path}.{LOG_SCALE}"]
        if f"{path}.{INPUT_SCALE}" in saved:
            _replace(model, path, ActQuantLinear(m, saved[f"{path}.{INPUT_SCALE}"].item()))


@contextmanager
def fake_quantized(model, qat, bare=False):
    """Inside the block the model holds its fake-quantized weights (exactly on the grid);
    the fp32 masters are put back after. With `bare` the QAT parameters (scales) are also
    taken out for the block, leaving the parameters of a plain mlx-lm model (for saving).
    A no-op when `qat` is None."""
    if not qat:
        yield model
        return
    masters = model.parameters()
    model.update(fake_quantize(masters, qat))
    taken = []
    if bare:
        for _, m in model.named_modules():
            for k in (LOG_SCALE, INPUT_SCALE):
                if k in m:
                    taken.append((m, k, m[k]))
                    del m[k]
    mx.eval(model.parameters())
    try:
        yield model
    finally:
        for m, k, v in taken:
            m[k] = v
        model.update(masters)


def record(qat) -> dict:
    """The QAT block of a checkpoint's config.json `student` block."""
    return {k: qat[k] for k in RECORDED}
