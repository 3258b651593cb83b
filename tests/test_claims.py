"""arbiter.claims: splitter, stage routing and voting, the 7 verification outcomes, metrics,
the gold set's oracle plumbing check, and constrained stage outputs from real engines."""

import json

import pytest

from arbiter.claims import gold as goldset
from arbiter.claims.backends import EngineBackend, ScriptedBackend
from arbiter.claims.extract import ClaimifyConfig, claimify
from arbiter.claims.metrics import extraction_scores, match_claims, prf, token_f1, verification_scores
from arbiter.claims.split import AnswerError, read_text, split_answer
from arbiter.claims.stages import SCHEMAS, parse, stage_messages, stage_schema
from arbiter.claims.verify import (OUTCOMES, EvidenceIndex, Judgment, VerifyConfig, llm_judge, load_manifest,
                                   verify_claim, verify_claims)
from arbiter.schemas import SchemaError, validate

TEXT = ("The os.path.join() function joins paths. It was added in Python 1.5, e.g. for Unix. "
        "Is it fast? Yes.\n\nA new paragraph starts here")


def test_split_offsets_and_context_windows():
    s = split_answer(TEXT, before=2, after=1)
    assert [x.text for x in s] == ["The os.path.join() function joins paths.",
                                   "It was added in Python 1.5, e.g. for Unix.", "Is it fast?", "Yes.",
                                   "A new paragraph starts here"]
    for x in s:
        assert TEXT[x.start:x.end] == x.text
    assert s[0].preceding == [] and s[0].following == [s[1].text]
    assert s[3].preceding == [s[1].text, s[2].text] and s[3].following == [s[4].text]
    assert s[4].following == []


def test_split_errors_name_the_field(tmp_path):
    with pytest.raises(AnswerError, match=r"^answers.jsonl:3: field 'answer': the answer is empty$"):
        split_answer(" \n ", where="answers.jsonl:3: field 'answer'")
    long = "word " * 2000 + "end."
    with pytest.raises(AnswerError, match=r"answer: sentence 2 \(characters 11-10015\) is 10004 characters long, "
                                          r"over max_sentence_chars=2000"):
        split_answer("Short one. " + long)
    bad = tmp_path / "a.txt"
    bad.write_bytes(b"ok line\nbad \xff byte")
    with pytest.raises(AnswerError, match=r"a.txt:2: answer: not UTF-8 \(byte 0xff at offset 12\)"):
        read_text(bad)


def scripted(table):
    """A backend answering selection/disambiguation votes and decompositions from `table`:
    {sentence: {"selection": [votes], "disambiguation": [votes], "claims": [...]}}."""
    def respond(task, i):
        row = table[task["original"]]
        if task["stage"] == "selection":
            vote = row["selection"][i]
            if vote is None:
                return "not json {"
            return {"reason": "r-sel", "verifiable": vote, "kept": task["sentence"] if vote else ""}
        if task["stage"] == "disambiguation":
            vote = row["disambiguation"][i]
            return {"reason": "r-dis", "resolvable": vote, "rewritten": f"{task['sentence']} (clear)" if vote else ""}
        return {"clarified": task["sentence"], "claims": row["claims"]}
    return ScriptedBackend(respond)


def test_routing_voting_and_dropped_reasons():
    answer = "Alpha is one. Beta is two. Gamma is three. Delta is four."
    backend = scripted({
        "Alpha is one.": {"selection": [True, False, False]},          # 1/3 < 2: dropped at selection
        "Beta is two.": {"selection": [True, True, False], "disambiguation": [False, True, False]},
        "Gamma is three.": {"selection": [None, True, True], "disambiguation": [True, True, True],
                            "claims": ["Gamma is three.", "gamma  is three.", "Gamma is odd."]},
        "Delta is four.": {"selection": [None, None, None]},
    })
    result, calls = claimify(answer, backend, ClaimifyConfig(), question="Q?")
    validate(result, "claims_extraction")
    rows = result["sentences"]
    assert [(r["status"], r["stage"]) for r in rows] == [
        ("dropped", "selection"), ("dropped", "disambiguation"), ("kept", None), ("dropped", "selection")]
    assert rows[0]["reason"] == "1/3 completions found a verifiable proposition (need 2); r-sel"
    assert rows[1]["reason"] == "1/3 completions could disambiguate it (need 2); r-dis"
    assert rows[3]["reason"] == "no schema-valid output in 3 completions"
    assert rows[2]["disambiguated"] == "Gamma is three. (clear)"
    # case-insensitive duplicates are dropped; ids name the sentence
    assert [(c["id"], c["text"]) for c in result["claims"]] == [("s2c0", "Gamma is three."), ("s2c1", "Gamma is odd.")]
    assert [(c.stage, c.sentence, len(c.outputs), c.temperature) for c in calls] == [
        ("selection", 0, 3, 0.5), ("selection", 1, 3, 0.5), ("disambiguation", 1, 3, 0.5),
        ("selection", 2, 3, 0.5), ("disambiguation", 2, 3, 0.5), ("decomposition", 2, 1, 0.0),
        ("selection", 3, 3, 0.5)]
    assert result["stats"]["outputs"]["selection"] == {"schema_valid": 8, "total": 12}
    assert calls[2].messages[1]["content"].startswith("Question: Q?\nExcerpt (the sentence in brackets): "
                                                      "Alpha is one. [Beta is two.] Gamma is three. Delta is four.")


def test_config_checks_votes():
    with pytest.raises(ValueError, match=r"selection_min_successes must be between 1 and selection_votes \(3\), got 4"):
        ClaimifyConfig(selection_min_successes=4)


def test_stage_schema_bounds_and_parse():
    s = "Sets are unordered."
    schema = stage_schema("selection", s)
    assert schema["properties"]["kept"]["maxLength"] == len(s)
    assert SCHEMAS["selection"]["properties"]["kept"]["maxLength"] == 400  # the shared one is untouched
    assert parse("selection", json.dumps({"reason": "", "verifiable": True, "kept": s + "!"}), schema) is None
    assert parse("selection", json.dumps({"reason": "", "verifiable": True, "kept": s}), schema)["kept"] == s
    assert parse("entailment", '{"reason": "x", "label": "maybe"}') is None


MANIFEST = {"id": "m", "items": [
    {"id": "a", "kind": "document", "source": "a.md",
     "text": "The deque supports fast appends at both ends.\n\nIndexed access is slow in the middle of a deque."},
    {"id": "b", "kind": "document", "source": "b.md", "text": "Lists support fast random access by index."},
]}


def table_judge(labels):
    """A Judge from {(claim, passage id): (support, contradict)}; unlisted pairs are neutral."""
    def judge(claim, passage):
        return Judgment(*labels.get((claim, passage["id"]), (0.0, 0.0)), rationale="table")
    return judge


OUTCOME_CASES = [
    ("Monty wrote comedy sketches.", {}, "no_evidence"),
    ("The deque supports fast appends at both ends.", {}, "identical"),
    ("A deque appends quickly on both ends.",
     {("A deque appends quickly on both ends.", "a#0"): (1.0, 0.0)}, "supported"),
    ("Indexed access is fast in the middle of a deque.",
     {("Indexed access is fast in the middle of a deque.", "a#1"): (0.0, 1.0)}, "contradiction"),
    ("Deques append fast at both ends, because they are lists.",
     {("Deques append fast at both ends", "a#0"): (1.0, 0.0)}, "right_answer_wrong_rationale"),
    ("The deque is a thread safe container implemented in C.", {}, "retrieval_mismatch"),
    ("Indexed access in the middle of a deque is slow.",
     {("Indexed access in the middle of a deque is slow.", "a#1"): (0.6, 0.0),
      ("Indexed access in the middle of a deque is slow.", "b#0"): (0.0, 0.55)}, "mixed_insufficient"),
    ("Indexed access is fast in the middle.", {}, "mixed_insufficient"),  # covered words, undecided
]


@pytest.mark.parametrize("claim,labels,outcome", OUTCOME_CASES)
def test_seven_outcomes(claim, labels, outcome):
    row = verify_claim(claim, EvidenceIndex(MANIFEST), table_judge(labels), VerifyConfig())
    assert row["outcome"] == outcome, row


def test_outcome_cases_cover_all_seven():
    assert {case[2] for case in OUTCOME_CASES} == set(OUTCOMES)


def test_thresholds_come_from_config():
    judge = table_judge({("A deque appends quickly on both ends.", "a#0"): (0.6, 0.0)})
    index = EvidenceIndex(MANIFEST)
    assert verify_claim("A deque appends quickly on both ends.", index, judge, VerifyConfig())["outcome"] == "supported"
    assert verify_claim("A deque appends quickly on both ends.", index, judge,
                        VerifyConfig(support=0.7))["outcome"] != "supported"


def test_llm_judge_counts_votes_and_report_validates():
    answers = [{"reason": "a", "label": "entailed"}, {"reason": "b", "label": "contradicted"}, "broken"]
    backend = ScriptedBackend(lambda task, i: answers[i])
    calls = []
    judge = llm_judge(backend, votes=3, calls=calls)
    j = judge("c", {"id": "x#0", "text": "e"})
    assert (j.support, j.contradict) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert j.rationale == "entailed, contradicted, unparsed: a"
    assert calls[0].stage == "entailment" and calls[0].temperature == 0.5
    report = verify_claims([{"id": "c1", "text": "Lists support fast random access by index."}],
                           EvidenceIndex(MANIFEST), judge, VerifyConfig(), "scripted")
    assert report["histogram"]["identical"] == 1 and report["statuses"]["VERIFIED"] == 1


def test_manifest_failing_its_schema_names_the_field(tmp_path):
    path = tmp_path / "ev.json"
    path.write_text(json.dumps({"id": "m", "items": [{"id": "a", "source": "x"}]}))
    with pytest.raises(SchemaError, match=r"ev.json: \$.items\[0\]: 'kind' is a required property \(rule: required\)"):
        load_manifest(path)
    path.write_text(json.dumps({"id": "m", "items": [{"id": "a", "kind": "log", "source": "x"}]}))
    with pytest.raises(SchemaError, match=r"ev.json: \$.items: no item has a non-empty `text`"):
        load_manifest(path)


def test_metrics_on_hand_computed_examples():
    assert token_f1("The cat sat", "cat sat down") == pytest.approx(0.8)  # P 2/2, R 2/3
    assert token_f1("", "") == 1.0 and token_f1("a", "cat") == 0.0  # "a" is an article: no tokens
    # one-to-one: the better pair wins, the weaker claim is left unmatched
    assert match_claims(["cat sat", "cat sat down"], ["cat sat down"]) == [(1, 0, 1.0)]
    assert prf(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert prf(1, 2, 4) == pytest.approx({"precision": 0.5, "recall": 0.25, "f1": 1 / 3})
    pred = [{"status": "kept", "claim_texts": ["x is one", "y is two"]},
            {"status": "kept", "claim_texts": ["z"]},
            {"status": "dropped", "claim_texts": []}]
    gold = [{"dropped_at": None, "claims": [{"text": "x is one"}]},
            {"dropped_at": "selection", "claims": []},
            {"dropped_at": None, "claims": [{"text": "w is three"}]}]
    s = extraction_scores([(pred, gold)])
    assert (s["matched"], s["predicted"], s["gold"]) == (1, 3, 2)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(0.5)
    assert s["sentence_coverage"] == pytest.approx(1 / 3)
    assert s["element_coverage"] == pytest.approx((2 / 3 + 0 + 0) / 3)  # per-sentence F1s: 2/3, 0, 0
    rows = [{"status": "VERIFIED", "outcome": "supported"}, {"status": "VERIFIED", "outcome": "supported"},
            {"status": "UNVERIFIED", "outcome": "contradiction"}]
    golds = [{"outcome": "identical"}, {"outcome": "contradiction"}, {"outcome": "supported"}]
    v = verification_scores(rows, golds)
    assert (v["precision"], v["recall"]) == (0.5, 0.5)
    assert v["status_accuracy"] == pytest.approx(1 / 3) and v["outcome_accuracy"] == 0.0


def test_gold_set_oracle_scores_100_and_the_check_can_fail(tmp_path):
    from arbiter.claims import eval as claims_eval

    args = claims_eval.build_parser().parse_args(["--oracle", "--out", str(tmp_path / "o")])
    claims_eval.apply_config(args, claims_eval.CONFIG_DEFAULTS)
    report = claims_eval.run(args)
    gold = goldset.load_gold()
    assert sum(len(a["sentences"]) for a in gold) == 40
    e, v = report["extraction"], report["verification"]
    assert (e["f1"], e["sentence_coverage"], e["element_coverage"], report["entailment"]["rate"]) == (1, 1, 1, 1)
    assert (v["precision"], v["recall"], v["outcome_accuracy"]) == (1, 1, 1)
    assert v["histogram"] == v["gold_histogram"] and all(n > 0 for n in v["histogram"].values())
    # A wrong gold label (one supported claim's passage mislabelled) must show up.
    lines = goldset.ANSWERS.read_text().splitlines()
    bad = json.loads(lines[0])
    bad["sentences"][1]["claims"][0]["evidence"] = {"pathlib#2": "entailed"}
    (tmp_path / "gold.jsonl").write_text("\n".join([json.dumps(bad)] + lines[1:]) + "\n")
    args = claims_eval.build_parser().parse_args(["--oracle", "--gold", str(tmp_path / "gold.jsonl"),
                                                  "--out", str(tmp_path / "o2")])
    claims_eval.apply_config(args, claims_eval.CONFIG_DEFAULTS)
    assert claims_eval.run(args)["verification"]["outcome_accuracy"] < 1


def test_constrained_stage_outputs_always_parse(tmp_path, tokenizer):
    """A random tiny model sampled at temperature 1: every constrained output is schema-valid;
    unconstrained (40 tokens), none is."""
    from conftest import save_tiny
    from runtime.generate import MLXEngine

    engine = MLXEngine.load(save_tiny(tmp_path / "tiny", tokenizer))
    backend = EngineBackend(engine, "tiny", max_tokens=1200, constrained=True)
    sentence = "Deques support fast appends."
    for stage in ("selection", "disambiguation", "decomposition"):
        schema = stage_schema(stage, sentence)
        outs = backend.complete(stage_messages(stage, sentence), schema, n=2, temperature=1.0, seed=1)
        assert all(parse(stage, o.text, schema) is not None for o in outs), [o.text for o in outs]
        assert all(o.finish_reason == "stop" for o in outs)
    backend.constrained, backend.max_tokens = False, 40
    outs = backend.complete(stage_messages("selection", sentence), SCHEMAS["selection"], n=4, temperature=1.0)
    assert sum(parse("selection", o.text) is not None for o in outs) == 0


def test_default_teacher_smoke(teacher_dir):
    """The real default teacher, one constrained Selection: it parses, and the stored top-k is
    the grammar-masked distribution the greedy tokens were taken from."""
    from runtime.generate import MLXEngine

    backend = EngineBackend(MLXEngine.load(teacher_dir), "teacher", max_tokens=160, top_k=4)
    sentence = "Python's sort uses the Timsort algorithm."
    schema = stage_schema("selection", sentence)
    out = backend.complete(stage_messages("selection", sentence, "Which sort does Python use?"), schema)[0]
    assert out.finish_reason == "stop" and parse("selection", out.text, schema) is not None
    assert [top[0][0] for top in out.topk] == out.completion_ids
