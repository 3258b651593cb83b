"""Evaluate a judge on held-out pair rows, with baselines in the same table.

    mlx_student.judge_eval --judge runs/judge --data data/judge [--split test]
        [--teacher models/smollm2-135m-instruct] [--out runs/judge/eval]

Systems: the judge; `random` (a seeded coin, P = 0.5); `longer` (the heuristic "the longer
response wins", P(a > b) = sigmoid(ln(chars a / chars b))); `teacher` (an LLM asked zero-shot
in both orders, arbiter/judge/kd.py) when --teacher is given.

Metrics per system (P = P(a > b); decided = rows whose winner is not a tie):
* accuracy, three ways: `acc_ties_excluded` (decided rows, P > 0.5 means a), `acc_ties_counted`
  (all rows, three classes: a tie is predicted when |P - 0.5| <= tie_band), `acc_ties_penalised`
  (all rows, binary decision: every gold tie counts as an error);
* `log_loss`: cross-entropy of P against 1 / 0 / 0.5 (tie), all rows;
* `ece` (expected calibration error, 15 equal-width confidence bins, decided rows; Guo et al.
  2017) as given, after a fitted temperature (`ece_temperature`, P = sigmoid(logit / T)) and
  after Platt scaling (`ece_platt`, sigmoid(a logit + b), Platt 1999); both are fitted on the
  --calibration split (default valid; the report says when it had to be the evaluated split);
* `position_consistency`: the fraction of rows whose decision follows the swap when A and B
  trade places (the judge is re-run on swapped rows: it scores candidates independently, so this
  is 1 by construction, measured anyway; the teacher reads both orders);
* `length_bias`: rate at which the system picks the longer candidate minus the rate at which
  the gold winner is the longer one (decided rows; 0 = no more length preference than the data);
* clauses (judge and the baselines `random` = Bernoulli of each clause's prevalence in the
  calibration split, `longer` column: `majority` = each clause's majority label there):
  micro / macro F1 at 0.5 and per clause precision, recall, F1 and support (positives).

Writes <out>/eval.json and <out>/eval.md (atomically) and prints the Markdown.
"""

import mlx_student  # noqa: F401  (first: picks OpenBLAS on Linux before mlx loads)

import argparse
import math
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_student.files import write_json_atomic

from . import model as judge_model
from .model import CLAUSES
from .pairs import TARGET, PairError, clause_vector, read_split

ECE_BINS = 15
EPS = 1e-6


def score_rows(judge, tokenizer, rows, batch_size: int = 16) -> dict:
    """Judge outputs for pair rows: {"s_a", "s_b" (N,), "clauses_a", "clauses_b" (N, 5)
    probabilities}, numpy float64."""
    spec = judge.spec
    out = {"s_a": [], "s_b": [], "clauses_a": [], "clauses_b": []}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        seqs = [judge_model.encode(tokenizer, r["prompt"], r[side]["text"], spec.max_length,
                                   spec.separator) for side in ("a", "b") for r in chunk]
        s, c = judge(*judge_model.batch_ids(seqs))
        s, c = np.array(s, dtype=np.float64), np.array(mx.sigmoid(c), dtype=np.float64)
        n = len(chunk)
        out["s_a"].append(s[:n])
        out["s_b"].append(s[n:])
        out["clauses_a"].append(c[:n])
        out["clauses_b"].append(c[n:])
    return {k: np.concatenate(v) for k, v in out.items()}


def judge_p(scores: dict) -> np.ndarray:
    """P(a > b) = sigmoid(s_a - s_b)."""
    return 1.0 / (1.0 + np.exp(-(scores["s_a"] - scores["s_b"])))


def targets(rows) -> np.ndarray:
    return np.array([TARGET[r["winner"]] for r in rows])


def logit(p):
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def log_loss(p, y) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def ece(p, y, bins: int = ECE_BINS) -> float:
    """Expected calibration error of binary decisions: confidence max(P, 1 - P) against
    accuracy, equal-width bins over [0.5, 1], weighted by their counts."""
    if len(p) == 0:
        return float("nan")
    conf = np.maximum(p, 1 - p)
    correct = (p > 0.5) == (y == 1)
    which = np.minimum(((conf - 0.5) * 2 * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / len(p))


def fit_temperature(p, y) -> float:
    """T minimising the log-loss of sigmoid(logit(P) / T) (scipy, bounded 0.05..20)."""
    from scipy.optimize import minimize_scalar

    z = logit(p)
    res = minimize_scalar(lambda t: log_loss(1 / (1 + np.exp(-z / t)), y), bounds=(0.05, 20.0),
                          method="bounded")
    return float(res.x)


def fit_platt(p, y):
    """(a, b) of sigmoid(a logit(P) + b), an unregularised logistic regression (sklearn);
    None when the fit rows hold one class only."""
    from sklearn.linear_model import LogisticRegression

    if len(set(y.tolist())) < 2:
        return None
    lr = LogisticRegression(C=1e6).fit(logit(p)[:, None], y.astype(int))
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def length_rate(rows, pick_a) -> float:
    """How often the picked candidate (pick_a: bool per row) is the longer one (chars)."""
    longer_a = np.array([len(r["a"]["text"]) > len(r["b"]["text"]) for r in rows])
    unequal = np.array([len(r["a"]["text"]) != len(r["b"]["text"]) for r in rows])
    if not unequal.any():
        return float("nan")
    return float(np.mean((pick_a == longer_a)[unequal]))


def pairwise_metrics(p, rows, tie_band: float, p_swapped=None, fit=None) -> dict:
    """Pairwise metrics of P(a > b) on `rows`. p_swapped: P(first wins) with a and b swapped;
    fit: (P, rows) of the calibration split for the temperature and Platt fits."""
    y = targets(rows)
    decided = y != 0.5
    n = len(rows)
    pred = np.where(p > 0.5 + tie_band, 1.0, np.where(p < 0.5 - tie_band, 0.0, 0.5))
    binary_ok = (p > 0.5) == (y == 1)
    m = {"pairs": n, "decided": int(decided.sum()),
         "acc_ties_excluded": float(binary_ok[decided].mean()) if decided.any() else float("nan"),
         "acc_ties_counted": float(np.mean(pred == y)),
         "acc_ties_penalised": float((binary_ok & decided).sum() / n),
         "log_loss": log_loss(p, y),
         "ece": ece(p[decided], y[decided])}
    if fit is not None:
        fp, fy = fit[0], targets(fit[1])
        fd = fy != 0.5
        t = fit_temperature(fp[fd], fy[fd])
        m["temperature"] = t
        m["ece_temperature"] = ece(1 / (1 + np.exp(-logit(p[decided]) / t)), y[decided])
        ab = fit_platt(fp[fd], fy[fd])
        if ab is not None:
            m["platt"] = list(ab)
            m["ece_platt"] = ece(1 / (1 + np.exp(-(ab[0] * logit(p[decided]) + ab[1]))), y[decided])
    if p_swapped is not None:
        m["position_consistency"] = float(np.mean((p > 0.5) == (p_swapped < 0.5)))
    dec_rows = [r for r, d in zip(rows, decided) if d]
    m["length_bias"] = length_rate(dec_rows, p[decided] > 0.5) - length_rate(dec_rows, y[decided] == 1)
    return m


def clause_metrics(prob, labels) -> dict:
    """Micro / macro F1 at 0.5 and per clause precision, recall, F1, support (sklearn).
    prob, labels: (N, clauses)."""
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    pred = (prob >= 0.5).astype(int)
    prec, rec, f1, sup = precision_recall_fscore_support(labels, pred, average=None, zero_division=0)
    return {"micro_f1": float(f1_score(labels, pred, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
            "per_clause": {c: {"precision": float(prec[i]), "recall": float(rec[i]),
                               "f1": float(f1[i]), "support": int(sup[i])}
                           for i, c in enumerate(CLAUSES)}}


def clause_labels(rows) -> np.ndarray:
    return np.array([clause_vector(r[s]) for s in ("a", "b") for r in rows])


def summary_metrics(scores: dict, rows) -> dict:
    """The few numbers a training run validates on."""
    p = judge_p(scores)
    y = targets(rows)
    d = y != 0.5
    probs = np.concatenate([scores["clauses_a"], scores["clauses_b"]])
    return {"acc": float(((p > 0.5) == (y == 1))[d].mean()) if d.any() else float("nan"),
            "log_loss": log_loss(p, y),
            "clause_micro_f1": clause_metrics(probs, clause_labels(rows))["micro_f1"]}


def swapped(rows) -> list:
    return [{**r, "a": r["b"], "b": r["a"], "winner": {"a": "b", "b": "a"}.get(r["winner"], "tie")}
            for r in rows]


def longer_p(rows) -> np.ndarray:
    return np.array([1 / (1 + math.exp(-math.log(max(len(r["a"]["text"]), 1) /
                                                  max(len(r["b"]["text"]), 1)))) for r in rows])


def evaluate(judge, tokenizer, rows, fit_rows, tie_band=0.1, teacher=None, seed=0,
             batch_size=16) -> dict:
    """The report: {"systems": {name: {pairwise..., clauses...}}, ...}."""
    rng = np.random.default_rng(seed)
    systems = {}
    sc, fit_sc = score_rows(judge, tokenizer, rows, batch_size), score_rows(judge, tokenizer, fit_rows, batch_size)
    sw = score_rows(judge, tokenizer, swapped(rows), batch_size)
    systems["judge"] = pairwise_metrics(judge_p(sc), rows, tie_band, judge_p(sw),
                                        (judge_p(fit_sc), fit_rows))
    labels = clause_labels(rows)
    systems["judge"]["clauses"] = clause_metrics(
        np.concatenate([sc["clauses_a"], sc["clauses_b"]]), labels)
    prevalence = clause_labels(fit_rows).mean(axis=0)
    coin = lambda: np.where(rng.random(len(rows)) < 0.5, 0.5 + EPS, 0.5 - EPS)  # noqa: E731
    systems["random"] = pairwise_metrics(coin(), rows, 0.0, coin())
    systems["random"]["clauses"] = clause_metrics(
        (rng.random(labels.shape) < prevalence).astype(float), labels)
    systems["longer"] = pairwise_metrics(longer_p(rows), rows, tie_band, longer_p(swapped(rows)),
                                         (longer_p(fit_rows), fit_rows))
    systems["longer"]["clauses"] = clause_metrics(
        np.broadcast_to((prevalence >= 0.5).astype(float), labels.shape), labels)
    if teacher is not None:
        both, ab, ba = teacher.preferences(rows)
        fit_both = teacher.preferences(fit_rows)[0]
        systems["teacher"] = pairwise_metrics(both, rows, tie_band, None, (fit_both, fit_rows))
        systems["teacher"]["position_consistency"] = float(np.mean((ab > 0.5) == (ba < 0.5)))
    return {"systems": systems, "tie_band": tie_band}


COLUMNS = [("acc_ties_excluded", "acc (ties excl.)"), ("acc_ties_counted", "acc (ties counted)"),
           ("acc_ties_penalised", "acc (ties penalised)"), ("log_loss", "log-loss"),
           ("ece", "ECE"), ("ece_temperature", "ECE (temp.)"), ("ece_platt", "ECE (Platt)"),
           ("position_consistency", "position consistency"), ("length_bias", "length bias")]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}"


def markdown(report: dict) -> str:
    sys_ = report["systems"]
    lines = [f"# Judge eval: {report.get('judge', '')}", "",
             f"{report.get('pairs', '')} pairs of `{report.get('data', '')}` split "
             f"`{report.get('split', '')}`; calibration fitted on `{report.get('calibration', '')}`"
             f"; tie band ±{report['tie_band']}.", "",
             "| system | " + " | ".join(t for _, t in COLUMNS) + " | clause micro-F1 | clause macro-F1 |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for name, m in sys_.items():
        c = m.get("clauses", {})
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k, _ in COLUMNS)
                     + f" | {_fmt(c.get('micro_f1'))} | {_fmt(c.get('macro_f1'))} |")
    per = sys_["judge"]["clauses"]["per_clause"]
    lines += ["", "Judge clauses (threshold 0.5):", "",
              "| clause | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} | "
              f"{v['support']} |" for c, v in per.items()]
    return "\n".join(lines) + "\n"


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.judge_eval",
        description="Evaluate a pairwise judge against baselines "
        "(random, longer-wins, a zero-shot teacher) on pair rows.")
    p.add_argument("--judge", required=True, help="judge checkpoint folder (mlx_student.judge_train)")
    p.add_argument("--data", required=True, help="pair folder (test.jsonl, valid.jsonl, ...)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--calibration", default="valid",
                   help="split the temperature / Platt scales are fitted on (default valid; the "
                   "evaluated split when absent, said so in the report)")
    p.add_argument("--teacher", help="mlx-lm folder of a zero-shot teacher baseline")
    p.add_argument("--tie-band", type=float, default=0.1,
                   help="|P - 0.5| at or below which a tie is predicted (acc_ties_counted)")
    p.add_argument("--limit", type=int, help="evaluate only the first N rows")
    p.add_argument("--batch-size", type=int, default=16, help="pairs scored together")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baselines")
    p.add_argument("--out", help="report folder (default <judge>/eval)")
    return p


def run(args) -> dict:
    rows = read_split(args.data, args.split)[: args.limit]
    fit_rows, fit_name = read_split(args.data, args.calibration, required=False), args.calibration
    if fit_rows is None:
        fit_rows, fit_name = rows, f"{args.split} (in-sample: no {args.calibration}.jsonl)"
    judge, tokenizer, _ = judge_model.load(args.judge)
    teacher = None
    if args.teacher:
        from .kd import Teacher

        teacher = Teacher.load(args.teacher)
    report = evaluate(judge, tokenizer, rows, fit_rows, args.tie_band, teacher, args.seed,
                      args.batch_size)
    report.update(judge=str(args.judge), data=str(args.data), split=args.split,
                  calibration=fit_name, pairs=len(rows), teacher=args.teacher)
    out = Path(args.out or Path(args.judge) / "eval")
    write_json_atomic(out / "eval.json", report)
    tmp = out / ".eval.md.tmp"
    tmp.write_text(markdown(report))
    os.replace(tmp, out / "eval.md")
    print(markdown(report))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return report


def main(argv=None):
    try:
        run(build_parser().parse_args(argv))
    except (PairError, judge_model.JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
