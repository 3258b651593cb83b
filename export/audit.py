"""fp16 headroom audit (docs/architecture.md ANE rule 4), on the fp32 mirror before conversion.

A calibration batch goes through the mirror in fp32 while it records max |x| per tap:
  residual            the residual stream after every attention and MLP block
  norm_mean_square    the RMSNorm accumulator, mean((x / max|x|)^2): at most 1 by construction
  attention_logits    q.k / sqrt(d) before the mask
  swiglu_product      silu(gate) * up, the input of down_proj
  logits              the LM head output
Every tap must stay below FP16_MAX / margin; the table goes into the export manifest.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from .mirror import TAPS, Mirror

FP16_MAX = 65504.0


class Fp16Overflow(RuntimeError):
    """A tap passes the fp16 margin; the message holds the table."""


def calibration_ids(tokenizer_dir=None, length: int = 128, rows: int = 2, vocab_size: int = None,
                    text: str = None, seed: int = 0) -> np.ndarray:
    """(rows, length) token ids: real text through the checkpoint's tokenizer (by default the
    source of Python's own `json` package), or seeded random ids without a tokenizer."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        if text is None:
            import json

            text = Path(json.__file__).read_text()
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ids = tok(text)["input_ids"]
        need = rows * length
        if len(ids) >= need:
            return np.array(ids[:need], dtype=np.int64).reshape(rows, length)
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(rows, length))


def audit(mirror: Mirror, ids: np.ndarray, margin: float = 2.0) -> dict:
    """Run `ids` (rows, T) through the fp32 mirror; max |x| per tap against FP16_MAX / margin."""
    rows, T = ids.shape
    fn = mirror.function(T, T, all_logits=True)
    shape = mirror.cache_shape(T)
    mirror.taps = {}
    try:
        with torch.no_grad():
            for r in range(rows):
                row = torch.tensor(ids[r:r + 1], dtype=torch.int32)
                fn(row, torch.tensor([0], dtype=torch.int32), torch.zeros(shape),
                   torch.zeros(shape))
        taps = mirror.taps
    finally:
        mirror.taps = None
    limit = FP16_MAX / margin
    table = {}
    for name in TAPS:
        m = taps.get(name, 0.0)
        table[name] = {"max_abs": m, "headroom": (FP16_MAX / m) if m else float("inf"),
                       "ok": bool(np.isfinite(m) and m <= limit)}
    return {"fp16_max": FP16_MAX, "margin": margin, "limit": limit, "tokens": int(rows * T),
            "taps": table, "ok": all(t["ok"] for t in table.values())}


def format_table(result: dict) -> str:
    lines = [f"fp16 audit ({result['tokens']} tokens; limit {result['limit']:.0f} = "
             f"65504 / margin {result['margin']:g}):",
             f"  {'tap':<20}{'max |x|':>14}{'headroom':>12}"]
    for name, t in result["taps"].items():
        lines.append(f"  {name:<20}{t['max_abs']:>14.4g}{t['headroom']:>11.1f}x"
                     f"{'' if t['ok'] else '  OVER'}")
    return "\n".join(lines)


def check(result: dict, on_fail: str = "fail", stream=None):
    """on_fail: "fail" raises Fp16Overflow, "warn" prints a warning, "off" does nothing."""
    if result["ok"] or on_fail == "off":
        return
    over = [k for k, t in result["taps"].items() if not t["ok"]]
    msg = (f"fp16 headroom: {', '.join(over)} above {result['limit']:.0f}\n"
           + format_table(result))
    if on_fail == "fail":
        raise Fp16Overflow(msg + "\n(set fp16_audit: warn to export anyway)")
    print(f"WARNING: {msg}", file=stream or sys.stderr)
