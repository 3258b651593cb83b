"""RoPE scaling: the kinds the student supports, their checks, and their inverse frequencies.

`rope_scaling` is Hugging Face's / mlx-lm's mapping, spelled with `rope_type` (transformers) or
`type` (older configs, mlx-lm reads it first):

    rope_scaling: {rope_type: linear, factor: 2.0}        # positions / factor (Chen et al.,
                                                          # "Position Interpolation", arXiv 2306.15595)
    rope_scaling: {rope_type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0,
                   original_max_position_embeddings: 8192}  # Meta's Llama 3.1 frequency bands

The MLX student gets the scaling from mlx-lm (`mlx_lm.models.rope_utils.initialize_rope`); the
PyTorch mirror and the export take `inverse_frequencies` below, Meta's reference formula in
float64. Both are the same function of the wavelength except exactly on the low band edge,
where mlx-lm's strict comparison keeps the unscaled frequency and Meta's formula (continuous
there) gives frequency / factor; no integer `original_max_position_embeddings` puts a
wavelength 2 pi theta^(2i/d) exactly on that edge.
"""

import math
from typing import List, Optional

import numpy as np

SUPPORTED = ("default", "linear", "llama3")
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}  # mlx-lm's defaults


def type_key(scaling: dict) -> str:
    """The spelling a mapping uses for its kind: `rope_type` or `type`."""
    return "type" if "type" in scaling and "rope_type" not in scaling else "rope_type"


def scaling_type(scaling: Optional[dict]) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def check(scaling) -> List[tuple]:
    """Problems of a `rope_scaling` value as [(dotted field, problem)], [] when it is usable."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [("rope_scaling", f"must be a mapping, got {scaling!r}")]
    key = type_key(scaling)
    field = f"rope_scaling.{key}"
    if "type" in scaling and "rope_type" in scaling and scaling["type"] != scaling["rope_type"]:
        return [(field, f"type {scaling['type']!r} and rope_type {scaling['rope_type']!r} disagree")]
    kind = scaling.get(key)
    if kind not in SUPPORTED:
        return [(field, f"{kind!r} is not supported (one of {', '.join(SUPPORTED)})")]
    p = []
    if kind != "default" and not _positive(scaling.get("factor")):
        p.append(("rope_scaling.factor", f"must be a positive number, got {scaling.get('factor')!r}"))
    if kind == "llama3":
        s = {**LLAMA3_DEFAULTS, **scaling}
        for name in LLAMA3_DEFAULTS:
            if not _positive(s[name]):
                p.append((f"rope_scaling.{name}", f"must be a positive number, got {s[name]!r}"))
        if not p and s["high_freq_factor"] <= s["low_freq_factor"]:
            p.append(("rope_scaling.high_freq_factor",
                      f"{s['high_freq_factor']} must exceed low_freq_factor {s['low_freq_factor']}"))
    return p


def normalize(scaling: Optional[dict]) -> Optional[dict]:
    """The mapping written to config.json: `rope_type` spelling, llama3 defaults filled in (so
    mlx-lm and transformers read the same numbers); None for no scaling."""
    kind = scaling_type(scaling)
    if kind == "default":
        return None
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
    if kind == "llama3":
        out = {**LLAMA3_DEFAULTS, **out}
    return {"rope_type": kind, **out}


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict] = None) -> np.ndarray:
    """RoPE inverse frequencies (head_dim / 2,) float64, in radians per position.

    default: theta^(-2i/d). linear: that / factor. llama3 (Meta's Llama 3.1 reference): with
    wavelength w = 2 pi / f, f unchanged where w < L / high_freq_factor, f / factor where
    w > L / low_freq_factor, and between them (edges included) the blend
    (1 - s) f / factor + s f, s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor),
    L = original_max_position_embeddings (s is 1 at the high edge and 0 at the low edge).
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = scaling_type(scaling)
    if kind == "linear":
        return inv / scaling["factor"]
    if kind == "llama3":
        s = {**LLAMA3_DEFAULTS, **scaling}
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        return np.where(wavelen < old / hi, inv, np.where(wavelen > old / lo, inv / factor, blended))
    return inv
