"""The judge to one CoreML package, checked against MLX through the reference MIL executor.

    mlx_student.judge_export --judge runs/judge [--lengths 512 1024 2048] [--compression int8]

One multifunction .mlpackage (export/convert.py's save: the functions share their weights), a
function `score_{T}` per enumerated length T (default: the judge config's `contexts`; judge_4b:
512 / 1024 / 2048):

    inputs   input_ids (1, T) int32   the judge input (arbiter/judge/model.py encode), right-padded
             length    (1,) int32     real tokens (>= 1); the heads read token length - 1
    outputs  score (1, 1), clause_logits (1, clauses), fp16
    states   k_cache, v_cache (layers, kv_heads, head_dim, T) fp16: scratch of one call (a fresh
             MLState per call, or reused: every call rewrites positions [0, T))

The body is export/mirror.py's PyTorch mirror (channels-first, 1x1 convs, static shapes, the
fp16-safe RMSNorm), the final norm applied to the last real token only, then the two heads as
1x1 convs. Weights are compressed by export/compress.py (int8 per channel by default; heads, norms
and RoPE tables stay fp16). The check (`verify`) runs every function on the reference MIL
executor (export/mil_executor.py, fp16 emulation) against the MLX judge on real pair texts and
reports the score error against an fp16 error model (see `score_tolerance`) and the pairwise
decision agreement. Writes <out>/judge.mlpackage and <out>/judge_export.json, atomically.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx_student  # noqa: F401  (first: picks OpenBLAS on Linux before mlx loads)
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from export import mil_executor
from export.compress import FORMATS, Compression, compress
from export.convert import ExportError, coremltools, package_bytes, save_multifunction
from export.mirror import load_mirror
from mlx_student.files import atomic_dir

from . import model as judge_model

FP16_UNIT = 2.0 ** -11  # fp16 unit roundoff
INT8_UNIT = 1 / 254  # half a step of a symmetric int8 grid, relative to the row's max |w|


class ScoreFunction(torch.nn.Module):
    """score_{T}: (input_ids (1, T), length (1,)) -> (score (1, 1), clause_logits (1, K))."""

    def __init__(self, mirror, heads: dict, length: int):
        super().__init__()
        self.mirror, self.length = mirror, length
        t = lambda a: torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, np.float32)),  # noqa: E731
                                         requires_grad=False)
        self.score_weight = t(heads["score_head.weight"][:, :, None, None])
        self.score_bias = t(heads["score_head.bias"])
        self.clause_weight = t(heads["clause_head.weight"][:, :, None, None])
        self.clause_bias = t(heads["clause_head.bias"])
        shape = mirror.cache_shape(length)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, input_ids, length):
        T, m = self.length, self.mirror
        pos = length * 0  # position 0, computed in-graph (a traced constant would fold to a
        # (1,) const that the converter's int() cannot take as the cache-write offset)
        x = m.blocks(input_ids, pos, self.k_cache, self.v_cache, T, T)  # (1, C, 1, T)
        last = torch.index_select(x, 3, length - 1)  # (1, C, 1, 1)
        h = m._rms_norm(last, m.norm)
        score = F.conv2d(h, self.score_weight).reshape(1, 1) + self.score_bias
        clauses = F.conv2d(h, self.clause_weight).reshape(1, -1) + self.clause_bias
        return score, clauses


def convert_score(mirror, heads: dict, length: int):
    """Trace and convert one score function (fp16 compute, iOS18 target, stateful scratch)."""
    ct = coremltools()
    fn = ScoreFunction(mirror, heads, length).eval()
    ids, n = torch.zeros((1, length), dtype=torch.int32), torch.tensor([length], dtype=torch.int32)
    with torch.no_grad():
        traced = torch.jit.trace(fn, (ids, n), check_trace=False)
    state = lambda name: ct.StateType(  # noqa: E731
        wrapped_type=ct.TensorType(shape=mirror.cache_shape(length), dtype=np.float16), name=name)
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name="input_ids", shape=(1, length), dtype=np.int32),
                ct.TensorType(name="length", shape=(1,), dtype=np.int32)],
        outputs=[ct.TensorType(name="score", dtype=np.float16),
                 ct.TensorType(name="clause_logits", dtype=np.float16)],
        states=[state("k_cache"), state("v_cache")],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        convert_to="mlprogram",
        skip_model_load=True,
    )


def score_tolerance(hidden: np.ndarray, weight: np.ndarray, layers: int, fmt: str) -> np.ndarray:
    """Bound on |score_package - score_mlx| per row: the score is w . h over C channels, and h
    carries a relative error of about 2 (layers + 1) rounding units (each layer's two residual
    adds round in fp16, the final norm once more; int8 weights add half a grid step per
    projection). The bound is that relative error times sum |w_i h_i| (the dot product's
    condition), so it scales with the score's own magnitude. hidden (N, C), weight (C,)."""
    unit = FP16_UNIT + (INT8_UNIT if fmt == "int8" else 0.0)
    return 2 * (layers + 1) * unit * np.abs(hidden * weight[None, :]).sum(axis=1) + FP16_UNIT


def verify(package, judge, tokenizer, texts: list, lengths: list, fmt: str) -> dict:
    """Run every score function of `package` on the executor for (prompt, candidate) `texts`
    and compare with the MLX judge. Returns per function the max |error|, the max of error /
    tolerance and the sign agreement of the pairwise margins (consecutive candidates)."""
    import mlx.core as mx

    out = {}
    w = np.array(judge.score_head.weight, np.float64)[0]
    layers = judge.backbone.args.num_hidden_layers
    for T in lengths:
        prog = mil_executor.load(package, f"score_{T}")
        seqs = [judge_model.encode(tokenizer, p, c, T, judge.spec.separator) for p, c in texts]
        ids, n = judge_model.batch_ids(seqs, pad_to=T)
        s_mlx, c_mlx = judge(ids, n)
        hidden = np.array(judge.hidden(ids, n), np.float64)
        got_s, got_c = [], []
        for row, k in zip(np.array(ids), np.array(n)):
            r = prog.predict({"input_ids": row[None].astype(np.int32), "length": np.array([k], np.int32)},
                             prog.make_state())
            got_s.append(float(r["score"].reshape(-1)[0]))
            got_c.append(r["clause_logits"].reshape(-1).astype(np.float64))
        s_mlx = np.array(s_mlx, np.float64)
        err = np.abs(np.array(got_s) - s_mlx)
        tol = score_tolerance(hidden, w, layers, fmt)
        d_mlx, d_pkg = s_mlx[0::2] - s_mlx[1::2], np.array(got_s)[0::2] - np.array(got_s)[1::2]
        out[f"score_{T}"] = {
            "rows": len(seqs), "max_abs_err": float(err.max()), "max_err_over_tol": float((err / tol).max()),
            "clause_max_abs_err": float(np.abs(np.array(got_c) - np.array(c_mlx.astype(mx.float32))).max()),
            "margin_sign_agreement": float(np.mean(np.sign(d_mlx) == np.sign(d_pkg))),
            "seconds_per_call": None}
        t = time.perf_counter()
        prog.predict({"input_ids": np.array(ids)[:1].astype(np.int32), "length": np.array(n)[:1]},
                     prog.make_state())
        out[f"score_{T}"]["seconds_per_call"] = round(time.perf_counter() - t, 3)
    return out


def export_judge(judge_dir, out, lengths=None, compression: str = "int8", texts=None) -> dict:
    """Convert, compress, save and verify; returns the manifest (also <out>/judge_export.json)."""
    judge_dir, out = Path(judge_dir), Path(out)
    config, spec = judge_model.read_spec(judge_dir)
    lengths = sorted(set(lengths or config.contexts))
    if max(lengths) > max(config.max_position_embeddings, max(config.contexts)):
        raise ExportError(f"length {max(lengths)} is above the judge's positions "
                          f"{config.max_position_embeddings}")
    mirror = load_mirror(judge_dir, max_positions=max(lengths))
    heads = load_file(str(judge_dir / spec.heads))
    fmt = Compression(weights=compression, embedding=compression)
    models, timings = {}, {}
    for T in lengths:
        tic = time.perf_counter()
        models[f"score_{T}"] = compress(convert_score(mirror, heads, T), fmt)
        timings[f"score_{T}"] = round(time.perf_counter() - tic, 2)
        print(f"  score_{T}: converted in {timings[f'score_{T}']} s", flush=True)
    judge, tokenizer, _ = judge_model.load(judge_dir)
    texts = texts or default_texts()
    manifest = {"format": "mlx-student-judge-export/1", "source": str(judge_dir), "judge": spec.__dict__,
                "lengths": lengths, "compression": fmt.describe(), "package": "judge.mlpackage",
                "inputs": {"input_ids": "(1, T) int32, right-padded", "length": "(1,) int32"},
                "outputs": {"score": "(1, 1) fp16", "clause_logits": f"(1, {len(spec.clauses)}) fp16"},
                "convert_seconds": timings}
    with atomic_dir(out) as tmp:
        pkg = save_multifunction(models, tmp / "judge.mlpackage", f"score_{lengths[0]}")
        manifest["package_bytes"] = package_bytes(pkg)
        manifest["verify"] = verify(pkg, judge, tokenizer, texts, lengths, compression)
        manifest["verify_backend"] = "reference MIL executor (export/mil_executor.py, fp16 emulation)"
        (tmp / "judge_export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def default_texts() -> list:
    """Four (prompt, candidate) pairs of real text (this file's docstring lines) for verify."""
    lines = [x.strip() for x in __doc__.splitlines() if len(x.strip()) > 30]
    return [(lines[0], lines[i + 1]) for i in range(4)]


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.judge_export",
        description="Export a judge checkpoint to one CoreML package "
        "(a score function per length), verified on the MIL executor.")
    p.add_argument("--judge", required=True, help="judge checkpoint folder")
    p.add_argument("--out", help="output folder (default artifacts/<judge name>)")
    p.add_argument("--lengths", type=int, nargs="+", help="enumerated input lengths (default: the "
                   "config's contexts)")
    p.add_argument("--compression", choices=FORMATS, default="int8", help="weight format (default int8)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out or Path("artifacts") / Path(args.judge).name)
    try:
        m = export_judge(args.judge, out, args.lengths, args.compression)
    except (ExportError, judge_model.JudgeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, v in m["verify"].items():
        print(f"{name}: max |score err| {v['max_abs_err']:.3g} ({v['max_err_over_tol']:.2f} of the "
              f"fp16 error model), margin signs agree {v['margin_sign_agreement']:.0%}")
    print(f"wrote {out / 'judge.mlpackage'} ({m['package_bytes'] / 1e6:.1f} MB) and judge_export.json")


if __name__ == "__main__":
    main()
