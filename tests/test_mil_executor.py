"""The reference MIL executor (export/mil_executor.py) against torch and numpy, on packages that
real coremltools converts and saves here, re-loaded from disk: op by op in fp32 and in fp16
emulation, a stateful KV-cache-like buffer over several steps, int8 / 4-bit block-wise / LUT
weights, a multifunction package, loud errors for ops it lacks, and the tiny student end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402

from export import mil_executor  # noqa: E402
from export.mil_executor import MILExecutionError, UnsupportedOpError  # noqa: E402

FP32, FP16 = ct.precision.FLOAT32, ct.precision.FLOAT16


def convert(module, inputs: dict, path, precision=FP32, states=None, outputs=None):
    """Trace `module` on `inputs` (name -> tensor), convert for iOS18, save to `path`."""
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), tuple(inputs.values()), check_trace=False)
    model = ct.convert(
        traced, inputs=[ct.TensorType(name=n, shape=tuple(t.shape),
                                      dtype=np.int32 if not t.is_floating_point() else np.float32)
                        for n, t in inputs.items()],
        outputs=[ct.TensorType(name=n) for n in outputs] if outputs else None,
        states=states, minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
        convert_to="mlprogram", skip_model_load=True)
    model.save(str(path))
    return path


def convert_mil(prog, path, precision=FP32):
    """Save a hand-written MIL program as is (no graph passes: every op stays)."""
    model = ct.convert(prog, minimum_deployment_target=ct.target.iOS18, compute_precision=precision,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    model.save(str(path))
    return path


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


# ---------------------------------------------------------------- op by op, torch modules
class Ops(torch.nn.Module):
    """Every op a llama-style decoder conversion emits, each as its own named output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(8, 16)
        self.conv1 = torch.nn.Conv2d(8, 16, 1, bias=False)
        self.conv3 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.emb = torch.nn.Embedding(10, 8)
        self.norm = torch.nn.LayerNorm(8)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x, y, z, ids, idx):
        q, k, v = x[:, None], y[:, None], (x * y)[:, None]
        mask = torch.tril(torch.ones(4, 4, dtype=torch.bool))
        return {
            "add": x + y, "sub": x - y, "mul": x * y, "real_div": x / (y.abs() + 0.5),
            "rsqrt": torch.rsqrt(x.abs() + 0.1), "sqrt": torch.sqrt(x.abs()), "exp": torch.exp(x),
            "pow": x.abs() ** 1.5, "reduce_mean": x.pow(2).mean(-1, keepdim=True),
            "reduce_sum": x.sum(1), "reduce_max": x.amax(-1), "softmax": torch.softmax(x, -1),
            "silu": F.silu(x), "sigmoid": torch.sigmoid(x), "tanh": torch.tanh(x),
            "gelu": F.gelu(x), "linear": self.lin(x), "matmul": x @ y.transpose(-1, -2),
            "conv": self.conv1(x.permute(0, 2, 1)[:, :, None, :]), "conv_grouped": self.conv3(z),
            "gather": self.emb(ids), "gather_along_axis": torch.gather(x, -1, idx.long()),
            "concat": torch.cat([x, y], -1), "split": torch.split(x, [3, 5], -1)[1] * 2,
            "slice_by_index": x[:, 1:3, ::2], "reshape": x.reshape(2, 32) + 1,
            "transpose": x.permute(2, 0, 1) * 2, "expand_dims": x.unsqueeze(1) * 2,
            "squeeze": x[:, :1].squeeze(1) * 2, "cast": ids.float() * 0.5,
            "select": torch.where(x > 0, x, y), "less": (x < y).float(),
            "equal": (ids == 3).float(), "sin": torch.sin(x), "cos": torch.cos(x),
            "tile": x.repeat(1, 2, 1) * 2, "layer_norm": self.norm(x),
            "scaled_dot_product_attention": F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "einsum": torch.einsum("bji,bjk->bik", x, y), "cumsum": torch.cumsum(x, 1),
            "argmax": torch.argmax(x, -1).float(), "clip": torch.clamp(x, -0.5, 0.7),
            "maximum": torch.maximum(x, y), "abs": x.abs(), "relu": torch.relu(x),
            "log": torch.log(x.abs() + 1), "erf": torch.erf(x), "pad": F.pad(x, (1, 2)),
            "topk": torch.topk(x, 3, -1).values,
        }


def op_inputs(scale=1.0):
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 4, 8, generator=g) * scale, "y": torch.randn(2, 4, 8, generator=g),
            "z": torch.randn(1, 4, 6, 6, generator=g),
            "ids": torch.randint(0, 10, (2, 3), generator=g, dtype=torch.int32),
            "idx": torch.randint(0, 8, (2, 4, 3), generator=g, dtype=torch.int32)}


class Flat(torch.nn.Module):
    def __init__(self, m, names):
        super().__init__()
        self.m, self.names = m, names

    def forward(self, *a):
        out = self.m(*a)
        return tuple(out[n] for n in self.names)


OP_NAMES = list(Ops()(**op_inputs()).keys())


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def op_package(request, tmp_path_factory):
    module = Ops()
    path = convert(Flat(module, OP_NAMES), op_inputs(), tmp_path_factory.mktemp("ops") / "ops.mlpackage",
                   FP32 if request.param == "fp32" else FP16, outputs=OP_NAMES)
    model = mil_executor.load(path)
    inputs = {k: v.numpy() for k, v in op_inputs().items()}
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in module(**op_inputs()).items()}
    return request.param, model, model.predict(inputs), ref


def test_every_emitted_op_is_exercised(op_package):
    counts = op_package[1].op_counts()
    for name in ["add", "sub", "mul", "real_div", "rsqrt", "sqrt", "exp", "pow", "reduce_mean",
                 "reduce_sum", "reduce_max", "softmax", "silu", "sigmoid", "tanh", "gelu", "linear",
                 "matmul", "conv", "gather", "gather_along_axis", "concat", "split",
                 "slice_by_index", "reshape", "transpose", "expand_dims", "squeeze", "cast",
                 "select", "less", "equal", "sin", "cos", "tile", "layer_norm",
                 "scaled_dot_product_attention", "cumsum", "reduce_argmax", "clip", "maximum",
                 "abs", "relu", "log", "erf", "pad", "topk"]:
        assert name in counts, (name, counts)


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_matches_torch(op_package, name):
    precision, model, out, ref = op_package
    got = out[name].astype(np.float32)
    assert got.shape == ref[name].shape
    tol = 1e-5 if precision == "fp32" else 1.5e-2
    assert rel_err(got, ref[name]) < tol, (name, rel_err(got, ref[name]))
    if precision == "fp16":
        assert out[name].dtype == np.float16


# ---------------------------------------------------------------- op by op, hand-written MIL
def test_mil_ops_match_numpy(tmp_path):
    """Ops that torch conversions rarely emit as such, written directly in MIL."""
    rng = np.random.RandomState(0)
    xv = rng.randn(3, 4, 5).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 4, 5))], opset_version=ct.target.iOS18)
    def prog(x):
        ix = mb.const(val=np.array([[2], [0], [1]], np.int32))
        return (mb.band_part(x=x, lower=1, upper=0, name="band_part"),
                mb.slice_by_size(x=x, begin=[1, 0, 2], size=[2, -1, 2], name="slice_by_size"),
                mb.fill(shape=[2, 3], value=1.5, name="fill"),
                mb.add(x=mb.range_1d(start=1.0, end=7.0, step=2.0), y=0.0, name="range_1d"),
                mb.gather_nd(x=x, indices=ix, name="gather_nd"),
                mb.floor_div(x=x, y=0.3, name="floor_div"), mb.mod(x=x, y=0.7, name="mod"),
                mb.stack(values=[x, x], axis=1, name="stack"), mb.reverse(x=x, axes=[2], name="reverse"),
                mb.reduce_log_sum_exp(x=x, axes=[1], keep_dims=False, name="reduce_log_sum_exp"),
                mb.l2_norm(x=x, name="l2_norm"),
                mb.inverse(x=mb.abs(x=x), epsilon=0.1, name="inverse"),
                mb.gelu(x=x, mode="TANH_APPROXIMATION", name="gelu_tanh"),
                mb.einsum(values=(mb.expand_dims(x=x, axes=[0]),
                                  mb.transpose(x=mb.expand_dims(x=x, axes=[0]), perm=[0, 3, 2, 1])),
                          equation="nchw,nwhu->nchu", name="einsum"),
                mb.concat(values=[x, x], axis=2, interleave=True, name="concat_interleave"),
                mb.one_hot(indices=mb.cast(x=mb.abs(x=x), dtype="int32"), one_hot_vector_size=4,
                           name="one_hot"),
                mb.scatter_along_axis(data=x, indices=mb.const(val=np.zeros((3, 4, 1), np.int32)),
                                      updates=mb.slice_by_size(x=x, begin=[0, 0, 4], size=[3, 4, 1]),
                                      axis=2, mode="add", name="scatter_along_axis"))

    model = mil_executor.load(convert_mil(prog, tmp_path / "m.mlpackage"))
    out = model.predict({"x": xv})
    i, j = np.arange(4)[:, None], np.arange(5)[None]
    lse = np.log(np.exp(xv).sum(1))
    sc = xv.copy()
    sc[:, :, 0] += xv[:, :, 4]
    ref = {
        "band_part": np.where((i - j <= 1) & (j - i <= 0), xv, 0), "slice_by_size": xv[1:3, :, 2:4],
        "fill": np.full((2, 3), 1.5), "range_1d": np.arange(1.0, 7.0, 2.0), "gather_nd": xv[[2, 0, 1]],
        "floor_div": np.floor(xv / np.float32(0.3)), "mod": np.mod(xv, np.float32(0.7)),
        "stack": np.stack([xv, xv], 1), "reverse": xv[:, :, ::-1], "reduce_log_sum_exp": lse,
        "l2_norm": xv / np.sqrt((xv * xv).sum() + 1e-6), "inverse": 1 / (np.abs(xv) + 0.1),
        "gelu_tanh": F.gelu(torch.tensor(xv), approximate="tanh").numpy(),
        "concat_interleave": np.stack([xv, xv], 3).reshape(3, 4, 10),
        "einsum": np.einsum("nchw,nwhu->nchu", xv[None], xv[None].transpose(0, 3, 2, 1)),
        "one_hot": np.eye(4)[np.abs(xv).astype(np.int32)], "scatter_along_axis": sc,
    }
    assert set(ref) == set(out)
    for name, r in ref.items():
        assert out[name].shape == r.shape, name
        assert rel_err(out[name], r) < 1e-5, (name, rel_err(out[name], r))


# ---------------------------------------------------------------- fp16 emulation
class Overflow(torch.nn.Module):
    def forward(self, x):
        return (x * 1000.0) * 1000.0, x + 1e-4


def test_fp16_rounds_every_op_and_overflows_to_inf(tmp_path):
    x = torch.tensor([[1.0, 100.0, -100.0, 0.001]])
    out16 = mil_executor.load(convert(Overflow(), {"x": x}, tmp_path / "a.mlpackage", FP16)).predict({"x": x.numpy()})
    out32 = mil_executor.load(convert(Overflow(), {"x": x}, tmp_path / "b.mlpackage", FP32)).predict({"x": x.numpy()})
    big16, small16 = out16.values()
    big32, small32 = out32.values()
    assert np.isfinite(big32).all() and np.allclose(big32, x.numpy() * 1e6)
    assert np.isinf(big16[0, 1:3]).all() and np.sign(big16[0, 1:3]).tolist() == [1, -1]
    assert np.isfinite(big16[0, 3])
    assert small16[0, 0] == 1.0 and small32[0, 0] == np.float32(1.0001)  # fp16 ulp at 1 is 1e-3
    # the same ops in torch fp16 (fp32 compute, fp16 result) give bit-identical values
    ref = (x.half() * 1000.0) * 1000.0
    assert np.array_equal(big16, ref.numpy(), equal_nan=True)


# ---------------------------------------------------------------- states
class Cache(torch.nn.Module):
    """A KV-cache-like fp16 buffer written by slice at `pos`, read back whole."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 2, 6, 4, dtype=torch.float16))
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))

    def forward(self, x, pos):
        p = pos[0]
        self.cache[:, :, p:p + 1, :] = (x @ self.w).half()
        return (self.cache.float() * 2.0).sum(2) + x.sum()


def test_state_updated_by_slice_over_steps(tmp_path):
    x0, p0 = torch.zeros(1, 2, 1, 4), torch.tensor([0], dtype=torch.int32)
    state = ct.StateType(wrapped_type=ct.TensorType(shape=(1, 2, 6, 4), dtype=np.float16), name="cache")
    path = convert(Cache(), {"x": x0, "pos": p0}, tmp_path / "s.mlpackage", FP16, states=[state])
    model = mil_executor.load(path)
    assert list(model.states) == ["cache"] and "read_state" in model.op_counts()
    with pytest.raises(ValueError, match="stateful"):
        model.predict({"x": x0.numpy(), "pos": p0.numpy()})
    ref, st = Cache(), model.make_state()
    g = torch.Generator().manual_seed(4)
    for step, pos in enumerate([0, 1, 2, 5, 3]):
        x = torch.randn(1, 2, 1, 4, generator=g)
        p = torch.tensor([pos], dtype=torch.int32)
        with torch.no_grad():
            want = ref(x, p).numpy()
        got = model.predict({"x": x.numpy(), "pos": p.numpy()}, st)
        assert rel_err(next(iter(got.values())), want) < 1e-2, step
        np.testing.assert_allclose(st.read_state("cache").astype(np.float32),
                                   ref.cache.float().numpy(), rtol=2e-3, atol=2e-3)
    # the functional form leaves the caller's state alone
    before = st.read_state("cache")
    _, new = model.run({"x": x.numpy(), "pos": np.array([4], np.int32)}, st.values)
    assert np.array_equal(st.read_state("cache"), before) and not np.array_equal(new["cache"], before)


# ---------------------------------------------------------------- compressed weights
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.up = torch.nn.Linear(64, 96, bias=False)
        self.down = torch.nn.Linear(96, 32)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def _dequantized_weights(path):
    """Oracle: coremltools' own decompression of each constexpr op (pymil), by output name."""
    from export.convert import load_program

    out = {}
    for op in load_program(path)[1].functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            out[op.outputs[0].name] = (op.op_type, np.asarray(op.materialized_val_inference()))
    return out


def _compress(kind, mlmodel, target="iOS18"):
    opt = ct.optimize.coreml
    if kind == "int8":
        cfg = opt.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0)
        return opt.linear_quantize_weights(mlmodel, opt.OptimizationConfig(global_config=cfg)), \
            "constexpr_blockwise_shift_scale" if target == "iOS18" else "constexpr_affine_dequantize"
    if kind == "int4_block":
        cfg = opt.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block",
                                          block_size=16, weight_threshold=0)
        return opt.linear_quantize_weights(mlmodel, opt.OptimizationConfig(global_config=cfg)), \
            "constexpr_blockwise_shift_scale"
    cfg = opt.OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=0,
                                 **({"granularity": "per_grouped_channel", "group_size": 16}
                                    if target == "iOS18" else {}))
    return opt.palettize_weights(mlmodel, opt.OptimizationConfig(global_config=cfg)), \
        "constexpr_lut_to_dense"


@pytest.mark.parametrize("kind,target", [("int8", "iOS18"), ("int4_block", "iOS18"),
                                         ("lut4", "iOS18"), ("int8", "iOS16"), ("lut4", "iOS16")])
def test_compressed_weights_dequantize_like_coremltools(tmp_path, kind, target):
    """iOS18: constexpr_blockwise_shift_scale, constexpr_lut_to_dense (grouped LUTs);
    iOS16: constexpr_affine_dequantize, constexpr_lut_to_dense (packed indices)."""
    module, x = MLP(), torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), (x,))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 5, 64))],
                         minimum_deployment_target=getattr(ct.target, target),
                         compute_precision=FP32, skip_model_load=True)
    compressed, op_type = _compress(kind, mlmodel, target)
    path = tmp_path / f"{kind}_{target}.mlpackage"
    compressed.save(str(path))
    model = mil_executor.load(path)
    oracle = _dequantized_weights(path)
    assert {t for t, _ in oracle.values()} == {op_type}, oracle.keys()
    for name, (_, w) in oracle.items():  # the executor's materialized weights, bit for bit
        np.testing.assert_array_equal(model.consts[name], w.astype(np.float32))
    ws = sorted((w for _, w in oracle.values()), key=lambda w: w.shape[0])
    deq = MLP()
    with torch.no_grad():  # torch with the dequantized weights (down 32x96, up 96x64)
        deq.down.weight.copy_(torch.tensor(ws[0]))
        deq.up.weight.copy_(torch.tensor(ws[1]))
        want = deq(x).numpy()
        orig = module(x).numpy()
    got = next(iter(model.predict({"x": x.numpy()}).values()))
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, orig) < (0.02 if kind == "int8" else 0.3)  # and it is still the model


def test_blob_reader_agrees_with_coremltools(tmp_path):
    """weight.bin parsed here (incl. packed 4-bit) equals coremltools' BlobReader."""
    from coremltools.libmilstoragepython import _BlobStorageReader

    mlmodel = ct.convert(torch.jit.trace(MLP().eval(), (torch.zeros(1, 5, 64),)),
                         inputs=[ct.TensorType(name="x", shape=(1, 5, 64))],
                         minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    path = tmp_path / "w.mlpackage"
    _compress("int4_block", mlmodel)[0].save(str(path))
    spec, weights = mil_executor.read_spec(path)
    blob = mil_executor.BlobFile(weights / "weight.bin")
    reader = _BlobStorageReader(str(weights / "weight.bin"))
    n = 0
    for op in spec.mlProgram.functions["main"].block_specializations["CoreML8"].operations:
        for arg in list(op.inputs.values()) + ([] if op.type != "const" else []):
            for b in arg.arguments:
                if b.WhichOneof("binding") == "value" and b.value.WhichOneof("value") == "blobFileValue":
                    dtype, shape = mil_executor._value_type(b.value.type)
                    got = blob.read(b.value.blobFileValue.offset, dtype, shape)
                    read = {"INT4": reader.read_int4_data, "FLOAT16": reader.read_fp16_data,
                            "FLOAT32": reader.read_float_data}[dtype]
                    ref = np.asarray(read(b.value.blobFileValue.offset))
                    if dtype == "FLOAT16":
                        ref = ref.view(np.float16)
                    np.testing.assert_array_equal(got.ravel(), ref.ravel()[:got.size])
                    n += 1
    assert n >= 2


# ---------------------------------------------------------------- multifunction, errors
class Scale(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return torch.tanh(x * self.k)


def test_multifunction_package_runs_each_function(tmp_path):
    x = torch.randn(2, 3)
    desc = ct.utils.MultiFunctionDescriptor()
    for name, k in [("small", 0.5), ("large", 3.0)]:
        p = convert(Scale(k), {"x": x}, tmp_path / f"{name}.mlpackage", FP32)
        desc.add_function(str(p), src_function_name="main", target_function_name=name)
    desc.default_function_name = "large"
    ct.utils.save_multifunction(desc, str(tmp_path / "multi.mlpackage"))
    path = tmp_path / "multi.mlpackage"
    assert mil_executor.functions(path) == ["large", "small"]
    assert mil_executor.load(path).function == "large"
    for name, k in [("small", 0.5), ("large", 3.0)]:
        out = mil_executor.load(path, name).predict({"x": x.numpy()})
        assert rel_err(next(iter(out.values())), torch.tanh(x * k).numpy()) < 1e-6
    with pytest.raises(KeyError, match="no function 'medium'"):
        mil_executor.load(path, "medium")
    seen = []  # the per-op hook that probes tap
    mil_executor.load(path, "small").run({"x": x.numpy()}, observe=lambda op, v: seen.append((op.type, v[0])))
    assert [t for t, _ in seen][-1] == "tanh" and rel_err(seen[-1][1], torch.tanh(x * 0.5).numpy()) < 1e-6


def test_unknown_op_fails_loudly(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 4, 4))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.relu(x=mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid",
                                     name="pooled"), name="out")

    path = convert_mil(prog, tmp_path / "u.mlpackage")
    with pytest.raises(UnsupportedOpError, match=r"'avg_pool' \(output 'pooled'\) in function 'main'"):
        mil_executor.load(path)
    model = mil_executor.load(path, strict=False)  # deferred: still fails when reached
    with pytest.raises(UnsupportedOpError, match="avg_pool"):
        model.predict({"x": np.zeros((1, 2, 4, 4), np.float32)})


def test_bad_inputs_and_failing_ops_are_named(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 3)), mb.TensorSpec(shape=(2,), dtype=ct.converters.mil.mil.types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, i):
        return mb.gather(x=x, indices=i, axis=0, name="rows")

    model = mil_executor.load(convert_mil(prog, tmp_path / "g.mlpackage"))
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(model.predict({"x": x, "i": np.array([3, -1], np.int32)})["rows"], x[[3, 3]])
    with pytest.raises(MILExecutionError, match="gather 'rows' failed: IndexError"):
        model.predict({"x": x, "i": np.array([0, 4], np.int32)})
    with pytest.raises(ValueError, match=r"input 'x' has shape \[3, 4\]"):
        model.predict({"x": x.T, "i": np.array([0, 1], np.int32)})
    with pytest.raises(KeyError, match="missing input 'i'"):
        model.predict({"x": x})


# ---------------------------------------------------------------- the tiny student, end to end
def test_tiny_student_prefill_and_decode_match_the_mirror(peaked_tiny, tiny_coreml):
    """export/convert.py's fp16 package of the tiny student (conftest's shared conversion) vs
    its fp32 PyTorch mirror: prefill 16 tokens, then 16 decode steps through the fp16 KV-cache
    state."""
    import time

    from export.mirror import load_mirror

    mirror = load_mirror(peaked_tiny)
    config = mirror.config
    path = tiny_coreml[1]
    prefill = mil_executor.load(path, "prefill_16_ctx128")
    decode = mil_executor.load(path, "decode_ctx128")
    state = prefill.make_state()
    k, v = (torch.zeros(mirror.cache_shape(128)) for _ in range(2))
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (1, 16)).astype(np.int32)
    start = time.perf_counter()
    got = prefill.predict({"input_ids": ids, "position": np.array([0], np.int32)}, state)["logits"]
    with torch.no_grad():
        want, k, v = mirror.function(16, 128)(torch.tensor(ids), torch.tensor([0], dtype=torch.int32), k, v)
    errs, agree = [rel_err(got, want.numpy())], [got.argmax() == want.numpy().argmax()]
    step = mirror.function(1, 128)
    token = int(want.numpy().argmax())
    for i in range(16):
        pos = np.array([16 + i], np.int32)
        got = decode.predict({"input_ids": np.array([[token]], np.int32), "position": pos}, state)["logits"]
        with torch.no_grad():
            want, k, v = step(torch.tensor([[token]], dtype=torch.int32), torch.tensor(pos), k, v)
        errs.append(rel_err(got, want.numpy()))
        agree.append(got.argmax() == want.numpy().argmax())
        token = int(want.numpy().argmax())
    assert max(errs) < 0.01, errs
    assert sum(agree) >= 15, agree
    np.testing.assert_allclose(state.read_state("k_cache")[..., :32].astype(np.float32),
                               k.numpy()[..., :32], atol=2e-2)
    print(f"tiny student: prefill + 16 decode steps in {time.perf_counter() - start:.2f} s, "
          f"max rel err {max(errs):.1e}")


def test_enumerated_input_shapes(tmp_path):
    lin = torch.nn.Linear(8, 4).eval()
    mlmodel = ct.convert(torch.jit.trace(lin, (torch.zeros(1, 4, 8),)),
                         inputs=[ct.TensorType(name="x", shape=ct.EnumeratedShapes(
                             shapes=[(1, 4, 8), (1, 16, 8)]))],
                         minimum_deployment_target=ct.target.iOS18, compute_precision=FP32,
                         skip_model_load=True)
    mlmodel.save(str(tmp_path / "e.mlpackage"))
    model = mil_executor.load(tmp_path / "e.mlpackage")
    for T in (4, 16):
        x = torch.randn(1, T, 8)
        with torch.no_grad():
            want = lin(x).numpy()
        assert rel_err(next(iter(model.predict({"x": x.numpy()}).values())), want) < 1e-6
