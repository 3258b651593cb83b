"""Needle-in-a-haystack: exact placement, RULER scoring, reference backends at 100 % and chance,
the real MLX engine's cached scoring against one plain forward pass, and the CLI's outputs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import save_tiny

from runtime.needles import KINDS, NEEDLE, Haystack, make_case, rank_of_first, string_match_all

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("haystack", ["docs", "stdlib", "noise"])
def test_needles_sit_at_exact_token_depths(tokenizer, haystack, monkeypatch):
    monkeypatch.chdir(ROOT)
    hay = Haystack(tokenizer, haystack, 1200)
    for kind in KINDS:
        for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
            c = make_case(tokenizer, hay, kind, 600, depth, 0, 16)
            assert len(c.prompt_ids) == 600 - 16
            target = c.needles[0]
            want = c.context_start + round(depth * (c.context_length - target["length"]))
            assert target["start"] == want
            spans = sorted((n["start"], n["start"] + n["length"]) for n in c.needles)
            assert all(b <= a2 for (_, b), (a2, _) in zip(spans, spans[1:]))  # no overlap
            for n in c.needles:  # each needle's own tokens, verbatim, at its position
                ids = tokenizer.encode(NEEDLE.format(key=n["key"], value=n["value"]) + "\n",
                                       add_special_tokens=False)
                assert c.prompt_ids[n["start"]:n["start"] + n["length"]] == ids
            s = target["start"]  # the target follows a line break (or starts the context)
            assert s == c.context_start or tokenizer.decode(c.prompt_ids[s - 1:s]).endswith("\n")
            assert c.context_start + c.context_length <= len(c.prompt_ids)
            assert c.candidates[0] == c.answers[0] and len(set(c.candidates)) == 10
            if kind == "multikey":  # the in-context distractors are the hardest candidates
                assert c.candidates[1:4] == [n["value"] for n in c.needles[1:]]
            assert len(c.answers) == (4 if kind in ("multivalue", "multiquery") else 1)
    again = make_case(tokenizer, hay, "multikey", 600, 0.5, 0, 16)
    assert again.prompt_ids == make_case(tokenizer, hay, "multikey", 600, 0.5, 0, 16).prompt_ids


def test_ruler_scoring_on_hand_cases():
    refs = ["1234567", "7654321", "1111111"]
    assert string_match_all("The numbers are 1234567 and 7654321.", refs) == pytest.approx(2 / 3)
    assert string_match_all("none here", refs) == 0.0
    assert string_match_all("ABC-def", ["abc-DEF"]) == 1.0
    assert string_match_all(" 1234567.", ["1234567"]) == 1.0
    assert rank_of_first([-1.0, -2.0, -0.5]) == 2
    assert rank_of_first([0.0, -math.inf, -math.inf]) == 1
    assert rank_of_first([-1.0, -1.0, -3.0]) == 2  # a tie counts against the expected value


def niah(tmp_path, *flags):
    out = subprocess.run([sys.executable, "-m", "runtime.niah", "--out", str(tmp_path), *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out, (json.loads((tmp_path / "niah.json").read_text())
                 if out.returncode == 0 else None)


def test_oracle_scores_everything_and_random_scores_chance(tmp_path, teacher_dir):
    common = ["--model", str(teacher_dir), "--haystack", "noise", "--lengths", "384", "768",
              "--depths", "0", "0.25", "0.5", "0.75", "1", "--kinds", "single", "multiquery"]
    out, r = niah(tmp_path / "oracle", *common, "--backend", "oracle", "--cases", "2")
    assert out.returncode == 0, out.stderr
    assert r["score"] == 1.0 and r["top1"] == 1.0
    assert [g["status"] for g in r["gates"]] == ["not measured", "not measured"]
    assert {p.name for p in (tmp_path / "oracle").iterdir()} == {"niah.json", "niah.md", "niah.png"}
    out, r = niah(tmp_path / "random", *common, "--backend", "random", "--cases", "10")
    assert out.returncode == 0, out.stderr
    n = len(r["records"])
    assert n == 2 * 5 * 2 * 10
    # chance: a drawn candidate is right with p = 1/10 per expected value (also for 4 of 4)
    sd = math.sqrt(0.1 * 0.9 / n)
    assert abs(r["score"] - 0.1) < 4 * sd + 0.02, r["score"]
    assert abs(r["top1"] - 0.1) < 4 * sd, r["top1"]


def test_cli_refuses_bad_settings_naming_them(tmp_path, teacher_dir):
    out, _ = niah(tmp_path, "--model", str(teacher_dir), "--backend", "oracle", "--depths", "1.5")
    assert out.returncode == 1
    assert out.stderr.strip() == "mlx_student.niah: error: --depths [1.5]: each must be in [0, 1]"
    bad = tmp_path / "niah.yaml"
    bad.write_text("lengths: [256]\ndepth: [0.5]\n")
    out, _ = niah(tmp_path, "--model", str(teacher_dir), "--backend", "oracle", "--config", str(bad))
    assert out.stderr.strip() == f"mlx_student.niah: error: {bad}:2: depth: unknown setting"


def test_mlx_engine_scores_match_a_plain_forward_pass(tmp_path, tokenizer):
    """The backend prefills once and rewinds its KV cache between candidates; each candidate's
    log-probability must equal the one from a single uncached forward pass of prompt + value."""
    from runtime.generate import MLXEngine
    from runtime.niah import EngineBackend

    folder = save_tiny(tmp_path / "tiny", tokenizer)
    engine = MLXEngine.load(folder)
    backend = EngineBackend(engine, prefill_step=100)  # 3 prefill chunks
    hay = Haystack(tokenizer, "docs", 600)
    case = make_case(tokenizer, hay, "multikey", 300, 0.5, 0, 16, n_candidates=4)
    out = backend.answer(case)
    assert len(out["logprobs"]) == 4
    for value, got in zip(case.candidates, out["logprobs"]):
        v = tokenizer.encode(" " + value, add_special_tokens=False)
        logits = engine.model(mx.array([case.prompt_ids + v]))[0, len(case.prompt_ids) - 1:-1]
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        want = float(mx.sum(lp[mx.arange(len(v)), mx.array(v)]))
        # fp32: per-token log-probs agree to ~1e-6 relative of |logits| (<~10): 1e-4 over 8 tokens
        assert got == pytest.approx(want, abs=1e-4)
    # the greedy answer after the rewinds is the uncached greedy continuation
    ids, new = list(case.prompt_ids), []
    while len(new) < case.max_new_tokens:
        t = int(mx.argmax(engine.model(mx.array([ids + new]))[0, -1]))
        if t in tokenizer.eos_token_ids:
            break
        new.append(t)
    assert out["prediction"] == tokenizer.decode(new)


def test_coreml_backend_scores_like_mlx_through_the_executor(tmp_path, tokenizer):
    """The CoreML engine's backend (prefill chunks, one-token scoring, rewinds by position) on an
    exported tiny student gives the MLX log-probabilities within fp16 rounding."""
    from export.convert import FunctionSpec, convert_function, save_multifunction
    from export.mirror import load_mirror
    from runtime.coreml_engine import CoreMLEngine
    from runtime.generate import MLXEngine
    from runtime.niah import EngineBackend

    folder = save_tiny(tmp_path / "tiny", tokenizer, seed=3)
    mirror = load_mirror(folder)
    specs = [FunctionSpec("decode_ctx256", "decode", 1, 256),
             FunctionSpec("prefill_32_ctx256", "prefill", 32, 256)]
    package = save_multifunction({s.name: convert_function(mirror, s) for s in specs},
                                 tmp_path / "tiny.mlpackage", "decode_ctx256")
    case = make_case(tokenizer, Haystack(tokenizer, "noise", 600), "single", 256, 0.5, 0, 8,
                     n_candidates=3)
    got = EngineBackend(CoreMLEngine(package, tokenizer, backend="executor")).answer(case)
    want = EngineBackend(MLXEngine.load(folder)).answer(case)
    # fp16 logits (2^-11 relative, |logits| of a fresh tiny model < 2) over ~8 value tokens
    assert got["logprobs"] == pytest.approx(want["logprobs"], abs=0.05)
    assert len(got["prediction"]) > 0
