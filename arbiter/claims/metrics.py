"""Claim metrics: fuzzy claim matching, extraction P/R/F1, sentence- and element-level coverage,
entailment rate, verification P/R/F1 and the outcome histogram.

Claims match fuzzily by token F1 (SQuAD's answer F1, Rajpurkar et al. 2016: lower-cased word
tokens, articles dropped, multiset overlap) between a predicted and a gold claim of the same
sentence; pairs at or above `threshold` are matched one to one, best pairs first (greedy).

* extraction precision / recall / F1: matched claims over predicted / gold claims (micro).
* sentence-level coverage (Claimify's sentence-level accuracy): the share of sentences whose
  kept-or-dropped decision equals the gold one.
* element-level coverage: the macro average over sentences (those with gold or predicted
  claims) of the per-sentence claim F1: how completely each sentence's facts were covered.
* entailment rate: the share of extracted claims that a judge finds entailed by their own
  sentence (with its preceding context) - Claimify's check that claims add nothing.
* verification precision / recall / F1: VERIFIED is the positive class, predicted status vs
  gold status (the seed's gates: precision >= 0.9, recall >= 0.85).
"""

import re
from collections import Counter

from .verify import OUTCOMES, STATUS

ARTICLES = {"a", "an", "the"}
TOKEN = re.compile(r"[a-z0-9_]+")


def claim_tokens(text: str) -> list:
    return [t for t in TOKEN.findall(text.lower()) if t not in ARTICLES]


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 of two strings; 1.0 when both have no tokens, 0.0 when one has none."""
    p, g = claim_tokens(pred), claim_tokens(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def match_claims(pred: list, gold: list, threshold: float = 0.5) -> list:
    """One-to-one (pred index, gold index, F1) pairs with F1 >= threshold, best first."""
    pairs = sorted(((token_f1(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gold)),
                   key=lambda t: (-t[0], t[1], t[2]))
    used_p, used_g, out = set(), set(), []
    for f1, i, j in pairs:
        if f1 >= threshold and i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            out.append((i, j, f1))
    return out


def prf(tp: int, n_pred: int, n_gold: int) -> dict:
    """Precision, recall, F1; an empty prediction (or gold) side scores 1.0 only if the other
    side is empty too."""
    precision = tp / n_pred if n_pred else float(n_gold == 0)
    recall = tp / n_gold if n_gold else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def extraction_scores(pairs: list, threshold: float = 0.5) -> dict:
    """`pairs`: one (predicted sentence rows, gold sentence rows) per answer, aligned by
    sentence; predicted rows as arbiter.claims.extract writes them with their claim texts in
    `claim_texts`, gold rows as in the gold set."""
    tp = n_pred = n_gold = correct = sentences = 0
    per_sentence = []
    for pred_rows, gold_rows in pairs:
        for p, g in zip(pred_rows, gold_rows, strict=True):
            pc, gc = p["claim_texts"], [c["text"] for c in g["claims"]]
            m = len(match_claims(pc, gc, threshold))
            tp, n_pred, n_gold = tp + m, n_pred + len(pc), n_gold + len(gc)
            sentences += 1
            correct += (p["status"] == "kept") == (g["dropped_at"] is None)
            if pc or gc:
                per_sentence.append(prf(m, len(pc), len(gc))["f1"])
    return {**prf(tp, n_pred, n_gold), "matched": tp, "predicted": n_pred, "gold": n_gold,
            "sentence_coverage": correct / sentences if sentences else 0.0,
            "element_coverage": sum(per_sentence) / len(per_sentence) if per_sentence else 1.0,
            "sentences": sentences, "match_threshold": threshold}


def verification_scores(rows: list, gold_claims: list) -> dict:
    """Rows of a verification report against the gold claims (same order): VERIFIED
    precision / recall / F1, status and outcome accuracy, histograms of both sides."""
    if len(rows) != len(gold_claims):
        raise ValueError(f"{len(rows)} verified claims for {len(gold_claims)} gold claims")
    pred = [r["status"] == "VERIFIED" for r in rows]
    gold = [STATUS[g["outcome"]] == "VERIFIED" for g in gold_claims]
    tp = sum(p and g for p, g in zip(pred, gold))
    n = len(rows)
    statuses = sum(r["status"] == STATUS[g["outcome"]] for r, g in zip(rows, gold_claims))
    outcomes = sum(r["outcome"] == g["outcome"] for r, g in zip(rows, gold_claims))
    return {**prf(tp, sum(pred), sum(gold)), "claims": n,
            "status_accuracy": statuses / n if n else 0.0, "outcome_accuracy": outcomes / n if n else 0.0,
            "histogram": {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES},
            "gold_histogram": {o: sum(g["outcome"] == o for g in gold_claims) for o in OUTCOMES}}


def entailment_rate(judged: list, support: float) -> dict:
    """`judged`: one Judgment per extracted claim against its own sentence."""
    entailed = sum(j.support >= support for j in judged)
    return {"rate": entailed / len(judged) if judged else 0.0, "entailed": entailed, "claims": len(judged)}
