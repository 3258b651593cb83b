"""Mirror -> CoreML: one mlprogram per enumerated function, merged into ONE multifunction
.mlpackage whose functions share weights (coremltools deduplicates identical constants).

Functions (docs/architecture.md ANE rules 1-3): for every enumerated context S, a
`decode_ctx{S}` (one token at `position`) and a `prefill_{T}_ctx{S}` per prefill length T
(T tokens at `position`); each reads and writes the fp16 states `k_cache` / `v_cache` of
shape (layers, kv_heads, head_dim, S).
A decode per context is the smallest design that keeps every shape static: a state's shape is
fixed per function, and a prefill must write the very state its decode reads, so prefill is
enumerated per context too. Memory and attention cost then follow the context the app picks.

Inputs: input_ids (1, T) int32, position (1,) int32 (the first token's absolute position).
Output: logits (1, 1, vocab) of the chunk's last token (fp16); all_logits=True gives (1, T, vocab).
Long prompts are prefilled chunk by chunk. A last chunk may be right-padded: the padded
positions are invisible to every real query (causal mask) and are overwritten by the decode
steps that follow; the next-token logits then come from decoding the last prompt token again
at its own position (it re-writes identical K/V).
"""

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .mirror import Mirror, example_inputs

MIN_COREMLTOOLS = (8, 0)  # ct.StateType, iOS18 target and multifunction save


class ExportError(RuntimeError):
    """An export that cannot proceed; the message says why and what to change."""


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    kind: str  # "prefill" | "decode"
    length: int  # tokens per call
    context: int  # KV-cache length


def plan(contexts, prefill_lengths) -> list:
    """The functions to export, decode first for each context."""
    specs = []
    for S in contexts:
        specs.append(FunctionSpec(f"decode_ctx{S}", "decode", 1, S))
        for T in prefill_lengths:
            if T > S:
                raise ExportError(f"prefill length {T} exceeds the context {S}")
            specs.append(FunctionSpec(f"prefill_{T}_ctx{S}", "prefill", T, S))
    return specs


def coremltools():
    """Import coremltools, checking that it has what this exporter needs."""
    try:
        import coremltools as ct
    except ImportError as e:
        raise ExportError("coremltools is not installed: pip install 'mlx-student[export]'") from e
    version = tuple(int(x) for x in ct.__version__.split(".")[:2] if x.isdigit())
    if version < MIN_COREMLTOOLS or not hasattr(ct, "StateType"):
        raise ExportError(f"coremltools {ct.__version__} is too old: stateful KV caches and "
                          f"multifunction packages need >= {'.'.join(map(str, MIN_COREMLTOOLS))}")
    return ct


def convert_function(mirror: Mirror, spec: FunctionSpec, all_logits: bool = False):
    """Trace one static function of the mirror and convert it (fp16 compute, iOS18 target).
    Returns an MLModel (not compiled; Linux cannot load it for prediction)."""
    ct = coremltools()
    fn = mirror.function(spec.length, spec.context, stateful=True, all_logits=all_logits).eval()
    ids, pos = example_inputs(spec.length)
    with torch.no_grad():
        traced = torch.jit.trace(fn, (ids, pos), check_trace=False)
    shape = mirror.cache_shape(spec.context)
    state = lambda name: ct.StateType(  # noqa: E731
        wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name="input_ids", shape=(1, spec.length), dtype=np.int32),
                ct.TensorType(name="position", shape=(1,), dtype=np.int32)],
        outputs=[ct.TensorType(name="logits", dtype=np.float16)],
        states=[state("k_cache"), state("v_cache")],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram",
        skip_model_load=True,
    )


def save_multifunction(models: dict, path, default: str, metadata: dict = None):
    """Merge {function name: MLModel} into one .mlpackage at `path` (weights deduplicated)."""
    ct = coremltools()
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".functions-") as tmp:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, model in models.items():
            p = Path(tmp) / f"{name}.mlpackage"
            if metadata:
                model.user_defined_metadata.update({k: str(v) for k, v in metadata.items()})
            model.save(str(p))
            desc.add_function(str(p), src_function_name="main", target_function_name=name)
        desc.default_function_name = default
        ct.utils.save_multifunction(desc, str(path))
    for f in path.rglob("*"):  # coremltools leaves some files 0600: make them ordinary
        f.chmod(0o755 if f.is_dir() else 0o644)
    return path


def package_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _array(a) -> dict:
    """{shape, dtype} of an ArrayFeatureType."""
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    return {"shape": [int(x) for x in a.shape],
            "dtype": ArrayFeatureType.ArrayDataType.Name(a.dataType).lower()}


def load_program(path):
    """(spec, MIL program) of a saved .mlpackage, weights read from disk (works on Linux)."""
    ct = coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return spec, load_mil(spec, specification_version=spec.specificationVersion,
                          file_weights_dir=model.weights_dir)


def describe(path) -> dict:
    """Re-load a saved package's spec and MIL program: per function its inputs, outputs,
    states, op counts and how each conv/gather weight is stored (const or constexpr op)."""
    spec, prog = load_program(path)
    out = {"default_function": spec.description.defaultFunctionName, "functions": {}}
    for f in spec.description.functions:
        ops = prog.functions[f.name].operations
        out["functions"][f.name] = {
            "inputs": {i.name: _array(i.type.multiArrayType) for i in f.input},
            "outputs": {o.name: _array(o.type.multiArrayType) for o in f.output},
            "states": {s.name: _array(s.type.stateType.arrayType) for s in f.state},
            "ops": dict(Counter(op.op_type for op in ops)),
            "weights": _weight_storage(ops),
        }
    return out


def _weight_storage(ops) -> dict:
    """{weight name: producing op type} for the weight operand of every conv and gather."""
    out = {}
    for op in ops:
        if op.op_type == "conv":
            w = op.weight
        elif op.op_type == "gather":
            w = op.x
        else:
            continue
        src = w.op
        out[src.name] = src.op_type
    return out
