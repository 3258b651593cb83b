"""The shipped gold set and its scripted oracle backend.

`goldset/answers.jsonl`: 8 answers (40 sentences) about the Python standard library, written for
this project; per sentence: `dropped_at` (null, "selection" or "disambiguation") and its gold
claims, each with its verification `outcome` against `goldset/evidence.json` (an evidence
manifest of self-written passages stating the Python documentation's facts) and the passages'
gold entailment labels (`evidence`: {passage id: "entailed" | "contradicted"}; unlisted
passages are neutral). A claim "X because Y" with outcome right_answer_wrong_rationale names its
main clause X (`main`) and X's labels (`main_evidence`).

`oracle_backend(gold)` answers every stage and entailment request from the gold labels. The
extraction, voting, retrieval and outcome logic run unchanged over it, so a perfect score on
the gold set checks the plumbing (a wrong split, route, vote, retrieval or rule shows up).
"""

import json
from pathlib import Path

from arbiter.schemas import validate

from .backends import ScriptedBackend
from .split import AnswerError, read_text

GOLD_DIR = Path(__file__).parent / "goldset"
ANSWERS = GOLD_DIR / "answers.jsonl"
EVIDENCE = GOLD_DIR / "evidence.json"


def load_gold(path=ANSWERS) -> list:
    """The gold answers; each line is checked against arbiter/schemas/claims_gold.json and a
    bad one raises SchemaError / AnswerError naming file:line and the field."""
    out = []
    for n, line in enumerate(read_text(path, "gold answers").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnswerError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        out.append(validate(record, "claims_gold", source=f"{path}:{n}"))
    return out


def oracle_backend(gold: list) -> ScriptedBackend:
    """A backend answering from the gold labels (see the module docstring); a request about a
    sentence or claim outside the gold set raises KeyError."""
    sentences = {s["text"]: s for a in gold for s in a["sentences"]}
    labels = {}
    for s in sentences.values():
        for c in s["claims"]:
            labels[c["text"]] = c["evidence"]
            if "main" in c:
                labels[c["main"]] = c["main_evidence"]

    def respond(task, i):
        stage = task["stage"]
        if stage == "entailment":
            source = sentences.get(task["evidence"])
            if source is not None:  # judged against its own sentence (the entailment rate)
                label = "entailed" if task["claim"] in {c["text"] for c in source["claims"]} else "neutral"
            else:
                label = labels[task["claim"]].get(task["evidence_id"], "neutral")
            return {"reason": "gold label", "label": label}
        s = sentences[task["original"]]
        if stage == "selection":
            ok = s["dropped_at"] != "selection"
            return {"reason": "gold label", "verifiable": ok, "kept": task["sentence"] if ok else ""}
        if stage == "disambiguation":
            ok = s["dropped_at"] != "disambiguation"
            return {"reason": "gold label", "resolvable": ok, "rewritten": task["sentence"] if ok else ""}
        return {"clarified": task["sentence"], "claims": [c["text"] for c in s["claims"]]}

    return ScriptedBackend(respond, name="oracle")
