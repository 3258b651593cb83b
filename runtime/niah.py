"""Needle-in-a-haystack eval over a context length x needle depth grid (RULER cases, gkamradt's
heatmap), for the MLX engine, the CoreML engine, any OpenAI-compatible endpoint, and two
reference backends (`oracle` answers right, `random` picks among the candidates: 100 % and
chance, the checks that the scoring can tell them apart).

    mlx_student.niah --model models/smollm2-135m-instruct --lengths 1024 2048 4096 8192 \
        --depths 0 0.25 0.5 0.75 1 --kinds single --out artifacts/niah
    mlx_student.niah --backend coreml --package out/student.mlpackage --model runs/pilot ...
    mlx_student.niah --backend openai --base-url http://127.0.0.1:8080/v1 --api-model m --model <tokenizer folder>

Cases come from runtime/needles.py (exact token positions, real local haystacks). For the
engines the prompt goes in as token ids; the prefix up to the last prompt token is prefilled
once, then (1) the expected value and the other candidates are scored teacher-forced from that
cache (rewound after each), and (2) the answer is decoded greedily by mlx-lm's generate_step
until EOS or the answer budget (as RULER: no stop string, so "is:\n1234567" still counts).
An OpenAI endpoint gets the prompt as chat text (its own tokenizer places the needle; depth is
exact only when it matches ours) and gives no log-probabilities.

Writes niah.json (every case: needle positions, answer, score, value log-probability and rank;
per-cell and per-length means; gates), niah.md and niah.png (heatmaps: exact-match score and
the rate at which the expected value ranks first). Gates: minimum mean score per length, from
the seed system by default (0.95 at 4k, 0.90 at 16k); a gated length outside the grid is
"not measured".
"""

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load_tokenizer

from mlx_student.config import ConfigError, apply_config
from mlx_student.files import write_json_atomic

from .needles import (
    HAYSTACKS,
    KINDS,
    Haystack,
    make_case,
    rank_of_first,
    string_match_all,
)

BACKENDS = ("mlx", "coreml", "openai", "oracle", "random")
DEFAULTS = {
    "backend": "mlx", "package": None, "coreml_backend": "auto", "base_url": None,
    "api_model": None, "lengths": [1024, 2048, 4096], "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "kinds": ["single"], "haystack": "docs", "cases": 1, "n_candidates": 10,
    "max_new_tokens": None, "prefill_step": 2048, "seed": 0, "out": "artifacts/niah",
    "gates": {4096: 0.95, 16384: 0.90},
}
REWRITE_S = 60.0  # a long run's partial report is refreshed this often
MAX_NEW_TOKENS = {"single": 16, "multikey": 16, "multivalue": 48, "multiquery": 48}


# --- backends: answer(case) -> {prediction, logprobs (candidates') or None} -------------------
class EngineBackend:
    """An engine of runtime/generate.py (MLXEngine, CoreMLEngine)."""

    def __init__(self, engine, prefill_step: int = 2048):
        self.engine, self.prefill_step = engine, prefill_step
        self.name = engine.name
        self.tokenizer = engine.tokenizer

    def _logits(self, ids, cache):
        """Logits (len(ids), vocab) after each of `ids`. The CoreML engine returns only the last
        position's, so it is fed one token at a time."""
        if self.engine.name == "coreml":
            return mx.concatenate([self.engine(mx.array([[t]]), cache=cache)[0] for t in ids])
        return self.engine(mx.array([ids]), cache=cache)[0]

    def answer(self, case) -> dict:
        ids, cache = case.prompt_ids, self.engine.make_cache()
        tic = time.perf_counter()
        head = ids[:-1]
        for i in range(0, len(head), self.prefill_step):
            self.engine(mx.array([head[i:i + self.prefill_step]]), cache=cache)
            mx.eval([c.state for c in cache])
        prefill_s = time.perf_counter() - tic
        logprobs = []
        for value in case.candidates:
            v = self.tokenizer.encode(" " + value, add_special_tokens=False)
            lp = self._logits([ids[-1]] + v[:-1], cache).astype(mx.float32)
            lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
            logprobs.append(float(mx.sum(lp[mx.arange(len(v)), mx.array(v)])))
            for c in cache:
                c.trim(len(v))
        eos = set(self.tokenizer.eos_token_ids)
        out = []
        for token, _ in generate_step(mx.array([ids[-1]]), self.engine, prompt_cache=cache,
                                      max_tokens=case.max_new_tokens, sampler=make_sampler(0.0)):
            if int(token) in eos:
                break
            out.append(int(token))
        return {"prediction": self.tokenizer.decode(out), "logprobs": logprobs,
                "prefill_s": prefill_s}


class OpenAIBackend:
    """Any OpenAI-compatible /v1/chat/completions endpoint (mlx_lm.server, vLLM, an API)."""

    name = "openai"

    def __init__(self, base_url: str, model: str):
        from mlx_student.teacher.http import HTTPTeacher, HTTPTeacherArgs

        self.args = lambda n: HTTPTeacherArgs(base_url=base_url, model=model, max_tokens=n,
                                              concurrency=1)
        self.teacher_cls = HTTPTeacher

    def answer(self, case) -> dict:
        async def one():
            teacher = self.teacher_cls(self.args(case.max_new_tokens))
            try:
                return await teacher.complete(case.messages[:1])
            finally:
                await teacher.aclose()

        return {"prediction": asyncio.run(one()).text, "logprobs": None}


class OracleBackend:
    """Answers with the expected values and ranks the expected value first."""

    name = "oracle"

    def answer(self, case) -> dict:
        return {"prediction": ", ".join(case.answers),
                "logprobs": [0.0] + [-math.inf] * (len(case.candidates) - 1)}


class RandomBackend:
    """Answers with as many candidates as there are expected values, drawn uniformly, and
    scores the candidates at random: chance is len(answers) / n_candidates per value."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def answer(self, case) -> dict:
        picks = self.rng.choice(case.candidates, size=len(case.answers), replace=False)
        return {"prediction": ", ".join(picks),
                "logprobs": self.rng.standard_normal(len(case.candidates)).tolist()}


def make_backend(args, tokenizer):
    if args.backend == "mlx":
        from .generate import MLXEngine

        return EngineBackend(MLXEngine.load(args.model), args.prefill_step)
    if args.backend == "coreml":
        from .coreml_engine import CoreMLEngine

        if not args.package:
            raise ConfigError("--backend coreml needs --package (an mlx_student.export .mlpackage)")
        return EngineBackend(CoreMLEngine(args.package, tokenizer, backend=args.coreml_backend),
                             args.prefill_step)
    if args.backend == "openai":
        if not (args.base_url and args.api_model):
            raise ConfigError("--backend openai needs --base-url and --api-model")
        return OpenAIBackend(args.base_url, args.api_model)
    if args.backend == "oracle":
        return OracleBackend()
    return RandomBackend(args.seed)


# --- the grid -----------------------------------------------------------------------------
def run_grid(backend, tokenizer, args, progress=True, out=None) -> dict:
    """Every case of the grid, shortest lengths first. With `out`, the report is written at the
    end and rewritten (atomically) at most every `REWRITE_S` seconds on the way, so a run cut
    short leaves the cells it finished."""
    from tqdm import tqdm

    max_new = {k: args.max_new_tokens or MAX_NEW_TOKENS[k] for k in args.kinds}
    haystack = Haystack(tokenizer, args.haystack, 2 * max(args.lengths), Path("."))
    grid = [(k, n, d, i) for n in args.lengths for d in args.depths for k in args.kinds
            for i in range(args.cases)]
    records, tic = [], time.perf_counter()
    written = tic
    for kind, length, depth, i in tqdm(grid, desc="niah", disable=not progress):
        case = make_case(tokenizer, haystack, kind, length, depth, i, max_new[kind],
                         args.n_candidates, args.seed)
        t = time.perf_counter()
        answer = backend.answer(case)
        lps = answer["logprobs"]
        records.append({
            "kind": kind, "length": length, "depth": depth, "index": i,
            "prompt_tokens": len(case.prompt_ids), "context_start": case.context_start,
            "needles": case.needles, "answers": case.answers, "prediction": answer["prediction"],
            "score": string_match_all(answer["prediction"], case.answers),
            "value_logprob": lps[0] if lps else None,
            "rank": rank_of_first(lps) if lps else None, "n_candidates": len(case.candidates),
            "prefill_s": answer.get("prefill_s"), "seconds": time.perf_counter() - t,
        })
        if out is not None and time.perf_counter() - written > REWRITE_S:
            write_report(summarize(records, args, time.perf_counter() - tic, len(grid)), out)
            written = time.perf_counter()
    r = summarize(records, args, time.perf_counter() - tic, len(grid))
    if out is not None:
        write_report(r, out)
    return r


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list, args, seconds: float, planned: int) -> dict:
    cells = []
    for n in args.lengths:
        for d in args.depths:
            rs = [r for r in records if r["length"] == n and r["depth"] == d]
            ranks = [r["rank"] for r in rs if r["rank"] is not None]
            cells.append({"length": n, "depth": d, "cases": len(rs),
                          "score": _mean(r["score"] for r in rs),
                          "top1": sum(k == 1 for k in ranks) / len(ranks) if ranks else None,
                          "value_logprob": _mean(r["value_logprob"] for r in rs)})
    by_length = {n: _mean(r["score"] for r in records if r["length"] == n) for n in args.lengths}
    gates = []
    for n, minimum in sorted((int(k), float(v)) for k, v in (args.gates or {}).items()):
        got = by_length.get(n)
        status = "not measured" if got is None else ("pass" if got >= minimum else "fail")
        gates.append({"length": n, "min_score": minimum, "score": got, "status": status})
    return {
        "backend": args.backend, "model": args.model, "package": args.package,
        "haystack": args.haystack, "kinds": args.kinds, "lengths": args.lengths,
        "depths": args.depths, "cases_per_cell": args.cases, "n_candidates": args.n_candidates,
        "seed": args.seed, "seconds": seconds, "cases_planned": planned, "score": _mean(r["score"] for r in records),
        "top1": _mean(None if r["rank"] is None else float(r["rank"] == 1) for r in records),
        "chance_top1": 1.0 / args.n_candidates, "by_length": by_length, "cells": cells,
        "gates": gates, "records": records,
    }


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(r: dict) -> str:
    lines = [f"# Needle in a haystack: {r['backend']} on {r['model'] or r['package']}", "",
             f"Kinds {', '.join(r['kinds'])}; haystack {r['haystack']}; {r['cases_per_cell']} "
             f"case(s) per cell; {len(r['records'])} of {r['cases_planned']} cases in "
             f"{r['seconds']:.0f} s. Overall score "
             f"{_fmt(r['score'])}; expected value ranked first among {r['n_candidates']} "
             f"candidates: {_fmt(r['top1'])} (chance {r['chance_top1']:.2f}).", "",
             "Score (RULER string_match_all) / top-1 rate / mean log-probability of the value:", "",
             "| depth \\ length | " + " | ".join(str(n) for n in r["lengths"]) + " |",
             "|---" * (len(r["lengths"]) + 1) + "|"]
    for d in r["depths"]:
        row = [c for c in r["cells"] if c["depth"] == d]
        lines.append(f"| {d:g} | " + " | ".join(
            f"{_fmt(c['score'])} / {_fmt(c['top1'])} / {_fmt(c['value_logprob'], '.1f')}" for c in row) + " |")
    lines.append("| **mean** | " + " | ".join(_fmt(r["by_length"][n]) for n in r["lengths"]) + " |")
    if r["gates"]:
        lines += ["", "| gate | min score | score | status |", "|---|---|---|---|"]
        lines += [f"| {g['length']} tokens | {g['min_score']:.2f} | {_fmt(g['score'])} | {g['status']} |"
                  for g in r["gates"]]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score", "exact match (string_match_all)")]
    if r["top1"] is not None:
        panels.append(("top1", f"value ranked first of {r['n_candidates']}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 3.8), squeeze=False,
                             layout="constrained")
    for ax, (key, title) in zip(axes[0], panels):
        grid = np.array([[next(c[key] for c in r["cells"] if c["length"] == n and c["depth"] == d)
                          for n in r["lengths"]] for d in r["depths"]], dtype=float)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (y, x), v in np.ndenumerate(grid):
            ax.text(x, y, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(r["lengths"])), [str(n) for n in r["lengths"]])
        ax.set_yticks(range(len(r["depths"])), [f"{d:.0%}" for d in r["depths"]])
        ax.set(xlabel="context length (tokens)", title=title)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"NIAH {r['backend']}: {Path(str(r['model'] or r['package'])).name}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(r: dict, out: Path):
    """niah.json, niah.md and niah.png under `out`, each by temp file and rename."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "niah.json", r)
    tmp = out / ".niah.md.tmp"
    tmp.write_text(markdown(r))
    tmp.replace(out / "niah.md")
    tmp = out / ".niah.png.tmp.png"
    plot(r, tmp)
    tmp.replace(out / "niah.png")


def build_parser():
    p = argparse.ArgumentParser(
        description="Needle-in-a-haystack eval (RULER cases over a length x depth grid): "
                    "JSON, Markdown and a heatmap PNG. Flags override the YAML --config.")
    p.add_argument("--config", help="YAML file with any of the settings below (and `gates`)")
    p.add_argument("--model", help="mlx-lm model folder: the model (mlx backend) and the "
                   "tokenizer that builds the prompts (every backend)")
    p.add_argument("--backend", choices=BACKENDS, help="default mlx")
    p.add_argument("--package", help="exported .mlpackage (coreml backend)")
    p.add_argument("--coreml-backend", choices=("auto", "coreml", "executor"),
                   help="MLModel (macOS) or the reference MIL executor; default auto")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint ending in /v1 (openai backend)")
    p.add_argument("--api-model", help="model name sent to the endpoint (openai backend)")
    p.add_argument("--lengths", type=int, nargs="+", help="total tokens per case, prompt plus "
                   "answer budget (default 1024 2048 4096)")
    p.add_argument("--depths", type=float, nargs="+", help="needle depths in [0, 1] (default 0 .25 .5 .75 1)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, help="RULER case kinds (default single)")
    p.add_argument("--haystack", choices=HAYSTACKS, help="docs (Python docs), stdlib, noise")
    p.add_argument("--cases", type=int, help="cases per (length, depth, kind); default 1")
    p.add_argument("--n-candidates", type=int, help="values ranked by log-probability (default 10)")
    p.add_argument("--max-new-tokens", type=int, help="answer budget (default 16, 48 for multi-value kinds)")
    p.add_argument("--prefill-step", type=int, help="prefill chunk (mlx backend; default 2048)")
    p.add_argument("--seed", type=int, help="case seed (default 0)")
    p.add_argument("--out", help="output folder (default artifacts/niah)")
    return p


def check_args(args):
    problems = []
    if args.model is None:
        problems.append("--model is required (the tokenizer that builds the prompts)")
    if any(not 0 <= d <= 1 for d in args.depths):
        problems.append(f"--depths {args.depths}: each must be in [0, 1]")
    if any(n <= 0 for n in args.lengths) or args.cases <= 0 or args.n_candidates < 2:
        problems.append("--lengths and --cases must be positive, --n-candidates at least 2")
    if not isinstance(args.gates, dict):
        problems.append(f"gates: must map a length to a minimum score, got {args.gates!r}")
    if problems:
        raise ConfigError("\n".join(problems))


def run(args) -> dict:
    apply_config(args, DEFAULTS)
    check_args(args)
    tokenizer = load_tokenizer(Path(args.model))
    backend = make_backend(args, tokenizer)
    return run_grid(backend, tokenizer, args, out=Path(args.out))


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        r = run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.exit(f"mlx_student.niah: error: {e}")
    print(markdown(r))
    print(f"wrote {Path(args.out) / 'niah.json'}, niah.md, niah.png")


if __name__ == "__main__":
    main()
