"""A teacher LLM's pairwise preference, the judge's soft KD target and its zero-shot baseline.

    teacher = Teacher.load("models/smollm2-135m-instruct")   # any mlx_lm.load folder
    both, ab, ba = teacher.preferences(rows)   # P(a > b) per row: averaged, A-first, B-first

The teacher (in this process) reads a chat prompt that shows the request and the two responses
as "Response A" and "Response B", asks "Which response is better, A or B?", and its assistant
turn is primed with "The better response is"; P(A) is the softmax over its next-token logits
of " A" and " B" only (the LLM-as-a-judge form of Zheng et al. 2023, MT-Bench). Each pair is
asked in both orders and P(a > b) = (P(A | a, b) + 1 - P(A | b, a)) / 2, which removes the
teacher's position bias from the target; the single-order answers give its position
consistency (eval).
"""

import mlx_student  # noqa: F401  (first: picks OpenBLAS on Linux before mlx loads)

from dataclasses import dataclass

import mlx.core as mx
import mlx_lm
import numpy as np

from .model import batch_ids

QUESTION = "Which response is better, A or B? Answer with one letter."
PRIMER = "The better response is"
CHOICES = (" A", " B")


@dataclass
class Teacher:
    model: object
    tokenizer: object
    max_length: int = 1024  # tokens of one question; each text is cut to its share
    batch_size: int = 8

    @classmethod
    def load(cls, path, **kw) -> "Teacher":
        model, tokenizer = mlx_lm.load(str(path))
        return cls(model, tokenizer, **kw)

    def choice_ids(self) -> list:
        ids = [self.tokenizer.encode(c, add_special_tokens=False) for c in CHOICES]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the teacher's tokenizer splits {CHOICES} into {ids}: "
                             "one token each is needed")
        return [i[0] for i in ids]

    def _cut(self, text: str, tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= tokens else self.tokenizer.decode(ids[:tokens]) + " ..."

    def question(self, prompt: str, first: str, second: str) -> list:
        """Token ids of one question (chat template, assistant turn primed)."""
        share = (self.max_length - 96) // 4  # prompt 2 shares, each response 1
        content = (f"{QUESTION}\n\n### Request\n{self._cut(prompt, 2 * share)}\n\n"
                   f"### Response A\n{self._cut(first, share)}\n\n"
                   f"### Response B\n{self._cut(second, share)}")
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text + PRIMER, add_special_tokens=False)

    def p_first(self, questions: list) -> np.ndarray:
        """P(" A") against P(" B") after each question (N,), batched and right-padded."""
        ab = mx.array(self.choice_ids())
        out = []
        for i in range(0, len(questions), self.batch_size):
            ids, lengths = batch_ids(questions[i:i + self.batch_size])
            logits = self.model(ids)
            last = mx.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            two = last[:, ab].astype(mx.float32)
            out.append(np.array(mx.softmax(two, axis=-1)[:, 0]))
        return np.concatenate(out) if out else np.zeros(0)

    def preferences(self, rows: list) -> tuple:
        """(P(a > b) averaged over both orders, P(A) with a first, P(A) with b first), (N,)
        each, for pair rows ({prompt, a: {text}, b: {text}})."""
        qs = [self.question(r["prompt"], r["a"]["text"], r["b"]["text"]) for r in rows]
        qs += [self.question(r["prompt"], r["b"]["text"], r["a"]["text"]) for r in rows]
        p = self.p_first(qs)
        ab, ba = p[: len(rows)], p[len(rows):]
        return 0.5 * (ab + 1.0 - ba), ab, ba
