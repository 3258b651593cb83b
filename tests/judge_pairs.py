"""A small, separable set of judge pair rows built from real text (the CPython stdlib corpus).

Each prompt asks to review a real stdlib snippet; each candidate is a review whose five CAWS
clauses are satisfied or not, each stated by its own phrase (e.g. "Evidence: E-0042 (tests)"
against "Evidence: none attached."). The winner satisfies
all five, the loser violates one to three (a tie when both satisfy all; margin = half the
difference); both winner positions occur.
"""

import json
import random
from pathlib import Path

from arbiter.judge.model import CLAUSES

ROOT = Path(__file__).parent.parent
PHRASES = {  # clause: (satisfied, violated)
    "EVIDENCE_COMPLETENESS": ("Evidence: E-{n:04d} (tests), E-{m:04d}.",
                              "Evidence: none attached for the tests or the coverage."),
    "BUDGET_ADHERENCE": ("The diff stays within the tier budget.", "The diff is over the budget."),
    "GATE_INTEGRITY": ("All gates ran.", "Gates were skipped by the author, not run at all."),
    "PROVENANCE_CLARITY": ("Provenance: commit {n:x} by the author.", "Provenance unknown."),
    "WAIVER_JUSTIFICATION": ("Waiver WV-{m:04d} is justified and active.", "A waiver is claimed without reason."),
}


def snippets(limit=400):
    out = []
    for line in (ROOT / "data/stdlib/train.jsonl").read_text().splitlines():
        lines = [x for x in json.loads(line)["text"].splitlines() if 20 < len(x.strip()) < 90]
        out += [lines[i:i + 4] for i in range(0, len(lines) - 4, 25)]
        if len(out) >= limit:
            break
    return out


def candidate(rng, labels, lines):
    parts = []
    for c in CLAUSES:
        ok, bad = PHRASES[c]
        parts.append((ok if labels[c] else bad).format(n=rng.randrange(10000), m=rng.randrange(10000)))
    return {"text": " ".join(parts), "clauses": labels}


def make_rows(n, seed=0, ties=0.1):
    rng = random.Random(seed)
    pool = snippets()
    rows = []
    for i in range(n):
        lines = rng.choice(pool)
        prompt = "Review this change and its CAWS evidence:\n" + lines[0].strip()
        la = dict.fromkeys(CLAUSES, 1)
        lb = dict(la)
        if rng.random() >= ties:  # the loser violates one to three clauses
            for c in rng.sample(CLAUSES, rng.randint(1, 3)):
                lb[c] = 0
        if rng.random() < 0.5:
            la, lb = lb, la
        diff = sum(la.values()) - sum(lb.values())
        rows.append({"id": f"p{seed}-{i}", "scenario": "evidence_completeness", "prompt": prompt,
                     "a": candidate(rng, la, lines), "b": candidate(rng, lb, lines),
                     "winner": "tie" if diff == 0 else ("a" if diff > 0 else "b"),
                     "margin": float(abs(diff)) / 2, "source": "generated"})
    return rows


def write_folder(path, n_train=256, n_valid=48, n_test=64):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("valid", n_valid, 2), ("test", n_test, 3)):
        (path / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in make_rows(n, seed)))
    return path
