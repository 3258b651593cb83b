"""The pairwise judge: an mlx-lm llama backbone with a score head and a CAWS clause head.

    judge, tokenizer, config = load("runs/judge")
    ids, lengths = batch_ids([encode(tokenizer, prompt, text, judge.spec.max_length)])
    score, clause_logits = judge(ids, lengths)          # (B,), (B, 5)
    p_a = preference(judge, tokenizer, prompt, a, b)     # P(a > b) = sigmoid(s(a) - s(b))

Each candidate is read on its own as `prompt + SEPARATOR + candidate + eos`, right-padded; both
heads read the final-norm hidden state of the last real token (the eos), so a batch's padding
never changes a score (causal attention). A pair's margin is score(a) - score(b): swapping A
and B negates it exactly, so the judge has no position bias by construction (the reward-model
form of Ouyang et al. 2022, InstructGPT; Bradley & Terry 1952).

Checkpoint = an mlx-lm model folder (the backbone: mlx_lm.load reads it, LM head and all),
`judge_heads.safetensors` (score_head.weight (1, C), score_head.bias (1,), clause_head.weight
(5, C), clause_head.bias (5,)) and `student.judge` in config.json (JudgeSpec: clause names,
separator, max_length, heads file).

Losses (`pair_loss`, `clause_loss`): Bradley-Terry with a margin, as Llama 2's reward model
(Touvron et al. 2023): -log sigmoid(d - m) for winner a, -log sigmoid(-d - m) for b, with
d = s(a) - s(b) and m the row's margin; a tie is the soft target 0.5 (no margin). All three
are one binary cross-entropy with logits (d - (2y - 1) m) against y in {1, 0, 0.5}. A teacher's
P(a > b) enters the same way, as a soft target y with m = 0 (`kd` term).
"""

import mlx_student  # noqa: F401  (first: picks OpenBLAS on Linux before mlx loads)

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_student import model as student_model
from mlx_student.config import StudentConfig

CLAUSES = ("EVIDENCE_COMPLETENESS", "BUDGET_ADHERENCE", "GATE_INTEGRITY", "PROVENANCE_CLARITY",
           "WAIVER_JUSTIFICATION")
HEADS_FILE = "judge_heads.safetensors"
SEPARATOR = "\n\n### Candidate\n"


class JudgeError(ValueError):
    """A folder that is not a judge checkpoint, or a judge input it cannot take."""


@dataclass
class JudgeSpec:
    """The `student.judge` block of a judge checkpoint's config.json."""
    clauses: list = field(default_factory=lambda: list(CLAUSES))
    max_length: int = 512  # tokens of (prompt, candidate), eos included
    separator: str = SEPARATOR
    heads: str = HEADS_FILE


class Judge(nn.Module):
    """backbone: an mlx-lm llama Model; heads over its final-norm hidden state (C = hidden)."""

    def __init__(self, backbone: llama.Model, spec: JudgeSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        hidden = backbone.args.hidden_size
        self.score_head = nn.Linear(hidden, 1)
        self.clause_head = nn.Linear(hidden, len(spec.clauses))

    def hidden(self, ids: mx.array, lengths: mx.array) -> mx.array:
        """ids (B, T) int32 right-padded, lengths (B,) -> final-norm hidden state (B, C) of
        each row's last real token."""
        h = self.backbone.model(ids)
        return mx.take_along_axis(h, (lengths - 1).astype(mx.int32)[:, None, None], axis=1)[:, 0]

    def __call__(self, ids: mx.array, lengths: mx.array):
        """-> (score (B,), clause_logits (B, len(clauses)))."""
        h = self.hidden(ids, lengths)
        return self.score_head(h)[:, 0], self.clause_head(h)


def encode(tokenizer, prompt: str, candidate: str, max_length: int,
           separator: str = SEPARATOR) -> list:
    """Token ids of prompt + separator + candidate + eos, at most `max_length`. When too long,
    the candidate keeps its start (at least 3/4 of the budget when the prompt is longer) and the
    prompt keeps its end (the question sits last)."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(separator + candidate, add_special_tokens=False)
    budget = max_length - 1
    c = c[: budget - min(len(p), budget // 4)]
    keep = budget - len(c)
    return p[max(len(p) - keep, 0):] + c + [tokenizer.eos_token_id]


def batch_ids(seqs: list, pad_to: int = None, pad_id: int = 0):
    """Right-pad token lists -> (ids (B, T) int32, lengths (B,) int32); T = `pad_to` or the
    longest row."""
    T = pad_to or max(len(s) for s in seqs)
    if any(len(s) > T for s in seqs):
        raise JudgeError(f"a sequence of {max(len(s) for s in seqs)} tokens exceeds {T}")
    ids = mx.array([list(s) + [pad_id] * (T - len(s)) for s in seqs], dtype=mx.int32)
    return ids, mx.array([len(s) for s in seqs], dtype=mx.int32)


def pair_loss(d: mx.array, target: mx.array, margin: mx.array) -> mx.array:
    """Bradley-Terry loss with margin, mean over pairs. d = s(a) - s(b) (B,); target
    P(a > b) (B,): 1, 0, 0.5 for a tie, or a teacher's soft preference; margin (B,) >= 0
    (applied only to decided pairs, in the winner's favour)."""
    return nn.losses.binary_cross_entropy(d - (2 * target - 1) * margin, target, with_logits=True,
                                          reduction="mean")


def clause_loss(logits: mx.array, labels: mx.array) -> mx.array:
    """Clause BCE, mean over candidates and clauses. logits, labels (N, clauses)."""
    return nn.losses.binary_cross_entropy(logits, labels.astype(mx.float32), with_logits=True,
                                          reduction="mean")


def build(config: StudentConfig, backbone: llama.Model, spec: JudgeSpec, seed: int = 0) -> Judge:
    """A judge over `backbone` with fresh heads: score head zero (every pair starts at
    P = 0.5), clause head N(0, 0.02), biases zero."""
    judge = Judge(backbone, spec)
    k = mx.random.key(seed + 7919)
    C = config.hidden_size
    judge.score_head.weight = mx.zeros((1, C))
    judge.score_head.bias = mx.zeros((1,))
    judge.clause_head.weight = 0.02 * mx.random.normal((len(spec.clauses), C), key=k)
    judge.clause_head.bias = mx.zeros((len(spec.clauses),))
    mx.eval(judge.parameters())
    return judge


def heads(judge: Judge) -> dict:
    """{name: array} of the two heads, as stored in judge_heads.safetensors."""
    return {k: v for k, v in tree_flatten(judge.parameters()) if not k.startswith("backbone.")}


def save(path, judge: Judge, config: StudentConfig, tokenizer, keep=()) -> Path:
    """Write the judge checkpoint folder atomically (see the module docstring)."""
    config = dataclasses.replace(config, role="judge", judge=dataclasses.asdict(judge.spec))
    return student_model.save(path, judge.backbone, config, tokenizer, keep=keep,
                              extra={judge.spec.heads: heads(judge)})


def read_spec(path) -> tuple:
    """(StudentConfig, JudgeSpec) of a judge folder. Raises JudgeError if it is not one."""
    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except OSError as e:
        raise JudgeError(f"{path}: not a model folder: {e.strerror}") from None
    block = raw.get("student", {}).get("judge")
    if not isinstance(block, dict):
        raise JudgeError(f"{path}/config.json: student.judge: missing (not a judge checkpoint)")
    try:
        spec = JudgeSpec(**block)
    except TypeError as e:
        raise JudgeError(f"{path}/config.json: student.judge: {e}") from None
    if not (path / spec.heads).exists():
        raise JudgeError(f"{path}: {spec.heads} is missing (the judge's heads)")
    return StudentConfig.from_mlx_config(raw), spec


def load(path):
    """Load a judge folder. Returns (Judge, tokenizer, StudentConfig)."""
    config, spec = read_spec(path)
    backbone, tokenizer, _ = student_model.load(path)
    judge = Judge(backbone, spec)
    judge.load_weights(list(mx.load(str(Path(path) / spec.heads)).items()), strict=False)
    mx.eval(judge.parameters())
    return judge, tokenizer, config


def score(judge: Judge, tokenizer, prompt: str, candidates: list):
    """Scores (N,) and clause probabilities (N, clauses) of candidates for one prompt."""
    seqs = [encode(tokenizer, prompt, c, judge.spec.max_length, judge.spec.separator)
            for c in candidates]
    s, c = judge(*batch_ids(seqs))
    return s, mx.sigmoid(c)


def preference(judge: Judge, tokenizer, prompt: str, a: str, b: str) -> float:
    """P(a > b) = sigmoid(score(a) - score(b))."""
    s, _ = score(judge, tokenizer, prompt, [a, b])
    return mx.sigmoid(s[0] - s[1]).item()
