"""A teacher in this process: any model mlx_lm.load reads.

It generates the completion token by token and stores, at every completion token, the exact
top-k (k = `top_k`, e.g. 32-128) of its full next-token distribution: a much richer KD signal
than an API's ~5-20 alternatives. The ids are the generated tokens themselves, so no
re-tokenization is involved; a final end-of-turn token is kept with its top-k.

With temperature > 0 the sampler is seeded from the prompt, so a rerun reproduces it.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from .teacher import Completion


@dataclass
class LocalTeacherArgs:
    model: str  # an mlx-lm model folder
    top_k: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256

    def sampling(self) -> dict:
        """The sampling parameters recorded with every completion (and hashed into its id)."""
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "top_k_stored": self.top_k}


def topk_of(logprobs: mx.array, k: int) -> list:
    """The k largest entries of a (V,) log-probability vector as [[id, logprob], ...],
    sorted by logprob descending (ties by id)."""
    idx = np.array(mx.argpartition(-logprobs, kth=k - 1)[:k])
    values = np.array(logprobs[mx.array(idx)].astype(mx.float32))
    order = np.lexsort((idx, -values))
    return [[int(idx[j]), min(float(values[j]), 0.0)] for j in order]


class LocalTeacher:
    """`teacher.generate(messages)` (blocking) or `await teacher.complete(messages)`."""

    def __init__(self, args: LocalTeacherArgs):
        self.args = args
        self.model, self.tokenizer = load(str(Path(args.model)))
        self.endpoint = "local"
        self.retries = 0  # as HTTPTeacher's; nothing is retried in process

    def generate(self, messages) -> Completion:
        a = self.args
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if a.temperature > 0:
            key = json.dumps(messages, sort_keys=True).encode()
            mx.random.seed(int(hashlib.sha256(key).hexdigest()[:8], 16))
        sampler = make_sampler(a.temperature, top_p=a.top_p)
        ids, topk, finish = [], [], "length"
        steps = generate_step(mx.array(prompt), self.model, max_tokens=a.max_tokens, sampler=sampler)
        for token, logprobs in steps:
            ids.append(int(token))
            topk.append(topk_of(logprobs, a.top_k))
            if token in self.tokenizer.eos_token_ids:
                finish = "stop"
                break
        text_ids = ids[:-1] if finish == "stop" else ids
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                 "total_tokens": len(prompt) + len(ids)}
        return Completion(
            text=self.tokenizer.decode(text_ids), reasoning=None, finish_reason=finish,
            usage=usage, completion_ids=ids, topk=topk,
        )

    async def complete(self, messages) -> Completion:
        # MLX work stays on the event loop's thread: one generation at a time, in order.
        return self.generate(messages)

    async def aclose(self):
        pass
