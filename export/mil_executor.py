"""Reference MIL executor: run a saved .mlpackage on any OS, op by op, with CoreML's semantics.

    from export import mil_executor
    model = mil_executor.load("model.mlpackage", function="decode_ctx128")
    state = model.make_state()                     # like MLModel.make_state()
    out = model.predict({"input_ids": ids, "position": pos}, state)   # like MLModel.predict

The package's protobuf (Data/com.apple.CoreML/model.mlmodel) and its weights/weight.bin are read
here directly: one function of a multifunction package is loaded, its constants and constexpr
(dequantization) ops are materialized once, and every other op runs in numpy (export/mil_ops.py).
fp16 emulation: ops compute in fp32 and every result the program types fp16 is rounded to fp16,
as the ANE / GPU would, so fp16 rounding and overflow to inf show up. States (read_state /
write_state, i.e. coreml_update_state) live in a `State` that persists across `predict` calls.
An op without an implementation fails at load with its type, output name and function.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .mil_ops import OPS, op as register_op

# MIL proto DataType name -> (numpy dtype, bits in blob storage)
DTYPES = {
    "BOOL": (np.bool_, 8), "STRING": (np.str_, 0), "FLOAT16": (np.float16, 16),
    "FLOAT32": (np.float32, 32), "FLOAT64": (np.float64, 64), "INT8": (np.int8, 8),
    "INT16": (np.int16, 16), "INT32": (np.int32, 32), "INT64": (np.int64, 64),
    "INT4": (np.int8, 4), "UINT8": (np.uint8, 8), "UINT16": (np.uint16, 16),
    "UINT32": (np.uint32, 32), "UINT64": (np.uint64, 64), "UINT4": (np.uint8, 4),
    "UINT2": (np.uint8, 2), "UINT1": (np.uint8, 1), "UINT6": (np.uint8, 6), "UINT3": (np.uint8, 3),
}
# MIL (proto) op types for states; coreml_update_state is pymil's name for write + read
STATE_OPS = ("read_state", "write_state", "coreml_update_state")
OPSET = {"CoreML5": 15, "CoreML6": 16, "CoreML7": 17, "CoreML8": 18, "CoreML9": 19}


class UnsupportedOpError(NotImplementedError):
    """A MIL op this executor has no semantics for (never skipped silently)."""


class MILExecutionError(RuntimeError):
    """An op that failed or produced a result that disagrees with its declared type."""


@dataclass
class Var:
    name: str
    dtype: str  # proto DataType name: FLOAT16, INT32, ...
    shape: tuple  # None for an unknown dim

    @property
    def np_dtype(self):
        return DTYPES[self.dtype][0]

    def describe(self) -> str:
        return f"{self.dtype.lower()}{list(self.shape)}"


@dataclass
class Op:
    type: str
    name: str
    inputs: dict  # param -> list of ("var", name) | ("val", array)
    outputs: list  # [Var]
    tuple_params: set = field(default_factory=set)
    opset: int = 18

    @property
    def output_name(self) -> str:
        return self.outputs[0].name if self.outputs else self.name


# ---------------------------------------------------------------- constexpr ops: weights, at load
def unpack_bits(packed: np.ndarray, nbits: int, count: int, signed: bool = False) -> np.ndarray:
    """Elements packed LSB first (MIL blob storage and the iOS16 constexpr ops)."""
    bits = np.unpackbits(np.asarray(packed).view(np.uint8).ravel(), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.int32)
    vals = bits @ (1 << np.arange(nbits, dtype=np.int32))
    if signed:
        vals = np.where(vals >= 1 << (nbits - 1), vals - (1 << nbits), vals)
    return vals.astype(np.int8 if signed else np.uint8)


@register_op("constexpr_blockwise_shift_scale")
def blockwise_shift_scale(op, data, scale, offset=None):
    data = data.astype(np.float32)
    for axis, (d, s) in enumerate(zip(data.shape, scale.shape)):
        if d != s:
            scale = np.repeat(scale, d // s, axis)
            offset = None if offset is None else np.repeat(offset, d // s, axis)
    return scale * (data - offset.astype(np.float32) if offset is not None else data)


@register_op("constexpr_affine_dequantize")
def affine_dequantize(op, quantized_data, zero_point, scale, axis):
    shape = [1] * quantized_data.ndim
    shape[int(axis)] = -1
    zp = np.asarray(zero_point, np.float32)
    sc = np.asarray(scale, np.float32)
    zp = zp.reshape(shape) if zp.ndim else zp
    sc = sc.reshape(shape) if sc.ndim else sc
    return (quantized_data.astype(np.float32) - zp) * sc


@register_op("constexpr_cast")
def constexpr_cast(op, source_val, output_dtype):
    return source_val


@register_op("constexpr_lut_to_dense")
def lut_to_dense(op, indices, lut, shape=None, vector_axis=None):
    if shape is not None:  # iOS16: packed uint8 indices into a flat LUT
        shape = [int(s) for s in shape]
        nbits = int(np.log2(lut.size))
        return lut[unpack_bits(indices, nbits, int(np.prod(shape)))].reshape(shape)
    # iOS18: indices (uintN) of the output's rank; lut (*blocks, 2^N, vector_size)
    k = indices.ndim
    vec = lut.shape[-1]
    idx = indices.astype(np.int64)
    block = [indices.shape[i] // lut.shape[i] for i in range(k)]
    grids = np.indices(indices.shape, sparse=True)
    sel = tuple(g // b for g, b in zip(grids, block)) + (idx,)
    out = lut[sel]  # indices.shape + (vec,)
    if vec == 1:
        return out[..., 0]
    axis = int(vector_axis) % k
    out = np.moveaxis(out, -1, axis + 1)  # put the vector right after its axis
    shape = list(indices.shape)
    shape[axis] *= vec
    return out.reshape(shape)


@register_op("constexpr_sparse_to_dense")
def sparse_to_dense(op, nonzero_data, mask, shape=None):
    if shape is not None:  # iOS16: mask packed as uint8 bits
        shape = [int(s) for s in shape]
        bits = np.unpackbits(mask.astype(np.uint8), bitorder="little")[: int(np.prod(shape))]
    else:  # iOS18: mask is a uint1 tensor of the output shape
        shape = list(mask.shape)
        bits = mask.ravel()
    out = np.zeros(int(np.prod(shape)), nonzero_data.dtype)
    out[np.flatnonzero(bits)] = nonzero_data
    return out.reshape(shape)


# ---------------------------------------------------------------- reading the package
class PackageError(ValueError):
    """A path that is not a readable saved .mlpackage (or .mlmodel); the message names it."""


def read_spec(path):
    """(Model proto, weights folder) of a saved .mlpackage (or a bare .mlmodel file). Raises
    PackageError naming the path when it is missing, not a package, or not an mlprogram."""
    from google.protobuf.message import DecodeError
    from coremltools.proto import Model_pb2

    path = Path(path)
    if not path.exists():
        raise PackageError(f"{path}: no such file or folder")
    if path.is_dir():
        try:
            manifest = json.loads((path / "Manifest.json").read_text())
            root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
        except FileNotFoundError:
            raise PackageError(f"{path}: not an .mlpackage (no Manifest.json)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise PackageError(f"{path / 'Manifest.json'}: not a package manifest "
                               f"({type(e).__name__}: {e})") from None
        model_file = path / "Data" / root
        weights = model_file.parent / "weights"
    else:
        model_file, weights = path, path.parent / "weights"
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(model_file.read_bytes())
    except DecodeError:
        raise PackageError(f"{model_file}: not a CoreML model (the file does not parse as a "
                           "Model protobuf)") from None
    except OSError as e:
        raise PackageError(f"{model_file}: cannot read: {e.strerror}") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackageError(f"{path}: not an mlprogram (type {spec.WhichOneof('Type')})")
    return spec, weights


def functions(path) -> list:
    """Names of the package's functions, the default one first."""
    spec, _ = read_spec(path)
    names = list(spec.mlProgram.functions)
    default = spec.description.defaultFunctionName or "main"
    return sorted(names, key=lambda n: n != default)


class BlobFile:
    """MIL blob storage (weight.bin): a 64-byte header, then per blob a 64-byte metadata record
    (sentinel 0xDEADBEEF, dtype, size in bytes, data offset) that a BlobFileValue's offset names."""

    def __init__(self, path):
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r")

    def read(self, offset: int, dtype: str, shape: tuple) -> np.ndarray:
        meta = self.data[offset: offset + 64]
        sentinel, _ = np.frombuffer(meta[:8].tobytes(), np.uint32)
        if sentinel != 0xDEADBEEF:
            raise ValueError(f"{self.path}: no blob at offset {offset}")
        size, start = (int(v) for v in np.frombuffer(meta[8:24].tobytes(), np.uint64))
        raw = np.array(self.data[start: start + size])
        npdt, bits = DTYPES[dtype]
        count = int(np.prod(shape))
        if bits < 8:
            return unpack_bits(raw, bits, count, signed=dtype == "INT4").reshape(shape)
        return raw.view(npdt)[:count].reshape(shape)


def _value_type(vt):
    """(dtype name, shape) of a proto ValueType (a state's wrapped tensor for a state)."""
    from coremltools.proto import MIL_pb2

    kind = vt.WhichOneof("type")
    if kind == "stateType":
        return _value_type(vt.stateType.wrappedType)
    if kind != "tensorType":
        raise UnsupportedOpError(f"value type {kind} (lists, dictionaries) is not supported")
    t = vt.tensorType
    if MIL_pb2.DataType.Name(t.dataType) not in DTYPES:
        raise UnsupportedOpError(f"dtype {MIL_pb2.DataType.Name(t.dataType)} is not supported")
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None
                 for d in t.dimensions)
    return MIL_pb2.DataType.Name(t.dataType), dims


def _value(v, blobs: Callable):
    """numpy value of a proto Value (immediate or in weight.bin)."""
    dtype, shape = _value_type(v.type)
    if v.WhichOneof("value") == "blobFileValue":
        return blobs(v.blobFileValue.fileName).read(v.blobFileValue.offset, dtype, shape)
    t = v.immediateValue.tensor
    kind = t.WhichOneof("value")
    npdt, bits = DTYPES[dtype]
    if kind == "bytes":  # fp16, int8, sub-byte immediates: one packed bytes field
        raw = np.frombuffer(t.bytes.values, np.uint8)
        count = int(np.prod(shape))
        if bits < 8:
            return unpack_bits(raw, bits, count, signed=dtype == "INT4").reshape(shape)
        return raw.view(npdt)[:count].reshape(shape)
    vals = list(getattr(t, kind).values)
    if kind == "strings":
        return vals[0] if shape == () else np.array(vals).reshape(shape)
    return np.array(vals, dtype=npdt).reshape(shape)


def _compute(a):
    """The value an op computes with: fp16 widened to fp32."""
    return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float16 else a


def _store(value, var: Var, op: Op, function: str):
    """Cast an op's result to its declared type (fp16 rounding, overflow to inf) and check it."""
    value = np.asarray(value)
    with np.errstate(over="ignore", invalid="ignore"):
        value = value.astype(var.np_dtype, copy=False)
    if len(var.shape) != value.ndim or any(
            d is not None and d != s for d, s in zip(var.shape, value.shape)):
        raise MILExecutionError(f"{function}: op {op.type} '{var.name}' produced shape "
                                f"{list(value.shape)}, its type says {var.describe()}")
    return value


# ---------------------------------------------------------------- the program
class State:
    """The states of one stream (like coremltools' MLState): fp16 KV caches and the like."""

    def __init__(self, values: dict):
        self.values = values

    def read_state(self, name: str) -> np.ndarray:
        return self.values[name].copy()

    def write_state(self, name: str, value) -> None:
        old = self.values[name]
        value = np.asarray(value)
        if value.shape != old.shape:
            raise ValueError(f"state {name}: shape {value.shape}, expected {old.shape}")
        self.values[name] = value.astype(old.dtype)


class Program:
    """One function of a saved package, ready to run."""

    def __init__(self, path, function: str, inputs: dict, states: dict, outputs: list,
                 ops: list, consts: dict, opset: int):
        self.path, self.function, self.opset = Path(path), function, opset
        self.inputs, self.states, self.output_names = inputs, states, outputs
        self.ops, self.consts = ops, consts
        self.const_types, self.constexpr_ops = {}, []  # constant vars' types; dequantization ops
        self.materialized = True
        self._dead = None  # per op, the variables it reads last (see _dead_after)

    def __repr__(self):
        return (f"Program({self.path.name}:{self.function}, {len(self.ops)} ops, inputs "
                f"{ {k: v.describe() for k, v in self.inputs.items()} }, states "
                f"{ {k: v.describe() for k, v in self.states.items()} }, outputs {self.output_names})")

    def make_state(self) -> State:
        """Zero-initialized states, as MLModel.make_state() gives."""
        return State({n: np.zeros(v.shape, v.np_dtype) for n, v in self.states.items()})

    def predict(self, data: dict, state: Optional[State] = None) -> dict:
        """Outputs by name; `state` (from make_state) is updated in place, as CoreML does."""
        if self.states and state is None:
            raise ValueError(f"{self.function} is stateful ({', '.join(self.states)}): "
                             f"pass state=model.make_state()")
        outputs, new = self.run(data, None if state is None else state.values)
        if state is not None:
            state.values.update(new)
        return outputs

    def run(self, data: dict, state: Optional[dict] = None, observe: Callable = None):
        """(outputs, new states) for `data`; `state` maps state names to arrays and is not
        modified. `observe(op, values)` is called after every op with its results (for probes)."""
        if not self.materialized:
            raise RuntimeError(f"{self.function} was loaded with materialize=False (no weights)")
        env = dict(self.consts)
        for name, var in self.inputs.items():
            if name not in data:
                raise KeyError(f"{self.function}: missing input '{name}' ({var.describe()})")
            x = np.asarray(data[name])
            if x.ndim != len(var.shape) or any(d is not None and d != s
                                               for d, s in zip(var.shape, x.shape)):
                raise ValueError(f"{self.function}: input '{name}' has shape {list(x.shape)}, "
                                 f"expected {var.describe()}")
            env[name] = x.astype(var.np_dtype)
        states = {n: (np.zeros(v.shape, v.np_dtype) if state is None or n not in state
                      else np.asarray(state[n]).astype(v.np_dtype)) for n, v in self.states.items()}
        for op, dead in zip(self.ops, self._dead_after()):
            values = self._execute(op, env, states)
            for var, value in zip(op.outputs, values):
                env[var.name] = value
            if observe is not None:
                observe(op, values)
            for name in dead:  # a long context's attention scores are GBs: free them early
                env.pop(name, None)
        return {n: env[n] for n in self.output_names}, states

    def _dead_after(self) -> list:
        """Per op, the variables that no later op (and no output) reads."""
        if self._dead is None:
            last = {}
            for i, op in enumerate(self.ops):
                for args in op.inputs.values():
                    for kind, a in args:
                        if kind == "var":
                            last[a] = i
            for n in self.output_names:
                last.pop(n, None)
            self._dead = [[] for _ in self.ops]
            for name, i in last.items():
                self._dead[i].append(name)
        return self._dead

    def _args(self, op, env):
        kw = {}
        for param, args in op.inputs.items():
            vals = [_compute(env[a] if kind == "var" else a) for kind, a in args]
            kw[param] = vals if param in op.tuple_params or len(vals) > 1 else vals[0]
        return kw

    def _execute(self, op, env, states):
        if op.type in STATE_OPS:
            key = "input" if "input" in op.inputs else "state"
            name = op.inputs[key][0][1]
            if op.type != "read_state":
                data = env[op.inputs["data" if "data" in op.inputs else "value"][0][1]]
                states[name] = data.astype(self.states[name].np_dtype)
            return [states[name].copy()] * len(op.outputs)
        if op.type not in OPS:
            raise UnsupportedOpError(f"unsupported MIL op '{op.type}' (output '{op.output_name}') "
                                     f"in function '{self.function}' of {self.path}")
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                result = OPS[op.type](op, **self._args(op, env))
        except Exception as e:
            raise MILExecutionError(f"{self.function}: op {op.type} '{op.output_name}' failed: "
                                    f"{type(e).__name__}: {e}") from e
        result = result if isinstance(result, tuple) else (result,)
        if len(result) != len(op.outputs):
            raise MILExecutionError(f"{self.function}: op {op.type} '{op.output_name}' gave "
                                    f"{len(result)} outputs, its type says {len(op.outputs)}")
        return [_store(r, v, op, self.function) for r, v in zip(result, op.outputs)]

    def op_counts(self) -> dict:
        out = {}
        for op in self.ops:
            out[op.type] = out.get(op.type, 0) + 1
        return out


def load(path, function: Optional[str] = None, strict: bool = True,
         materialize: bool = True) -> Program:
    """Load one function (default: the package's default function) of a saved .mlpackage.
    strict: fail at load on any op this executor cannot run (else when it is reached).
    materialize=False reads the graph and types only (no weights, no dequantization; an inline
    value is then its Var type): for lint."""
    spec, weights_dir = read_spec(path)
    prog = spec.mlProgram
    if function is None:
        function = spec.description.defaultFunctionName or "main"
    if function not in prog.functions:
        raise KeyError(f"{path}: no function '{function}' (has {sorted(prog.functions)})")
    fn = prog.functions[function]
    opset = OPSET.get(fn.opset, 19)
    block = fn.block_specializations[fn.opset]
    files = {}

    def blobs(name):
        if name not in files:
            files[name] = BlobFile(Path(weights_dir) / Path(name).name)
        return files[name]

    inputs, states = {}, {}
    for nvt in fn.inputs:
        dtype, shape = _value_type(nvt.type)
        (states if nvt.type.WhichOneof("type") == "stateType" else inputs)[nvt.name] = \
            Var(nvt.name, dtype, shape)
    consts, ops, const_types, constexpr_ops = {}, [], {}, []
    for o in block.operations:
        outputs = [Var(v.name, *_value_type(v.type)) for v in o.outputs]
        name = o.attributes["name"].immediateValue.tensor.strings.values[0] \
            if "name" in o.attributes else (outputs[0].name if outputs else o.type)
        if o.blocks and strict:
            raise UnsupportedOpError(f"unsupported MIL op '{o.type}' (output '{name}') in "
                                     f"function '{function}': control flow (nested blocks)")
        if o.type == "const":
            const_types[outputs[0].name] = outputs[0]
            if materialize:
                consts[outputs[0].name] = _compute(_value(o.attributes["val"], blobs))
            continue
        inputs_ = {}  # iOS16 constexpr ops carry their parameters as attributes
        for param, val in o.attributes.items():
            if param != "name":
                inputs_[param] = [("val", _value(val, blobs) if materialize
                                   else Var("", *_value_type(val.type)))]
        for param, arg in o.inputs.items():
            inputs_[param] = [("var", b.name) if b.WhichOneof("binding") == "name"
                              else ("val", _value(b.value, blobs) if materialize
                                    else Var("", *_value_type(b.value.type)))
                              for b in arg.arguments]
        op = Op(o.type, name, inputs_, outputs, opset=opset,
                tuple_params={"values"} if o.type in ("concat", "stack", "einsum") else set())
        if op.type not in OPS and op.type not in STATE_OPS:
            err = UnsupportedOpError(
                f"unsupported MIL op '{op.type}' (output '{op.output_name}') in function "
                f"'{function}' of {path}")
            if strict:
                raise err
            ops.append(op)
            continue
        if op.type.startswith("constexpr_"):  # weights: materialized once, as CoreML at load
            const_types[outputs[0].name] = outputs[0]
            constexpr_ops.append(op)
            if materialize:
                tmp = Program(path, function, {}, {}, [], [], consts, opset)
                consts[outputs[0].name] = _compute(tmp._execute(op, consts, {})[0])
            continue
        ops.append(op)
    program = Program(path, function, inputs, states, list(block.outputs), ops, consts, opset)
    program.const_types.update(const_types)
    program.constexpr_ops.extend(constexpr_ops)
    program.materialized = materialize
    return program


def time_predict(model: Program, data: dict, state: State = None, repeats: int = 3) -> float:
    """Best wall time of `repeats` predict calls, seconds (state copied: calls do not chain)."""
    best = float("inf")
    for _ in range(repeats):
        s = None if state is None else State(dict(state.values))
        t = time.perf_counter()
        model.predict(data, s)
        best = min(best, time.perf_counter() - t)
    return best
