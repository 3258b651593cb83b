"""Weight compression at export (coremltools.optimize.coreml, applied per function before the
multifunction merge; the results are deterministic, so the merge still deduplicates them).

Formats (the layouts of mlx_student/info.py):
  fp16  2 bytes/param, no compression
  int8  symmetric per-output-channel linear, one fp16 scale per row (the ANE format)
  int4  symmetric block-wise linear, one scale per `block_size` inputs of a row (a GPU format)
  lut4 / lut8  palettized: a 16 / 256-entry fp16 LUT per `lut_group_size` output channels
        (the ANE-friendly 4-bit); `lut_mode` uniform (no extra dependency) or kmeans
        (needs scikit-learn)

The projections of every layer use `weights`; the vocabulary table uses `embedding` (one table
when tied: the LM head is the same constants); an untied LM head uses `lm_head` (default:
`embedding`). Norm scales and the RoPE tables always stay fp16.

A QAT checkpoint (config.json `student.qat`, mlx_student/quant.py) carries its scales in
qat_scales.safetensors: `exact_weights` reads them and the weights (which are q * s exactly) back
into integers, and `compress(..., exact=...)` writes those integers and fp16 scales into the
package as they are, where the format matches the QAT's (int8 per channel, or int4 in blocks of
the QAT group), instead of letting coremltools re-derive them: the package's dequantized weights
are then the QAT model's, bit for bit in fp16, whether its scales were minmax or learned.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

FORMATS = ("fp16", "int8", "int4", "lut4", "lut8")
PROJECTION = re.compile(r"layers_(\d+)_(q|k|v|o|gate|up|down)_proj")
EMBEDDING = re.compile(r"(^|_)embed_(\d+)")
LM_HEAD = re.compile(r"(^|_)head_(\d+)")
QAT_SCALES = "qat_scales.safetensors"  # mlx_student.quant.SIDECAR
QAT_FORMATS = {8: "int8", 4: "int4"}


@dataclass
class Compression:
    weights: str = "int8"
    embedding: str = "int8"
    lm_head: Optional[str] = None
    block_size: int = 32
    lut_group_size: int = 16
    lut_mode: str = "uniform"

    def __post_init__(self):
        if self.lm_head is None:
            self.lm_head = self.embedding
        for k in ("weights", "embedding", "lm_head"):
            if getattr(self, k) not in FORMATS:
                raise ValueError(f"compression.{k}: {getattr(self, k)!r} is not one of "
                                 f"{', '.join(FORMATS)}")
        if self.lut_mode not in ("uniform", "kmeans"):
            raise ValueError(f"compression.lut_mode: {self.lut_mode!r} is not uniform or kmeans")
        if self.lut_mode == "kmeans" and any(f.startswith("lut") for f in self.formats()):
            try:
                import sklearn  # noqa: F401
            except ImportError:
                raise ValueError("compression.lut_mode kmeans needs scikit-learn "
                                 "(pip install scikit-learn), or use lut_mode: uniform") from None

    def formats(self) -> tuple:
        return (self.weights, self.embedding, self.lm_head)

    def describe(self) -> dict:
        d = dict(self.__dict__)
        d["formats"] = {f: DESCRIPTIONS[f] for f in sorted(set(self.formats()))}
        return d


DESCRIPTIONS = {
    "fp16": "fp16 weights",
    "int8": "int8 symmetric per-output-channel, fp16 scale per row",
    "int4": "int4 symmetric block-wise along the input axis, fp16 scale per block",
    "lut4": "4-bit palettized, fp16 LUT per group of output channels",
    "lut8": "8-bit palettized, fp16 LUT per group of output channels",
}


def role(name: str) -> Optional[str]:
    """Which compression setting a weight constant of the converted mirror follows."""
    if PROJECTION.search(name):
        return "weights"
    if EMBEDDING.search(name):
        return "embedding"
    if LM_HEAD.search(name):
        return "lm_head"
    return None  # norms, RoPE tables, small constants: fp16


def op_config(fmt: str, c: Compression):
    import coremltools.optimize.coreml as cto

    if fmt == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                           granularity="per_channel", weight_threshold=0)
    if fmt == "int4":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4",
                                           granularity="per_block", block_size=c.block_size,
                                           weight_threshold=0)
    if fmt in ("lut4", "lut8"):
        return cto.OpPalettizerConfig(mode=c.lut_mode, nbits=int(fmt[3:]),
                                      granularity="per_grouped_channel",
                                      group_size=c.lut_group_size, weight_threshold=0)
    return None


def weight_names(mlmodel) -> list:
    """Names of the const ops of every function of an (unsaved) converted model."""
    prog = mlmodel._mil_program
    return [op.name for f in prog.functions.values() for op in f.operations
            if op.op_type == "const"]


@dataclass
class ExactWeights:
    """A QAT checkpoint's integers: {weight name: (int8 q, fp16 scales (rows, groups))}."""
    bits: int
    group_size: int
    weights: dict
    offsets: list  # first row of each vocabulary chunk of the mirror

    def fits(self, fmt: str, c: Compression) -> bool:
        return fmt == QAT_FORMATS[self.bits] and (self.bits == 8 or c.block_size == self.group_size)

    def source(self, name: str):
        """(checkpoint weight name, first row) of a converted weight constant, or None."""
        m = PROJECTION.search(name)
        if m:
            block = "self_attn" if m.group(2) in "qkvo" else "mlp"
            return f"model.layers.{m.group(1)}.{block}.{m.group(2)}_proj.weight", 0
        for pattern, weight in ((EMBEDDING, "model.embed_tokens.weight"), (LM_HEAD, "lm_head.weight")):
            m = pattern.search(name)
            if m:
                return weight, self.offsets[int(m.group(2))]
        return None


def exact_weights(model_dir, qat: dict, offsets: list) -> ExactWeights:
    """The integers and scales of a QAT checkpoint: q = w / s exactly, since the saved weights
    are q * s. Raises ValueError, naming the weight, if one is off its grid."""
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    if not (model_dir / QAT_SCALES).exists():
        raise ValueError(f"{model_dir}: a QAT checkpoint (student.qat) without {QAT_SCALES}")
    scales = load_file(model_dir / QAT_SCALES)
    weights = {}
    for f in sorted(model_dir.glob("model*.safetensors")):
        weights.update(load_file(f))
    qmax = 2 ** (qat["bits"] - 1) - 1
    out = {}
    for key, s in scales.items():
        if not key.endswith(".weight_scale"):
            continue
        name = key[: -len("_scale")]
        w = weights[name].astype(np.float64)
        q = w.reshape(*s.shape, -1) / s.astype(np.float64)[..., None]
        ints = np.rint(q)
        if not np.array_equal(ints, q) or np.abs(ints).max() > qmax:
            raise ValueError(f"{model_dir}: {name} is not on the grid of its scales in {QAT_SCALES} "
                             "(edited after QAT?)")
        out[name] = (ints.astype(np.int8).reshape(w.shape), s.astype(np.float16))
    return ExactWeights(qat["bits"], qat["group_size"], out, offsets)


def _given(mlmodel, c: Compression, exact: ExactWeights) -> dict:
    """{const name: (integers, scales)} shaped as the constants, for the weights whose format
    is the QAT's."""
    from coremltools.converters.mil.mil import types

    dtype = types.nptype_from_builtin(types.int4 if exact.bits == 4 else types.int8)
    given = {}
    for f in mlmodel._mil_program.functions.values():
        for op in f.operations:
            r = role(op.name) if op.op_type == "const" else None
            src = exact.source(op.name) if r and exact.fits(getattr(c, r), c) else None
            if src is None or src[0] not in exact.weights:
                continue
            q, s = exact.weights[src[0]]
            shape = op.outputs[0].shape  # (rows, inputs, 1, 1)
            rows = slice(src[1], src[1] + shape[0])
            given[op.name] = (q[rows].reshape(shape).astype(dtype),
                              s[rows].reshape(shape[0], s.shape[1], 1, 1))
    return given


def _write_given(mlmodel, given: dict):
    """The model with each named weight constant replaced by its given integers and scales
    (constexpr_blockwise_shift_scale, the op coremltools' own quantizer writes)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.models.utils import _apply_graph_pass

    class WriteGiven(AbstractGraphPass):
        def apply(self, prog):
            for f in prog.functions.values():
                self.rewrite(f)

        @block_context_manager
        def rewrite(self, block):
            for op in list(block.operations):
                if op.op_type != "const" or op.name not in given:
                    continue
                data, scale = given[op.name]
                new = mb.constexpr_blockwise_shift_scale(
                    data=data, scale=scale, before_op=op, name=op.name + "_quantized")
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0],
                                                   new_var=new, no_check_var_types=True)
                block.remove_ops([op])

    return _apply_graph_pass(mlmodel, WriteGiven())


def compress(mlmodel, c: Compression, exact: Optional[ExactWeights] = None):
    """The model with its weights compressed as `c` says (returns a new MLModel); with
    `exact`, the QAT integers and scales where the format is the QAT's."""
    import coremltools.optimize.coreml as cto

    given = _given(mlmodel, c, exact) if exact else {}
    if given:
        mlmodel = _write_given(mlmodel, given)
    linear, lut = {}, {}
    for name in weight_names(mlmodel):
        r = role(name)
        fmt = getattr(c, r) if r else "fp16"
        cfg = op_config(fmt, c)
        if cfg is not None and not name.startswith(tuple(given)):  # nor their int data
            (lut if fmt.startswith("lut") else linear)[name] = cfg
    if linear:
        mlmodel = cto.linear_quantize_weights(
            mlmodel, cto.OptimizationConfig(op_name_configs=linear))
    if lut:
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=lut))
    return mlmodel


# ---------------------------------------------------------------- what the saved package holds
RANK = {"fp16": 0, "int8": 1, "lut8": 1, "int4": 2, "lut4": 2}  # coarser formats rank higher
_BITS = {"INT8": "int8", "INT4": "int4", "UINT8": "lut8", "UINT4": "lut4"}


def _stored_format(op) -> str:
    """The storage of one constexpr weight op of a saved program (mil_executor.Op, not
    materialized): int8 / int4 (constexpr_blockwise_shift_scale's data), lut4 / lut8
    (constexpr_lut_to_dense's indices), else the op type."""
    arg = {"constexpr_blockwise_shift_scale": "data", "constexpr_affine_dequantize":
           "quantized_data", "constexpr_lut_to_dense": "indices"}.get(op.type)
    if arg is None or arg not in op.inputs:
        return op.type
    kind, var = op.inputs[arg][0]
    return _BITS.get(getattr(var, "dtype", None), op.type) if kind == "val" else op.type


def _why(fmt: str, shape: tuple, c: Compression) -> str:
    if fmt.startswith("lut") and shape[0] % c.lut_group_size:
        return f"lut_group_size {c.lut_group_size} does not divide its {shape[0]} output channels"
    if fmt == "int4" and shape[1] % c.block_size:
        return f"block_size {c.block_size} does not divide its {shape[1]} inputs"
    return "coremltools left it so"


def read_storage(package, c: Compression, tied: bool) -> dict:
    """Each weight's storage as the saved package's MIL program holds it (its default function;
    every function shares the same constants), against the request `c`. Returns
    {"weights" | "embedding" | "lm_head": the coarsest stored format of that role,
     "storage": {role: {format: number of constants}}, "differs": [{role, weights, requested,
     stored, reason}, ...] (empty when the package is what was asked)}. A tied model's LM head
    is the embedding's constants: its row says so when `c.lm_head` asked for another format."""
    from .mil_executor import load

    prog = load(package, materialize=False, strict=False)
    found = {}  # weight name -> (role, stored format, shape)
    for op in prog.constexpr_ops:
        r = role(op.outputs[0].name)
        if r:
            found[op.outputs[0].name] = (r, _stored_format(op), op.outputs[0].shape)
    for name, var in prog.const_types.items():
        r = role(name)
        if r and name not in found and len(var.shape) == 4:  # conv weights (rows, in, 1, 1)
            found[name] = (r, {"FLOAT16": "fp16", "FLOAT32": "fp32"}.get(var.dtype, var.dtype),
                           var.shape)
    storage, differs = {}, {}
    for name, (r, fmt, shape) in sorted(found.items()):
        storage.setdefault(r, {}).setdefault(fmt, 0)
        storage[r][fmt] += 1
        want = getattr(c, r)
        if fmt != want:
            key = (r, fmt, _why(want, shape, c))
            differs.setdefault(key, []).append(name)
    out = {r: max(storage.get(r, {"fp16": 0}), key=lambda f: RANK.get(f, 3))
           for r in ("weights", "embedding")}
    out["lm_head"] = out["embedding"] if tied else max(storage.get("lm_head", {"fp16": 0}),
                                                       key=lambda f: RANK.get(f, 3))
    rows = [{"role": r, "weights": names, "requested": getattr(c, r), "stored": fmt,
             "reason": why} for (r, fmt, why), names in differs.items()]
    if tied and c.lm_head != c.embedding:
        rows.append({"role": "lm_head", "weights": [], "requested": c.lm_head,
                     "stored": out["embedding"], "reason": "the model is tied: its LM head is "
                     f"the embedding's constants (compression.embedding {c.embedding})"})
    return {**out, "storage": storage, "differs": rows}
