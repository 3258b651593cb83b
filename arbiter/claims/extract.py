"""The Claimify pipeline over one answer: split, Selection, Disambiguation, Decomposition.

    result = claimify(answer, backend, ClaimifyConfig(), question="...")
    result["claims"]      # [{"id", "sentence", "text"}]
    result["sentences"]   # every sentence: kept, or dropped with its stage and reason
    calls                 # every stage request with its outputs (KD records are made from them)

Voting follows the paper: Selection and Disambiguation draw `votes` completions (sampled at
`temperature`) and a sentence goes on only when at least `min_successes` of them succeed; the
kept / rewritten text is the one most of the successful completions wrote. An output that does
not parse under its stage's schema counts as a failed vote (it cannot be read). Decomposition
takes its first schema-valid completion.
"""

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

from .split import MAX_SENTENCE_CHARS, split_answer
from .stages import STAGES, parse, stage_messages, stage_schema


@dataclass
class ClaimifyConfig:
    context_before: int = 2  # sentences of context shown before the sentence
    context_after: int = 2
    max_sentence_chars: int = MAX_SENTENCE_CHARS
    selection_votes: int = 3
    selection_min_successes: int = 2
    disambiguation_votes: int = 3
    disambiguation_min_successes: int = 2
    decomposition_votes: int = 1
    temperature: float = 0.5  # sampling temperature of voted stages (votes > 1); greedy otherwise
    seed: int = 0

    def __post_init__(self):
        for stage in ("selection", "disambiguation"):
            votes, need = getattr(self, f"{stage}_votes"), getattr(self, f"{stage}_min_successes")
            if not 1 <= need <= votes:
                raise ValueError(f"{stage}_min_successes must be between 1 and {stage}_votes ({votes}), got {need}")
        if self.decomposition_votes < 1:
            raise ValueError(f"decomposition_votes must be >= 1, got {self.decomposition_votes}")


@dataclass
class StageCall:
    """One request to the backend: the stage, the sentence, the messages, the n outputs and
    each output parsed (None when not schema-valid)."""

    stage: str
    sentence: int
    messages: list
    outputs: list
    parsed: list
    temperature: float


def _ask(backend, calls, stage, sentence, text, question, n, cfg):
    temperature = cfg.temperature if n > 1 else 0.0
    messages = stage_messages(stage, text, question, sentence.preceding, sentence.following)
    task = {"stage": stage, "sentence": text, "original": sentence.text, "question": question}
    schema = stage_schema(stage, text)
    outputs = backend.complete(messages, schema, n=n, temperature=temperature, task=task,
                               seed=cfg.seed + 1000 * sentence.index)
    parsed = [parse(stage, o.text, schema) for o in outputs]
    calls.append(StageCall(stage, sentence.index, messages, outputs, parsed, temperature))
    return parsed


def _majority(texts):
    """The text most successful completions wrote (whitespace-normalised); ties: the first."""
    norm = [" ".join(t.split()) for t in texts]
    return Counter(norm).most_common(1)[0][0]


def _vote(parsed, ok_key, text_key, need, what):
    """(text or None, reason) of a voted stage."""
    valid = [p for p in parsed if p is not None]
    good = [p for p in valid if p[ok_key] and p[text_key].strip()]
    if len(good) >= need:
        return _majority([p[text_key] for p in good]), f"{len(good)}/{len(parsed)} completions {what}"
    if not valid:
        return None, f"no schema-valid output in {len(parsed)} completions"
    bad = next((p for p in valid if not (p[ok_key] and p[text_key].strip())), valid[0])
    return None, (f"{len(good)}/{len(parsed)} completions {what} (need {need}); "
                  f"{bad['reason'].strip() or 'no reason given'}")


def claimify(answer: str, backend, cfg: Optional[ClaimifyConfig] = None, question: Optional[str] = None,
             answer_id: Optional[str] = None, where: str = "answer", progress=None):
    """Extract the claims of `answer`. Returns (result dict, [StageCall]); `progress` (a tqdm)
    is advanced once per sentence. Raises split.AnswerError (naming `where`) for an empty
    answer or an over-long sentence."""
    cfg = cfg or ClaimifyConfig()
    sentences = split_answer(answer, cfg.context_before, cfg.context_after, cfg.max_sentence_chars, where)
    digest = hashlib.sha256(answer.encode()).hexdigest()
    calls, rows, claims = [], [], []
    for s in sentences:
        row = {"index": s.index, "text": s.text, "start": s.start, "end": s.end, "status": "dropped",
               "stage": None, "reason": "", "selected": None, "disambiguated": None, "clarified": None,
               "claims": []}
        rows.append(row)
        if progress is not None:
            progress.update()
        parsed = _ask(backend, calls, "selection", s, s.text, question, cfg.selection_votes, cfg)
        row["selected"], row["reason"] = _vote(parsed, "verifiable", "kept", cfg.selection_min_successes,
                                               "found a verifiable proposition")
        if row["selected"] is None:
            row["stage"] = "selection"
            continue
        parsed = _ask(backend, calls, "disambiguation", s, row["selected"], question,
                      cfg.disambiguation_votes, cfg)
        row["disambiguated"], row["reason"] = _vote(parsed, "resolvable", "rewritten",
                                                    cfg.disambiguation_min_successes, "could disambiguate it")
        if row["disambiguated"] is None:
            row["stage"] = "disambiguation"
            continue
        parsed = _ask(backend, calls, "decomposition", s, row["disambiguated"], question,
                      cfg.decomposition_votes, cfg)
        first = next((p for p in parsed if p is not None), None)
        if first is None:
            row["stage"], row["reason"] = "decomposition", f"no schema-valid output in {len(parsed)} completions"
            continue
        row["status"], row["clarified"] = "kept", " ".join(first["clarified"].split())
        seen = set()
        for text in first["claims"]:
            text = " ".join(text.split())
            if text.lower() not in seen:
                seen.add(text.lower())
                claim = {"id": f"s{s.index}c{len(row['claims'])}", "sentence": s.index, "text": text}
                row["claims"].append(claim["id"])
                claims.append(claim)
    valid = {stage: [0, 0] for stage in STAGES}
    for call in calls:
        valid[call.stage][0] += sum(p is not None for p in call.parsed)
        valid[call.stage][1] += len(call.parsed)
    result = {
        "id": answer_id or digest[:16], "question": question, "answer_sha256": digest,
        "backend": {"name": backend.name, "endpoint": backend.endpoint},
        "config": asdict(cfg), "sentences": rows, "claims": claims,
        "stats": {"sentences": len(rows), "kept": sum(r["status"] == "kept" for r in rows),
                  "claims": len(claims),
                  "dropped": {st: sum(r["stage"] == st for r in rows) for st in STAGES},
                  "outputs": {st: {"schema_valid": v, "total": t} for st, (v, t) in valid.items()}},
    }
    return result, calls
