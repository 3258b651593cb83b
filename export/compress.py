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
"""

import re
from dataclasses import dataclass
from typing import Optional

FORMATS = ("fp16", "int8", "int4", "lut4", "lut8")
PROJECTION = re.compile(r"layers_\d+_(q|k|v|o|gate|up|down)_proj")
EMBEDDING = re.compile(r"(^|_)embed_\d+")
LM_HEAD = re.compile(r"(^|_)head_\d+")


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


def compress(mlmodel, c: Compression):
    """The model with its weights compressed as `c` says (returns a new MLModel)."""
    import coremltools.optimize.coreml as cto

    linear, lut = {}, {}
    for name in weight_names(mlmodel):
        r = role(name)
        fmt = getattr(c, r) if r else "fp16"
        cfg = op_config(fmt, c)
        if cfg is not None:
            (lut if fmt.startswith("lut") else linear)[name] = cfg
    if linear:
        mlmodel = cto.linear_quantize_weights(
            mlmodel, cto.OptimizationConfig(op_name_configs=linear))
    if lut:
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=lut))
    return mlmodel
