"""Verify claims against an evidence manifest: BM25 retrieval, an entailment judge, 7 outcomes.

    manifest = load_manifest("evidence.json")          # arbiter/schemas/evidence_manifest.json
    index = EvidenceIndex(manifest)
    report = verify_claims(claims, index, llm_judge(backend), VerifyConfig())

Retrieval: every item's `text` is cut into passages at blank lines and ranked with BM25 (Okapi,
Robertson & Zaragoza 2009; the `rank_bm25` package) against the claim; the `top_k` best
passages that share at least one content word with the claim are judged.

Judgment: a `Judge` is any callable `(claim, passage) -> Judgment(support, contradict,
rationale)` with scores in [0, 1]. `llm_judge(backend)` asks a Claimify backend (MLX, CoreML,
endpoint) under the entailment schema, `votes` times: support / contradict are the shares of
votes saying "entailed" / "contradicted". A trained pairwise judge plugs in as any callable.

Outcomes (the seed system's 7 kinds) and statuses, decided in this order; thresholds from
`VerifyConfig` (the seed's: support 0.6, contradict 0.55, coverage 0.70):

| outcome | when | status |
|---|---|---|
| no_evidence | no passage shares a content word with the claim | INSUFFICIENT_EVIDENCE |
| identical | the normalised claim is a substring of a retrieved passage | VERIFIED |
| mixed_insufficient | one passage supports (>= support) and one contradicts (>= contradict) | INSUFFICIENT_EVIDENCE |
| supported | a passage supports it | VERIFIED |
| right_answer_wrong_rationale | "X because Y" (since, due to, ...) is not supported, but X is | UNVERIFIED |
| contradiction | a passage contradicts it | UNVERIFIED |
| retrieval_mismatch | neither, and the best passage covers < coverage of its content words | INSUFFICIENT_EVIDENCE |
| mixed_insufficient | neither, though the evidence covers its words | INSUFFICIENT_EVIDENCE |
"""

import json
import re
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from rank_bm25 import BM25Okapi

from arbiter.schemas import SchemaError, validate

from .extract import StageCall
from .split import AnswerError, read_text
from .stages import SCHEMAS, entailment_messages, parse

OUTCOMES = ("identical", "supported", "right_answer_wrong_rationale", "retrieval_mismatch",
            "contradiction", "mixed_insufficient", "no_evidence")
STATUS = {"identical": "VERIFIED", "supported": "VERIFIED", "right_answer_wrong_rationale": "UNVERIFIED",
          "contradiction": "UNVERIFIED", "retrieval_mismatch": "INSUFFICIENT_EVIDENCE",
          "mixed_insufficient": "INSUFFICIENT_EVIDENCE", "no_evidence": "INSUFFICIENT_EVIDENCE"}
STATUSES = ("VERIFIED", "UNVERIFIED", "INSUFFICIENT_EVIDENCE")
# Function words carry no evidence; the coverage and no-evidence checks ignore them.
STOPWORDS = frozenset(
    "a an and are as at be been by can do does for from has have in is it its may not of on or "
    "that the their them then there these this those to was were which will with".split())
RATIONALE = re.compile(r",?\s+(?:because|since|due to|as a result of|so that|which is why)\s+", re.I)
WORD = re.compile(r"[a-z0-9_]+")


def words(text: str) -> list:
    """Lower-cased word tokens ([a-z0-9_]+): `os.path.join()` -> os, path, join."""
    return WORD.findall(text.lower())


def content_words(text: str) -> set:
    return {w for w in words(text) if w not in STOPWORDS}


def normalise(text: str) -> str:
    return " ".join(words(text))


@dataclass
class VerifyConfig:
    support: float = 0.6  # a passage supports a claim at this judge score
    contradict: float = 0.55
    coverage: float = 0.70  # below it, unjudgeable evidence is a retrieval mismatch
    top_k: int = 3  # passages judged per claim
    judge_votes: int = 1
    judge_temperature: float = 0.5  # used when judge_votes > 1


@dataclass
class Judgment:
    """support / contradict in [0, 1]; rationale: the judge's words (or a vote summary)."""

    support: float
    contradict: float
    rationale: str = ""


def load_manifest(path) -> dict:
    """Read and schema-check an evidence manifest; raises AnswerError (bad bytes or JSON) or
    arbiter.schemas.SchemaError naming the file, the JSON path and the rule."""
    text = read_text(path, field="evidence manifest")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnswerError(f"{path}:{e.lineno}:{e.colno}: evidence manifest: invalid JSON: {e.msg}") from None
    validate(manifest, "evidence_manifest", source=str(path))
    if not any(isinstance(item.get("text"), str) and item["text"].strip() for item in manifest["items"]):
        raise SchemaError(str(path), ["$.items: no item has a non-empty `text` to verify claims against"])
    return manifest


class EvidenceIndex:
    """BM25 over the manifest's passages (each item's `text` cut at blank lines)."""

    def __init__(self, manifest: dict, source: str = "<manifest>"):
        self.manifest_id, self.source = manifest["id"], source
        self.passages = []
        for item in manifest["items"]:
            for k, part in enumerate(p for p in re.split(r"\n\s*\n", item.get("text") or "") if p.strip()):
                text = " ".join(part.split())
                self.passages.append({"id": f"{item['id']}#{k}", "item": item["id"], "text": text,
                                      "words": content_words(text)})
        self.items = len(manifest["items"])
        self.bm25 = BM25Okapi([words(p["text"]) for p in self.passages])

    def search(self, claim: str, k: int) -> list:
        """The k best passages sharing a content word with `claim`, as (bm25 score, passage)."""
        scores = self.bm25.get_scores(words(claim))
        query = content_words(claim)
        ranked = sorted(range(len(self.passages)), key=lambda i: (-scores[i], i))
        return [(float(scores[i]), self.passages[i]) for i in ranked if query & self.passages[i]["words"]][:k]


def llm_judge(backend, votes: int = 1, temperature: float = 0.5, calls: Optional[list] = None) -> Callable:
    """A Judge over a Claimify backend; each request (messages, outputs, parsed) is appended to
    `calls` when given (KD records are made from them)."""
    def judge(claim: str, passage: dict) -> Judgment:
        messages = entailment_messages(claim, passage["text"])
        t = temperature if votes > 1 else 0.0
        task = {"stage": "entailment", "claim": claim, "evidence_id": passage["id"], "evidence": passage["text"]}
        outputs = backend.complete(messages, SCHEMAS["entailment"], n=votes, temperature=t, task=task)
        parsed = [parse("entailment", o.text) for o in outputs]
        if calls is not None:
            calls.append(StageCall("entailment", -1, messages, outputs, parsed, t))
        labels = [p["label"] if p else "unparsed" for p in parsed]
        reason = next((p["reason"] for p in parsed if p), "")
        return Judgment(labels.count("entailed") / votes, labels.count("contradicted") / votes,
                        f"{', '.join(labels)}: {reason}".strip())

    return judge


def _main_clause(claim: str) -> Optional[str]:
    m = RATIONALE.search(claim)
    if m and len(content_words(claim[:m.start()])) >= 2:
        return claim[:m.start()].strip()
    return None


def verify_claim(claim: str, index: EvidenceIndex, judge: Callable, cfg: VerifyConfig) -> dict:
    """One claim's outcome, status, scores and the judged evidence."""
    hits = index.search(claim, cfg.top_k)
    out = {"text": claim, "support": 0.0, "contradict": 0.0, "coverage": 0.0, "evidence": []}
    if not hits:
        return {**out, "outcome": "no_evidence", "status": STATUS["no_evidence"]}
    query = content_words(claim)
    out["coverage"] = max(len(query & p["words"]) / len(query) for _, p in hits)
    needle = normalise(claim)
    for score, p in hits:
        if needle and f" {needle} " in f" {normalise(p['text'])} ":
            out["evidence"].append({"id": p["id"], "item": p["item"], "bm25": score, "support": 1.0,
                                    "contradict": 0.0, "rationale": "the claim appears verbatim"})
            return {**out, "support": 1.0, "outcome": "identical", "status": "VERIFIED"}
    for score, p in hits:
        j = judge(claim, p)
        out["evidence"].append({"id": p["id"], "item": p["item"], "bm25": score, "support": j.support,
                                "contradict": j.contradict, "rationale": j.rationale})
    out["support"] = max(e["support"] for e in out["evidence"])
    out["contradict"] = max(e["contradict"] for e in out["evidence"])
    supported, contradicted = out["support"] >= cfg.support, out["contradict"] >= cfg.contradict
    if supported and contradicted:
        outcome = "mixed_insufficient"
    elif supported:
        outcome = "supported"
    else:
        main = _main_clause(claim)
        if main and any(judge(main, p).support >= cfg.support for _, p in hits):
            outcome = "right_answer_wrong_rationale"
        elif contradicted:
            outcome = "contradiction"
        elif out["coverage"] < cfg.coverage:
            outcome = "retrieval_mismatch"
        else:
            outcome = "mixed_insufficient"
    return {**out, "outcome": outcome, "status": STATUS[outcome]}


def verify_claims(claims: list, index: EvidenceIndex, judge: Callable, cfg: VerifyConfig,
                  judge_name: str = "judge", progress=None) -> dict:
    """Verify `claims` ([{"id", "text", ...}]); the report validates against
    arbiter/schemas/claims_verification.json."""
    rows = []
    for c in claims:
        rows.append({"id": c["id"], **verify_claim(c["text"], index, judge, cfg)})
        if progress is not None:
            progress.update()
    report = {
        "manifest": {"id": index.manifest_id, "source": index.source, "items": index.items,
                     "passages": len(index.passages)},
        "judge": judge_name, "config": asdict(cfg), "claims": rows,
        "histogram": {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES},
        "statuses": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
    }
    validate(report, "claims_verification", source="verification report")
    return report
