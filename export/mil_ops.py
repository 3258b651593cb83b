"""numpy semantics of the MIL ops (coremltools' opsets iOS15..iOS18) for export/mil_executor.py.

Each op is a plain function `fn(op, **inputs)`: `op` is the loaded `mil_executor.Op` (its declared
output types, its opset), `inputs` are the op's parameters by their MIL names as numpy values
(a tuple input such as concat's `values` is a list; an optional input left out is absent).
Floating inputs arrive as float32 (the executor widens fp16 for compute) and the executor casts
every result to the op's declared output type, so an fp16 result is rounded (and overflows to inf)
there, once per op. Parameter names, defaults and broadcasting follow coremltools' op definitions
(coremltools/converters/mil/mil/ops/defs/iOS1x); the semantics are written here, not borrowed.
The constexpr (weight decompression) ops live with the loader in mil_executor.py.
"""

import math

import numpy as np

OPS = {}


def op(*names):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _axes(axes, rank):
    return None if axes is None else tuple(int(a) % rank for a in np.atleast_1d(axes))


def _b(x, default=False):
    return default if x is None else bool(x)


# ---------------------------------------------------------------- elementwise binary (broadcast)
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum,
    "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod, "pow": np.power,
    "equal": np.equal, "not_equal": np.not_equal, "greater": np.greater,
    "greater_equal": np.greater_equal, "less": np.less, "less_equal": np.less_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    OPS[_name] = (lambda f: lambda op, x, y: f(x, y))(_fn)


@op("real_div")
def real_div(op, x, y):
    if np.issubdtype(np.asarray(x).dtype, np.integer) and np.issubdtype(np.asarray(y).dtype, np.integer):
        return np.trunc(np.true_divide(x, y))  # integer real_div truncates, as CoreML's int path
    return np.true_divide(x, y)


# ---------------------------------------------------------------- elementwise unary
_UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2,
    "floor": np.floor, "logical_not": np.logical_not, "round": np.round, "sign": np.sign,
    "sin": np.sin, "sinh": np.sinh, "sqrt": np.sqrt, "square": np.square, "tan": np.tan,
    "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0), "identity": lambda x: np.array(x),
    "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "silu": lambda x: x / (1 + np.exp(-x)), "softsign": lambda x: x / (1 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(0, x),
}
for _name, _fn in _UNARY.items():
    OPS[_name] = (lambda f: lambda op, x: f(x))(_fn)

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x):
    return _erf(np.asarray(x, np.float64)).astype(np.float64)


OPS["erf"] = lambda op, x: erf(x)
OPS["rsqrt"] = lambda op, x, epsilon=1e-12: 1 / np.sqrt(x + epsilon)
OPS["inverse"] = lambda op, x, epsilon=1e-4: 1 / (x + epsilon)
OPS["log"] = lambda op, x, epsilon=1e-45: np.log(x + epsilon)
OPS["clip"] = lambda op, x, alpha, beta: np.minimum(np.maximum(x, alpha), beta)
OPS["threshold"] = lambda op, x, alpha: np.maximum(x, alpha)
OPS["leaky_relu"] = lambda op, x, alpha=0.01: np.where(x >= 0, x, alpha * x)
OPS["elu"] = lambda op, x, alpha=1.0: np.where(x > 0, x, alpha * (np.exp(x) - 1))
OPS["linear_activation"] = lambda op, x, alpha=1.0, beta=0.0: alpha * x + beta
OPS["scaled_tanh"] = lambda op, x, alpha=1.0, beta=1.0: alpha * np.tanh(beta * x)
OPS["sigmoid_hard"] = lambda op, x, alpha=0.2, beta=0.5: np.clip(alpha * x + beta, 0, 1)
OPS["thresholded_relu"] = lambda op, x, alpha=1.0: np.where(x > alpha, x, 0)
OPS["clamped_relu"] = lambda op, x, alpha=0.0, beta=6.0: np.minimum(np.where(x >= 0, x, alpha * x), beta)
OPS["prelu"] = lambda op, x, alpha: np.where(x >= 0, x, x * alpha.reshape((1, -1) + (1,) * (x.ndim - 2)))


@op("gelu")
def gelu(op, x, mode="EXACT"):
    mode = str(mode)
    if mode == "EXACT":
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    raise NotImplementedError(f"gelu mode {mode}")


@op("softmax")
def softmax(op, x, axis=-1):
    e = np.exp(x - np.max(x, axis=int(axis), keepdims=True))
    return e / np.sum(e, axis=int(axis), keepdims=True)


@op("cast")
def cast(op, x, dtype):
    return x  # the executor casts to the declared output type (fp16 rounding, int truncation)


@op("select")
def select(op, cond, a, b):
    return np.where(cond, a, b)


# ---------------------------------------------------------------- reductions
def _reduce(fn):
    def run(op, x, axes=None, keep_dims=False):
        return fn(x, axis=_axes(axes, x.ndim), keepdims=_b(keep_dims))
    return run


_REDUCE = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: _logsumexp(x, axis, keepdims),
}
for _name, _fn in _REDUCE.items():
    OPS[_name] = _reduce(_fn)


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


@op("reduce_argmax", "reduce_argmin")
def reduce_arg(op, x, axis=-1, keep_dims=False, output_dtype=None):
    fn = np.argmax if op.type == "reduce_argmax" else np.argmin
    return fn(x, axis=int(axis), keepdims=_b(keep_dims))


# ---------------------------------------------------------------- linear algebra
@op("matmul")
def matmul(op, x, y, transpose_x=False, transpose_y=False):
    if _b(transpose_x) and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if _b(transpose_y) and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("linear")
def linear(op, x, weight, bias=None):
    out = np.matmul(x, weight.T)
    return out if bias is None else out + bias


@op("einsum")
def einsum(op, values, equation):
    return np.einsum(str(equation), *values)


@op("conv")
def conv(op, x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None,
         groups=1):
    """N-d convolution, x (N, C_in, *spatial), weight (C_out, C_in / groups, *kernel)."""
    nd = x.ndim - 2
    strides = [1] * nd if strides is None else [int(s) for s in strides]
    dilations = [1] * nd if dilations is None else [int(d) for d in dilations]
    kernel = weight.shape[2:]
    pad_type = str(pad_type)
    if pad_type == "custom":
        p = [int(v) for v in pad]
        pads = [(p[2 * i], p[2 * i + 1]) for i in range(nd)]
    elif pad_type == "valid":
        pads = [(0, 0)] * nd
    elif pad_type in ("same", "same_lower"):
        pads = []
        for i in range(nd):
            out = -(-x.shape[2 + i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x.shape[2 + i], 0)
            lo = total // 2 if pad_type == "same" else total - total // 2
            pads.append((lo, total - lo))
    else:
        raise NotImplementedError(f"conv pad_type {pad_type}")
    x = np.pad(x, [(0, 0), (0, 0)] + pads)
    groups = int(groups)
    n, cin = x.shape[:2]
    cout = weight.shape[0]
    out_sp = [(x.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(nd)]
    xg = x.reshape(n, groups, cin // groups, *x.shape[2:])
    wg = weight.reshape(groups, cout // groups, cin // groups, *kernel)
    size = int(np.prod(out_sp))
    out = np.zeros((n, groups, cout // groups, size), np.result_type(x, weight))
    for k in np.ndindex(*kernel):  # one matmul (BLAS) per kernel offset
        sl = tuple(slice(k[i] * dilations[i], k[i] * dilations[i] + (out_sp[i] - 1) * strides[i] + 1,
                         strides[i]) for i in range(nd))
        patch = xg[(slice(None), slice(None), slice(None)) + sl].reshape(n, groups, cin // groups, size)
        out += np.matmul(wg[(slice(None), slice(None), slice(None)) + k], patch)
    out = out.reshape(n, cout, *out_sp)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * nd)
    return out


@op("scaled_dot_product_attention")
def sdpa(op, query, key, value, attn_mask=None):
    scores = np.matmul(query, np.swapaxes(key, -1, -2)) / np.sqrt(query.shape[-1])
    if attn_mask is not None:
        scores = np.where(attn_mask, scores, -np.inf) if attn_mask.dtype == bool else scores + attn_mask
    return np.matmul(softmax(op, scores, -1), value)


# ---------------------------------------------------------------- normalization
@op("layer_norm")
def layer_norm(op, x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    ax = _axes(axes, x.ndim) if axes is not None else tuple(range(x.ndim))
    mean = np.mean(x, axis=ax, keepdims=True)
    out = (x - mean) / np.sqrt(np.mean((x - mean) ** 2, axis=ax, keepdims=True) + epsilon)
    out = out if gamma is None else out * gamma
    return out if beta is None else out + beta


@op("l2_norm")
def l2_norm(op, x, epsilon=1e-6):
    """Over the last three dims (the leading ones are batch)."""
    return x / np.sqrt(np.sum(x * x, axis=(-3, -2, -1), keepdims=True) + epsilon)


@op("batch_norm")
def batch_norm(op, x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + epsilon)
    out = out if gamma is None else out * gamma.reshape(shape)
    return out if beta is None else out + beta.reshape(shape)


# ---------------------------------------------------------------- shapes and movement
@op("reshape")
def reshape(op, x, shape):
    shape = [int(s) for s in np.atleast_1d(shape)]
    if op.opset >= 17:  # iOS17: a 0 copies the input dim aligned from the right, else 1
        shape = [(x.shape[x.ndim - (len(shape) - i)] if x.ndim - (len(shape) - i) >= 0 else 1)
                 if s == 0 else s for i, s in enumerate(shape)]
    else:  # iOS15: a 0 copies the input dim at the same index
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return np.reshape(x, shape)


OPS["transpose"] = lambda op, x, perm: np.transpose(x, [int(p) for p in perm])
OPS["tile"] = lambda op, x, reps: np.tile(x, [int(r) for r in reps])
OPS["reverse"] = lambda op, x, axes=None: np.flip(x, axis=_axes(axes, x.ndim))
OPS["shape"] = lambda op, x: np.array(x.shape, np.int32)
OPS["fill"] = lambda op, shape, value=0.0: np.full([int(s) for s in np.atleast_1d(shape)], value)
OPS["fill_like"] = lambda op, ref_tensor, value=0.0: np.full(ref_tensor.shape, value)
OPS["range_1d"] = lambda op, end, start, step: np.arange(start, end, step)
OPS["flatten2d"] = lambda op, x, axis=1: x.reshape(int(np.prod(x.shape[:int(axis) % (x.ndim + 1)])), -1)
OPS["stack"] = lambda op, values, axis: np.stack(values, axis=int(axis))


@op("expand_dims")
def expand_dims(op, x, axes):
    rank = x.ndim + len(np.atleast_1d(axes))
    for a in sorted(int(a) % rank for a in np.atleast_1d(axes)):
        x = np.expand_dims(x, a)
    return x


@op("squeeze")
def squeeze(op, x, axes=None):
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim))


@op("concat")
def concat(op, values, axis, interleave=False):
    axis = int(axis) % values[0].ndim
    if not _b(interleave):
        return np.concatenate(values, axis=axis)
    return np.stack(values, axis=axis + 1).reshape(
        values[0].shape[:axis] + (-1,) + values[0].shape[axis + 1:])


@op("split")
def split(op, x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is None:
        return tuple(np.split(x, int(num_splits), axis=axis))
    return tuple(np.split(x, np.cumsum([int(s) for s in split_sizes])[:-1], axis=axis))


def _index(x_shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    n = len(begin)
    stride = [1] * n if stride is None else [int(s) for s in stride]
    bm = [False] * n if begin_mask is None else [bool(m) for m in begin_mask]
    em = [False] * n if end_mask is None else [bool(m) for m in end_mask]
    sq = [False] * n if squeeze_mask is None else [bool(m) for m in squeeze_mask]
    idx = []
    for i in range(n):
        b, e = int(begin[i]), int(end[i])
        if sq[i]:
            idx.append(b)
        else:
            idx.append(slice(None if bm[i] else b, None if em[i] else e, stride[i]))
    return tuple(idx)


@op("slice_by_index")
def slice_by_index(op, x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return np.array(x[_index(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)])


@op("slice_update")
def slice_update(op, x, update, begin, end, stride=None, begin_mask=None, end_mask=None,
                 squeeze_mask=None):
    out = np.array(x)
    idx = _index(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target = out[idx].shape
    if int(np.prod(target)) != update.size:
        raise ValueError(f"slice_update: update of shape {update.shape} for a slice of shape {target}")
    out[idx] = update.reshape(target)
    return out


@op("slice_by_size")
def slice_by_size(op, x, begin, size):
    idx = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    return np.array(x[idx])


@op("pad")
def pad(op, x, pad, mode="constant", constant_val=0.0):
    p = [int(v) for v in pad]
    k = len(p) // 2
    width = [(0, 0)] * (x.ndim - k) + [(p[2 * i], p[2 * i + 1]) for i in range(k)]
    mode = str(mode)
    if mode == "constant":
        return np.pad(x, width, constant_values=constant_val)
    return np.pad(x, width, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@op("band_part")
def band_part(op, x, lower=-1, upper=-1):
    lower, upper = int(lower), int(upper)
    i = np.arange(x.shape[-2])[:, None]
    j = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, 0)


@op("cumsum")
def cumsum(op, x, axis=0, exclusive=False, reverse=False):
    axis = int(axis)
    if _b(reverse):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if _b(exclusive):
        out = out - x
    return np.flip(out, axis) if _b(reverse) else out


@op("topk")
def topk(op, x, k=1, axis=-1, ascending=False, sort=True, return_indices=True,
         output_indices_dtype=None):
    axis, k = int(axis), int(k)
    order = np.argsort(x if _b(ascending) else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    vals = np.take_along_axis(x, idx, axis=axis)
    return (vals, idx.astype(np.int32)) if _b(return_indices, True) else vals


@op("argsort")
def argsort(op, x, axis=-1, ascending=False):
    return np.argsort(x if _b(ascending) else -x, axis=int(axis), kind="stable")


@op("one_hot")
def one_hot(op, indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    n = int(one_hot_vector_size)
    hot = np.asarray(indices)[..., None] == np.arange(n)
    out = np.where(hot, on_value, off_value)
    return np.moveaxis(out, -1, int(axis) % out.ndim)


# ---------------------------------------------------------------- gather / scatter
def _wrap(indices, size):
    indices = np.asarray(indices).astype(np.int64)
    if np.any(indices >= size) or np.any(indices < -size):
        raise IndexError(f"gather index out of range [{-size}, {size}): "
                         f"min {indices.min()}, max {indices.max()}")
    return np.where(indices < 0, indices + size, indices)


@op("gather")
def gather(op, x, indices, axis=0, batch_dims=0, validate_indices=False):
    axis, bd = int(axis) % x.ndim, int(batch_dims)
    indices = _wrap(indices, x.shape[axis])
    if bd == 0:
        return np.take(x, indices, axis=axis)
    lead = x.shape[:bd]
    xf = x.reshape((-1,) + x.shape[bd:])
    inf = indices.reshape((-1,) + indices.shape[bd:])
    out = np.stack([np.take(xf[b], inf[b], axis=axis - bd) for b in range(xf.shape[0])])
    return out.reshape(lead + out.shape[1:])


@op("gather_along_axis")
def gather_along_axis(op, x, indices, axis=0, validate_indices=False):
    axis = int(axis) % x.ndim
    return np.take_along_axis(x, _wrap(indices, x.shape[axis]), axis=axis)


@op("gather_nd")
def gather_nd(op, x, indices, batch_dims=0, validate_indices=False):
    if int(batch_dims):
        raise NotImplementedError("gather_nd with batch_dims > 0")
    indices = np.asarray(indices).astype(np.int64)
    k = indices.shape[-1]
    return x[tuple(_wrap(indices[..., i], x.shape[i]) for i in range(k))]


_SCATTER = {"update": None, "add": np.add, "sub": np.subtract, "mul": np.multiply,
            "div": np.divide, "max": np.maximum, "min": np.minimum}


@op("scatter_along_axis")
def scatter_along_axis(op, data, indices, updates, axis=0, mode="add", validate_indices=False):
    axis = int(axis) % data.ndim
    out = np.array(data)
    indices = _wrap(indices, data.shape[axis])
    grid = list(np.indices(indices.shape, sparse=True))
    grid[axis] = indices
    fn = _SCATTER[str(mode)]
    if fn is None:
        out[tuple(grid)] = updates
    else:
        fn.at(out, tuple(grid), updates)
    return out


@op("scatter")
def scatter(op, data, indices, updates, axis=0, mode="add", validate_indices=False):
    axis = int(axis) % data.ndim
    out = np.moveaxis(np.array(data), axis, 0)
    upd = np.moveaxis(updates, axis, 0)
    idx = _wrap(indices, data.shape[axis])
    fn = _SCATTER[str(mode)]
    if fn is None:
        out[idx] = upd
    else:
        fn.at(out, idx, upd)
    return np.moveaxis(out, 0, axis)


def _along(v, axis, ndim):
    v = np.asarray(v, np.float32)
    if v.ndim == 0 or axis is None:
        return v
    shape = [1] * ndim
    shape[int(axis)] = -1
    return v.reshape(shape)


@op("dequantize")
def dequantize(op, input, scale, zero_point=None, axis=None):
    zp = 0 if zero_point is None else _along(zero_point, axis, input.ndim)
    return (input.astype(np.float32) - zp) * _along(scale, axis, input.ndim)


@op("quantize")
def quantize(op, input, scale, output_dtype, zero_point=None, axis=None):
    zp = 0 if zero_point is None else _along(zero_point, axis, input.ndim)
    info = np.iinfo(np.int8 if str(output_dtype) == "int8" else np.uint8)
    return np.clip(np.round(input / _along(scale, axis, input.ndim) + zp), info.min, info.max)
