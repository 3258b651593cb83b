"""Judge pair data: real applicable diffs, labels from the gate engine, splits without leakage,
byte-identical reruns, KD corruptions, the seed importer."""

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys

import pytest

from arbiter.caws import CLAUSES
from arbiter.judge import data, edits, scenarios
from arbiter.schemas import errors_of
from mlx_student.teacher.prompts import split_of

# the clause each scenario's mistake breaks
BREAKS = {"budget_violation": "BUDGET_ADHERENCE", "scope_violation": "PROVENANCE_CLARITY",
          "evidence_completeness": "EVIDENCE_COMPLETENESS", "waiver_justification": "WAIVER_JUSTIFICATION",
          "provenance": "PROVENANCE_CLARITY", "constitutional_bypass": "GATE_INTEGRITY"}


@pytest.fixture(scope="module")
def corpus():
    return edits.Corpus()


KD = [  # KD records (messages + completion, as mlx_student.kd_mix writes them)
    ("What does json.dumps return?", ("json.dumps returns a str holding the JSON text; it is not bytes. "
     "With indent=2 each level is indented by 2 spaces.")),
    ("How many bits are in a byte?", "A byte has 8 bits, so it can hold 256 values from 0 to 255."),
    ("Is a Python tuple mutable?", ("No. A tuple is immutable: once created its items cannot be "
     "replaced, although a mutable item inside it can change.")),
    ("What does os.path.join do?", ("It joins path components with the separator of the platform; "
     "an absolute component discards everything before it.")),
    ("How many seconds are in a day?", "A day has 86400 seconds: 24 hours of 60 minutes of 60 seconds."),
    ("What is the default recursion limit?", ("The default recursion limit is 1000; sys.setrecursionlimit "
     "changes it and sys.getrecursionlimit reads it.")),
    ("Does str.split() with no argument keep empty strings?", ("No. With no argument it splits on runs of "
     "whitespace and drops empty strings, so '  a  b '.split() gives ['a', 'b'].")),
    ("What does range(2, 10, 3) yield?", ("It yields 2, 5 and 8: it starts at 2, steps by 3 and stops "
     "before 10.")),
]


@pytest.fixture(scope="module")
def kd_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kd")
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"id": str(i), "messages": [{"role": "user", "content": q}], "completion": c}) + "\n"
        for i, (q, c) in enumerate(KD)))
    return folder


SEED_ROW = {"id": "seed-1", "prompt": "Is a 3-file change within a tier-1 budget?", "winner": "b",
            "a": {"text": "No.", "clauses": {c: 0 for c in CLAUSES}},
            "b": {"text": "Yes: 3 files <= 10.", "clauses": {c: 1 for c in CLAUSES}}}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, teacher_dir, kd_data):
    out = tmp_path_factory.mktemp("pairs")
    (out / "seed.jsonl").write_text(json.dumps(SEED_ROW) + "\n")
    argv = ["--num-pairs", "48", "--kd", str(kd_data), "--kd-pairs", "8", "--tie-fraction", "0.1",
            "--tokenizer", str(teacher_dir), "--valid-fraction", "0.2", "--test-fraction", "0.2",
            "--import", str(out / "seed.jsonl")]
    data.run(data.build_parser().parse_args(argv + ["--out", str(out / "one")]))
    data.run(data.build_parser().parse_args(argv + ["--out", str(out / "two")]))
    return out


def rows_of(folder):
    return {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text().splitlines()]
            for s in data.SPLITS}


def test_generated_diffs_apply_to_the_real_files_and_git_counts_them(corpus, tmp_path):
    for i, kind in enumerate(scenarios.KINDS * 2):
        case = scenarios.make_case(random.Random(f"t:{i}"), corpus, kind)
        repo = tmp_path / f"r{i}"
        repo.mkdir()
        for f in case.change.files:
            src = f.old_path or (f.path if f.status != "added" else None)
            if src:
                (repo / src).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(corpus.root / src.removeprefix(edits.PREFIX), repo / src)
        (repo / "change.diff").write_text(case.diff)
        subprocess.run(["git", "apply", "--check", "change.diff"], cwd=repo, check=True)
        numstat = subprocess.run(["git", "apply", "--numstat", "change.diff"], cwd=repo, check=True,
                                 capture_output=True, text=True).stdout.splitlines()
        git = [tuple(line.split("\t")[:2]) for line in numstat]
        assert git == [(str(f.added), str(f.removed)) for f in case.change.files]
        files = case.change.files
        assert (f"Diff: {len(files)} file(s), +{sum(f.added for f in files)} "
                f"-{sum(f.removed for f in files)}") in scenarios.render_prompt(case)


def test_labels_follow_the_engine(pairs):
    rows = [r for rs in rows_of(pairs / "one").values() for r in rs]
    gen = [r for r in rows if r["source"] == "generated"]
    assert {r["scenario"] for r in gen} == set(scenarios.KINDS)
    assert {r["winner"] for r in gen} == {"a", "b", "tie"}
    for r in rows:
        assert errors_of(r, "judge_pair") == []
    for r in gen:
        if r["winner"] == "tie":
            assert r["a"]["clauses"] == r["b"]["clauses"] == dict.fromkeys(CLAUSES, 1)
            assert r["a"]["text"] != r["b"]["text"] and r["margin"] == 0
            continue
        win, lose = (r["a"], r["b"]) if r["winner"] == "a" else (r["b"], r["a"])
        assert win["clauses"] == dict.fromkeys(CLAUSES, 1)
        assert [c for c, v in lose["clauses"].items() if not v] == [BREAKS[r["scenario"]]]
        assert r["margin"] == 1.0


def test_a_wrong_claim_loses_exactly_its_clause(corpus):
    case = scenarios.make_case(random.Random("labels"), corpus, "provenance")
    verdict = scenarios.truth(case)
    claim = scenarios._claim(verdict)
    assert scenarios.clause_labels(claim, verdict) == dict.fromkeys(CLAUSES, 1)
    g = {x["gate"]: x for x in claim["gates"]}
    g["budget"]["measured"] = {**g["budget"]["measured"], "loc": g["budget"]["measured"]["loc"] + 1}
    g["coverage"].pop("measured")
    g["lint"]["status"] = "fail"
    g["scope"].update(waived=True, waiver="WV-0001")
    labels = scenarios.clause_labels(claim, verdict)
    assert labels == {"EVIDENCE_COMPLETENESS": 0, "BUDGET_ADHERENCE": 0, "GATE_INTEGRITY": 0,
                      "PROVENANCE_CLARITY": 1, "WAIVER_JUSTIFICATION": 0}


def test_reruns_are_byte_identical_and_splits_follow_the_prompt_hash(pairs):
    for name in ["manifest.json"] + [f"{p}{s}.jsonl" for s in data.SPLITS for p in ("", "trl_")]:
        one, two = (pairs / "one" / name).read_bytes(), (pairs / "two" / name).read_bytes()
        assert one == two and (name == "manifest.json" or name.startswith("trl_") or one), name
    rows = rows_of(pairs / "one")
    prompts = {s: {r["prompt"] for r in rs} for s, rs in rows.items()}
    assert not (prompts["train"] & prompts["valid"] or prompts["train"] & prompts["test"]
                or prompts["valid"] & prompts["test"])
    for s, rs in rows.items():
        for r in rs:
            assert split_of(hashlib.sha256(r["prompt"].encode()).hexdigest(), 0.2, 0.2) == s


def test_trl_columns_and_manifest(pairs):
    rows, m = rows_of(pairs / "one"), json.loads((pairs / "one" / "manifest.json").read_text())
    for s in data.SPLITS:
        trl = [json.loads(line) for line in (pairs / "one" / f"trl_{s}.jsonl").read_text().splitlines()]
        expect = [{"prompt": r["prompt"], "chosen": r[r["winner"]]["text"],
                   "rejected": r["b" if r["winner"] == "a" else "a"]["text"], "margin": r.get("margin", 0.0)}
                  for r in rows[s] if r["winner"] != "tie"]
        assert trl == expect
    assert m["rows"] == {s: len(rows[s]) for s in data.SPLITS}
    lengths = m["tokens"]["prompt_plus_longer_candidate"]
    assert lengths["max"] <= 512 and m["tokens"]["max_tokens"] == 512
    assert sum(m["source"].values()) == sum(m["rows"].values())
    assert m["source"]["kd_corruption"] >= 4
    imported = [r for rs in rows.values() for r in rs if r["source"] == "imported"]
    assert imported == [{**SEED_ROW, "scenario": "imported", "source": "imported"}]


def test_kd_corruptions(pairs, kd_data):
    rows = [r for rs in rows_of(pairs / "one").values() for r in rs if r["source"] == "kd_corruption"]
    completions = {c for _, c in data.read_kd([kd_data])}
    for r in rows:
        win, lose = (r["a"], r["b"]) if r["winner"] == "a" else (r["b"], r["a"])
        kind = r["scenario"].removeprefix("kd_")
        assert win["text"] in completions and win["clauses"] == dict.fromkeys(CLAUSES, 1)
        assert {c for c, v in lose["clauses"].items() if not v} == set(data.KD_LOSES[kind])
    rng = random.Random(0)
    text = "It has 8 bits and it is not signed, so 255 is the largest value of the byte."
    cut = data.corrupt(rng, "truncated", text, "x")
    assert text.startswith(cut) and len(cut.split()) < len(text.split())
    assert data.corrupt(rng, "negated", text, "x") == text.replace("has", "has not", 1)
    assert data.corrupt(rng, "negated", "It is not signed.", "x") == "It is signed."
    perturbed = data.corrupt(rng, "numbers_perturbed", text, "x")
    before, after = (re.findall(r"\d+", t) for t in (text, perturbed))
    assert len(after) == 2 and all(int(a) < int(b) <= int(a) + 9 for a, b in zip(before, after))
    assert re.sub(r"\d+", "#", perturbed) == re.sub(r"\d+", "#", text)
    assert data.corrupt(rng, "swapped", text, "another answer") == "another answer"
    assert data.corrupt(rng, "numbers_perturbed", "no digits here", "x") is None


def test_import_seed_rows(tmp_path):
    seed = tmp_path / "seed.jsonl"
    rows = [{"id": "s1", "prompt": "Is the change in budget?", "winner": "a",
             "a": {"text": "Yes: 3 files.", "clauses": ["BUDGET_ADHERENCE", "GATE_INTEGRITY"]},
             "b": {"text": "No.", "clauses": {c: False for c in CLAUSES}}}]
    seed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [row] = data.import_rows([seed])
    assert row["a"]["clauses"] == {c: int(c in ("BUDGET_ADHERENCE", "GATE_INTEGRITY")) for c in CLAUSES}
    assert row["b"]["clauses"] == dict.fromkeys(CLAUSES, 0)
    assert (row["source"], row["scenario"]) == ("imported", "imported")
    bad = dict(rows[0], winner="c", b={"text": "No.", "clauses": {"BUDGET_ADHERENCE": 2}})
    seed.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(data.DataError) as e:
        data.import_rows([seed])
    lines = str(e.value).splitlines()
    assert f"{seed}:2: $.b.clauses: 'EVIDENCE_COMPLETENESS' is a required property (rule: required)" in lines
    assert f"{seed}:2: $.b.clauses.BUDGET_ADHERENCE: 2 is not one of [0, 1] (rule: enum)" in lines
    assert f"{seed}:2: $.winner: 'c' is not one of ['a', 'b', 'tie'] (rule: enum)" in lines
    assert len(lines) == 6  # four clauses missing, one out of range, the winner
    seed.write_text("{not json\n")
    with pytest.raises(data.DataError, match=r"seed.jsonl:1: invalid JSON"):
        data.import_rows([seed])


def test_cli_errors_name_the_problem(tmp_path, capsys):
    """Each bad input ends with exit 2 and one message, no traceback, nothing written: the first
    through the real `python -m` entry point, the others through the same main() in process."""
    kd = tmp_path / "kd.jsonl"
    kd.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}], "completion": ""}) + "\n")
    common = ["--num-pairs", "6", "--out", str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-m", "arbiter.judge.data", *common, "--tokenizer",
                        str(tmp_path)], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "tokenizer.json not found" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    for argv, msg in [(["--kd", str(kd), "--tokenizer", ""], "kd.jsonl:1: completion: expected a non-empty string"),
                      (["--source", str(tmp_path), "--tokenizer", ""], "--source: ")]:
        with pytest.raises(SystemExit) as e:
            data.main(common + argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and msg in err, err
    assert not (tmp_path / "out").exists()


def test_token_lengths_are_what_the_judge_reads(pairs, tokenizer):
    """The manifest's lengths and --max-tokens count the judge's own input (prompt, separator +
    candidate, eos), so a row kept at --max-tokens N is read whole by a judge of max_length N."""
    from arbiter.judge.model import encode

    rows = [r for rs in rows_of(pairs / "one").values() for r in rs]
    lengths = [max(len(encode(tokenizer, r["prompt"], r[s]["text"], 10**6)) for s in "ab") for r in rows]
    m = json.loads((pairs / "one" / "manifest.json").read_text())["tokens"]["prompt_plus_longer_candidate"]
    assert (m["min"], m["max"]) == (min(lengths), max(lengths))
    assert sum(lengths) / len(lengths) == pytest.approx(m["mean"], abs=0.05)


@pytest.mark.parametrize("flags, message", [
    (["--num-pairs", "-3"], "--num-pairs: must be an integer >= 0, got -3"),
    (["--tie-fraction", "1.5"], "--tie-fraction: must be a number in [0, 1], got 1.5"),
    (["--valid-fraction", "0.6", "--test-fraction", "0.6"],
     "--test-fraction: 0.6 with valid_fraction 0.6 leaves no prompt for train.jsonl (their sum must be < 1)"),
    (["--num-pairs", "0"], "no pair rows to write: --num-pairs 0, and --kd / --import gave 0")])
def test_bad_counts_and_fractions_are_refused_naming_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        data.main(["--out", str(tmp_path / "out"), "--tokenizer", "", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.startswith("error: ")
    assert not (tmp_path / "out").exists()
