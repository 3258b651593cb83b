"""The judge model, its losses, the pair-row reader, the eval metrics and the teacher's
preference: against numpy references and hand counts."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from arbiter.judge import eval as judge_eval
from arbiter.judge import model as judge_model
from arbiter.judge.kd import Teacher
from arbiter.judge.pairs import PairError, read_pairs
from conftest import ROOT
from judge_pairs import make_rows
from mlx_student.config import load_config

EPS32 = float(np.finfo(np.float32).eps)


def tiny_judge(seed=0):
    """A tiny judge with random (non-zero) heads."""
    config = load_config(ROOT / "configs/judge_tiny.yaml")
    from mlx_student import model as student_model

    judge = judge_model.build(config, student_model.build(config, seed=seed),
                              judge_model.JudgeSpec(max_length=96), seed=seed)
    judge.score_head.weight = mx.random.normal(judge.score_head.weight.shape, key=mx.random.key(5))
    mx.eval(judge.parameters())
    return judge, config


@pytest.fixture(scope="module")
def judge_and_config():
    return tiny_judge()


def test_swap_negates_the_margin_exactly(judge_and_config, tokenizer):
    judge, _ = judge_and_config
    row = make_rows(1, seed=4)[0]
    s_ab, _ = judge_model.score(judge, tokenizer, row["prompt"], [row["a"]["text"], row["b"]["text"]])
    s_ba, _ = judge_model.score(judge, tokenizer, row["prompt"], [row["b"]["text"], row["a"]["text"]])
    d_ab, d_ba = (s_ab[0] - s_ab[1]).item(), (s_ba[0] - s_ba[1]).item()
    assert d_ab != 0 and d_ab == -d_ba
    p = judge_model.preference(judge, tokenizer, row["prompt"], row["a"]["text"], row["b"]["text"])
    assert p == pytest.approx(1 / (1 + np.exp(-d_ab)), rel=4 * EPS32)


def test_padding_does_not_change_a_score(judge_and_config, tokenizer):
    """Right padding is invisible to the last real token (causal attention): a candidate scored
    alone equals it scored beside a longer one, up to fp32 summation order."""
    judge, _ = judge_and_config
    short = judge_model.encode(tokenizer, "Q", "short answer", 96)
    long = judge_model.encode(tokenizer, "Q", "a much longer answer " * 10, 96)
    alone, c_alone = judge(*judge_model.batch_ids([short]))
    both, c_both = judge(*judge_model.batch_ids([short, long]))
    # each output is a dot product over C = 128 terms of O(1) values: fp32 error model
    tol = 128 * EPS32 * max(1.0, abs(alone.item()))
    assert abs(alone.item() - both[0].item()) <= tol
    np.testing.assert_allclose(np.array(c_alone[0]), np.array(c_both[0]), atol=tol)


def test_encode_cuts_the_prompt_start_and_the_candidate_end(tokenizer):
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    p, c = enc("Is this right?"), enc(judge_model.SEPARATOR + "Yes.")
    assert judge_model.encode(tokenizer, "Is this right?", "Yes.", 64) == p + c + [eos]  # whole
    long_p, long_c = enc(" word" * 200), enc(judge_model.SEPARATOR + "candidate text" * 100)
    ids = judge_model.encode(tokenizer, " word" * 200, "candidate text" * 100, 64)
    # 63 tokens + eos: the prompt keeps its last quarter of the budget, the candidate its start
    assert ids == long_p[-(63 // 4):] + long_c[:63 - 63 // 4] + [eos]
    short_p = enc("Q?")
    ids = judge_model.encode(tokenizer, "Q?", "candidate text" * 100, 64)
    assert ids == short_p + long_c[:63 - len(short_p)] + [eos]


def test_pair_loss_matches_numpy():
    d = np.array([2.0, -1.0, 0.3, 0.0, -3.0], np.float32)
    y = np.array([1.0, 0.0, 0.5, 1.0, 0.8], np.float32)
    m = np.array([0.5, 1.0, 0.0, 0.25, 0.0], np.float32)
    z = d - (2 * y - 1) * m
    ref = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 / (1 + np.exp(z))))
    got = judge_model.pair_loss(mx.array(d), mx.array(y), mx.array(m)).item()
    assert got == pytest.approx(ref.mean(), rel=16 * EPS32)
    # the winner-a row with margin m is exactly -log sigmoid(d - m)
    one = judge_model.pair_loss(mx.array([2.0]), mx.array([1.0]), mx.array([0.5])).item()
    assert one == pytest.approx(np.log1p(np.exp(-1.5)), rel=16 * EPS32)
    logits = np.array([[1.0, -2.0], [0.0, 3.0]], np.float32)
    labels = np.array([[1, 0], [0, 1]])
    p = 1 / (1 + np.exp(-logits))
    ref = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()
    assert judge_model.clause_loss(mx.array(logits), mx.array(labels)).item() == pytest.approx(ref, rel=16 * EPS32)


def test_checkpoint_round_trip(tmp_path, judge_and_config, tokenizer):
    judge, config = judge_and_config
    path = judge_model.save(tmp_path / "judge", judge, config, tokenizer)
    raw = json.loads((path / "config.json").read_text())
    assert raw["student"]["judge"]["clauses"] == list(judge_model.CLAUSES)
    assert raw["student"]["role"] == "judge"
    model, _ = mlx_lm.load(str(path))  # the backbone is a plain mlx-lm llama folder
    assert model.args.hidden_size == config.hidden_size
    loaded, tok, cfg = judge_model.load(path)
    assert cfg.judge["max_length"] == 96
    ids, lengths = judge_model.batch_ids([judge_model.encode(tokenizer, "Q", "an answer", 96)])
    for a, b in zip(judge(ids, lengths), loaded(ids, lengths)):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    from export.mirror import read_checkpoint

    assert read_checkpoint(path)[0].judge == raw["student"]["judge"]  # the exporter reads it
    (path / "judge_heads.safetensors").unlink()
    with pytest.raises(judge_model.JudgeError, match="judge_heads.safetensors is missing"):
        judge_model.load(path)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_pairs_names_file_line_and_field(tmp_path):
    rows = make_rows(3)
    bad = json.loads(json.dumps(rows[1]))
    del bad["a"]["clauses"]["GATE_INTEGRITY"]
    bad["winner"] = "c"
    path = _write(tmp_path / "train.jsonl", [rows[0], bad, rows[2]])
    with pytest.raises(PairError) as e:
        read_pairs(path)
    assert str(e.value) == (
        f"{path}:2: $.a.clauses: 'GATE_INTEGRITY' is a required property (rule: required)\n"
        f"{path}:2: $.winner: 'c' is not one of ['a', 'b', 'tie'] (rule: enum)")
    path = _write(tmp_path / "t2.jsonl", [rows[0], "{not json"])
    with pytest.raises(PairError, match=r"t2.jsonl:2: invalid JSON: Expecting property name"):
        read_pairs(path)
    path = _write(tmp_path / "t3.jsonl", [rows[0], {**rows[1], "margin": -1}])
    with pytest.raises(PairError, match=r"t3.jsonl:2: \$.margin: -1 is less than the minimum of 0"):
        read_pairs(path)
    path = _write(tmp_path / "t4.jsonl", [rows[0], rows[0]])
    with pytest.raises(PairError, match=r"t4.jsonl:2: \$.id: 'p0-0' repeats line 1"):
        read_pairs(path)
    assert [r["id"] for r in read_pairs(_write(tmp_path / "ok.jsonl", rows))] == ["p0-0", "p0-1", "p0-2"]


def _rows(winners, len_a=None, len_b=None):
    return [{"prompt": "", "winner": w, "a": {"text": "x" * (la or 1)}, "b": {"text": "x" * (lb or 1)}}
            for w, la, lb in zip(winners, len_a or [None] * len(winners), len_b or [None] * len(winners))]


def test_pairwise_metrics_by_hand():
    rows = _rows(["a", "b", "a", "tie", "b"], [5, 1, 5, 2, 1], [1, 5, 1, 2, 5])
    p = np.array([0.9, 0.3, 0.45, 0.55, 0.8])
    m = judge_eval.pairwise_metrics(p, rows, tie_band=0.1, p_swapped=np.array([0.1, 0.7, 0.6, 0.6, 0.1]))
    assert m["acc_ties_excluded"] == 2 / 4  # rows 0, 1 right; 2, 4 wrong
    assert m["acc_ties_counted"] == 3 / 5  # row 3: |0.55 - 0.5| <= 0.1 predicts the tie
    assert m["acc_ties_penalised"] == 2 / 5
    y = np.array([1, 0, 1, 0.5, 0])
    assert m["log_loss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert m["position_consistency"] == 4 / 5  # only row 3 keeps its side (a first)
    # picks longer: rows 0 (a longer, picks a), 1 (b longer, picks b), 2 no, 4 no -> 2/4;
    # gold winner is the longer one in all 4 decided rows
    assert m["length_bias"] == pytest.approx(2 / 4 - 1.0)


def test_ece_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins [0.867, 0.9] and [0.6, 0.633]
    p, y = np.array([0.9, 0.1, 0.6]), np.array([1.0, 1.0, 1.0])
    assert judge_eval.ece(p, y) == pytest.approx((2 * abs(0.5 - 0.9) + 1 * abs(1 - 0.6)) / 3)


def test_temperature_and_platt_fit_recover_a_known_scale():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z / 2.5))).astype(float)  # true temperature 2.5
    p = 1 / (1 + np.exp(-z))
    assert judge_eval.fit_temperature(p, y) == pytest.approx(2.5, rel=0.1)
    a, b = judge_eval.fit_platt(p, y)
    assert a == pytest.approx(1 / 2.5, rel=0.1) and abs(b) < 0.1


def test_clause_metrics_match_hand_counts():
    labels = np.array([[1, 0, 1, 0, 1], [1, 1, 0, 0, 1]])
    prob = np.array([[0.9, 0.2, 0.4, 0.1, 0.7], [0.8, 0.6, 0.6, 0.3, 0.2]])
    m = judge_eval.clause_metrics(prob, labels)
    # tp: c0 2, c1 1, c4 1; fp: c2 1; fn: c2 1, c4 1 -> micro P 4/5, R 4/6, F1 8/11
    assert m["micro_f1"] == pytest.approx(8 / 11)
    c = m["per_clause"]
    assert c["EVIDENCE_COMPLETENESS"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert c["GATE_INTEGRITY"]["f1"] == 0.0 and c["WAIVER_JUSTIFICATION"]["recall"] == 0.5
    assert c["PROVENANCE_CLARITY"]["support"] == 0
    assert m["macro_f1"] == pytest.approx((1 + 1 + 0 + 0 + 2 / 3) / 5)


def test_teacher_preference_is_both_orders_averaged(teacher_dir):
    teacher = Teacher.load(teacher_dir, max_length=384, batch_size=4)
    rows = make_rows(3, seed=9)
    both, ab, ba = teacher.preferences(rows)
    np.testing.assert_allclose(both, 0.5 * (ab + 1 - ba), rtol=0, atol=4 * EPS32)
    a_id, b_id = teacher.choice_ids()
    for i, r in enumerate(rows):  # unbatched, straight from the logits: batching changes nothing
        q = teacher.question(r["prompt"], r["a"]["text"], r["b"]["text"])
        last = teacher.model(mx.array([q]))[0, -1]
        ref = 1 / (1 + np.exp(-(last[a_id] - last[b_id]).item()))
        assert ab[i] == pytest.approx(ref, abs=1e-4)  # fp32 logits of O(10): batch order only
    assert ((0 < both) & (both < 1)).all()


@pytest.mark.parametrize("command", ["train", "eval", "export", "serve"])
def test_help_names_the_console_script(command):
    import importlib
    parser = importlib.import_module(f"arbiter.judge.{command}").build_parser()
    assert parser.format_usage().startswith(f"usage: mlx_student.judge_{command} ")
