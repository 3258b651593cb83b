"""Judge pair rows: read a JSONL split and refuse a malformed row naming file:line and field.

One row per line (written by mlx_student.judge_data):

    {"id": str, "scenario": str, "prompt": str,
     "a": {"text": str, "clauses": {CLAUSE: 0|1, ... all five}}, "b": {...},
     "winner": "a" | "b" | "tie", "margin": float >= 0 (optional),
     "source": "generated" | "kd_corruption" | "imported"}

The shape is the shipped schema `arbiter/schemas/judge_pair.json` (the one judge_data writes
against), checked with `arbiter.schemas.errors_of`; an error reads
`data/pairs/train.jsonl:12: $.a.clauses: 'GATE_INTEGRITY' is a required property (rule: required)`.
"""

from pathlib import Path

from mlx_student.files import jsonl_records

from ..schemas import errors_of
from .model import CLAUSES

SPLITS = ("train", "valid", "test")
WINNERS = ("a", "b", "tie")
TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}  # P(a > b) of each label


class PairError(ValueError):
    """A pair file that cannot be read or holds a malformed row (file:line: field: problem)."""


def read_pairs(path) -> list:
    """The rows of one JSONL file, each checked. Raises PairError naming file:line: field."""
    path = Path(path)
    rows, seen = [], {}
    for n, row in jsonl_records(path, PairError):
        errors = errors_of(row, "judge_pair")
        if errors:
            raise PairError("\n".join(f"{path}:{n}: {e}" for e in errors))
        if row["id"] in seen:
            raise PairError(f"{path}:{n}: $.id: {row['id']!r} repeats line {seen[row['id']]}")
        seen[row["id"]] = n
        rows.append(row)
    if not rows:
        raise PairError(f"{path}: no pair rows")
    return rows


def read_split(folder, split: str, required: bool = True):
    """Rows of `<folder>/<split>.jsonl`; None when absent and not `required`."""
    path = Path(folder) / f"{split}.jsonl"
    if not path.exists():
        if required:
            raise PairError(f"{path}: missing (a pair folder holds {', '.join(s + '.jsonl' for s in SPLITS)})")
        return None
    return read_pairs(path)


def clause_vector(candidate: dict) -> list:
    """The candidate's clause labels in CLAUSES order."""
    return [candidate["clauses"][c] for c in CLAUSES]
