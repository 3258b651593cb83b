"""A teacher in this process: any model mlx_lm.load reads.

It generates the completion token by token and stores, at every completion token, the exact
top-k (k = `top_k`, e.g. 32-128) of its full next-token distribution: a much richer KD signal
than an API's ~5-20 alternatives. The ids are the generated tokens themselves, so no
re-tokenization is involved; a final end-of-turn token is kept with its top-k.

Greedy (temperature 0) prompts are decoded in batches of `batch_size` with mlx-lm's
BatchGenerator (continuous batching: a finished sequence's slot takes the next prompt at once;
prompts taken shortest first, as rows prefilled together are left-padded to the longest). Batched greedy decoding gives the tokens of the
one-at-a-time decode up to fp32 ties (the rows' matmuls differ in summation order only), and the
top-k is taken from every row's full distribution in one batched argpartition. With
temperature > 0 the sampler is seeded from the prompt, so a rerun reproduces it; such prompts are
decoded one at a time (a shared batch RNG would tie a sample to its batch mates).
scripts/bench_teacher.py measures batched vs one-at-a-time records/s and tokens/s.

`score(windows)` is teacher forcing instead: existing text (token windows) goes through the
teacher in batched forward passes, no generation, and every position gets its exact top-k
and/or N ids drawn from the full distribution with their counts (random-sampled KD, arXiv
2503.16870): one forward pass per window instead of one decode step per token
(mlx_student.teacher.score writes such records).
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.sample_utils import make_sampler

from ..hf_config import load
from ..messages import calls_in_content, normalize_messages
from .http import Completion


@dataclass
class LocalTeacherArgs:
    model: str  # an mlx-lm model folder
    top_k: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    batch_size: int = 16  # greedy: sequences decoded together (1 = one at a time)

    def sampling(self) -> dict:
        """The sampling parameters recorded with every completion (and hashed into its id)."""
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "top_k_stored": self.top_k}


def topk_rows(logprobs: mx.array, k: int) -> list:
    """Per row of a (B, V) log-probability matrix, its k largest entries as
    [[id, logprob], ...] sorted by logprob descending (ties by id); zero-probability (-inf)
    entries are left out (JSON has no -Infinity)."""
    idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, idx, axis=-1).astype(mx.float32)
    idx, values = np.array(idx), np.array(values)
    out = []
    for i, v in zip(idx, values):
        order = np.lexsort((i, -v))
        out.append([[int(i[j]), min(float(v[j]), 0.0)] for j in order if v[j] > -np.inf])
    return out


def sample_counts(logprobs: mx.array, n: int, key: mx.array) -> list:
    """Per row of a (R, V) log-probability matrix, `n` ids drawn from its distribution
    (temperature 1) as [[id, count], ...], counts summing to n, sorted by count descending
    (ties by id). `key`: the mx.random key the draws come from."""
    draws = np.array(mx.random.categorical(logprobs, num_samples=n, key=key))
    out = []
    for row in draws:
        ids, counts = np.unique(row, return_counts=True)
        order = np.lexsort((ids, -counts))
        out.append([[int(ids[j]), int(counts[j])] for j in order])
    return out


def window_key(seed: int, ids) -> mx.array:
    """The random key of a scored window: a function of (seed, its tokens) only, so a
    window's draws do not depend on its batch mates, order or shard."""
    digest = hashlib.sha256(json.dumps([seed, list(map(int, ids))]).encode()).hexdigest()
    return mx.random.key(int(digest[:8], 16))


def topk_of(logprobs: mx.array, k: int) -> list:
    """The k largest entries of a (V,) log-probability vector (see topk_rows)."""
    return topk_rows(logprobs[None], k)[0]


class LocalTeacher:
    """`teacher.generate(messages)` or `teacher.generate_many([messages, ...])` (blocking), or
    `await teacher.complete(messages)`."""

    def __init__(self, args: LocalTeacherArgs):
        self.args = args
        self.model, self.tokenizer = load(Path(args.model))
        self.endpoint = "local"
        self.retries = 0  # as HTTPTeacher's; nothing is retried in process

    def _prompt(self, messages):
        messages = calls_in_content(self.tokenizer, normalize_messages(messages))
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def _completion(self, prompt_len, ids, topk, finish) -> Completion:
        text_ids = ids[:-1] if finish == "stop" else ids
        usage = {"prompt_tokens": prompt_len, "completion_tokens": len(ids),
                 "total_tokens": prompt_len + len(ids)}
        return Completion(text=self.tokenizer.decode(text_ids), reasoning=None,
                          finish_reason=finish, usage=usage, completion_ids=ids, topk=topk)

    def generate(self, messages) -> Completion:
        a = self.args
        prompt = self._prompt(messages)
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
        return self._completion(len(prompt), ids, topk, finish)

    def generate_many(self, conversations):
        """Yield (index, Completion) for every conversation, in the order they finish."""
        a = self.args
        if a.temperature > 0 or a.batch_size <= 1:
            for i, messages in enumerate(conversations):
                yield i, self.generate(messages)
            return
        prompts = [self._prompt(m) for m in conversations]
        if not prompts:
            return
        gen = BatchGenerator(self.model, max_tokens=a.max_tokens,
                             stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
                             completion_batch_size=a.batch_size,
                             prefill_batch_size=min(a.batch_size, 8))
        try:
            # Shortest prompts first: rows prefilled together are left-padded to the longest.
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            index = dict(zip(gen.insert([prompts[i] for i in order]), order))
            ids = {uid: [] for uid in index}
            topk = {uid: [] for uid in index}
            while index:
                responses = gen.next_generated()
                tops = topk_rows(mx.stack([r.logprobs for r in responses]), a.top_k)
                for r, top in zip(responses, tops):
                    ids[r.uid].append(int(r.token))
                    topk[r.uid].append(top)
                    if r.finish_reason is not None:
                        i = index.pop(r.uid)
                        yield i, self._completion(len(prompts[i]), ids.pop(r.uid),
                                                  topk.pop(r.uid), r.finish_reason)
        finally:
            gen.close()

    def score(self, windows, top_k=0, samples=0, seed=0, batch_size=None):
        """Teacher forcing over token `windows` (lists of >= 2 ids, no generation): yield
        (index, topk, sampled) per window, where topk[i] / sampled[i] is the teacher's
        distribution for window[i + 1] given window[: i + 1]: its top `top_k` as
        [[id, logprob], ...] (`topk_rows`) and `samples` draws as [[id, count], ...]
        (`sample_counts`, keyed by `window_key(seed, window)`); either is None when 0.
        Windows go `batch_size` (default: the generation batch size) at a time, longest
        first (the order they are yielded in; ties by index), right-padded: causal
        attention keeps a position's logits independent of the padding after it (up to
        fp32 summation order across batch shapes). Raises ValueError without a target."""
        if not (top_k or samples):
            raise ValueError("score needs top_k > 0 or samples > 0")
        batch_size = batch_size or self.args.batch_size
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(windows[rows[0]]) - 1
            inputs = np.zeros((len(rows), width), np.int32)
            for r, i in enumerate(rows):
                inputs[r, : len(windows[i]) - 1] = windows[i][:-1]
            logits = self.model(mx.array(inputs)).astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            for r, i in enumerate(rows):
                lp = logprobs[r, : len(windows[i]) - 1]
                topk = topk_rows(lp, top_k) if top_k else None
                sampled = sample_counts(lp, samples, window_key(seed, windows[i])) if samples else None
                yield i, topk, sampled

    async def complete(self, messages) -> Completion:
        # MLX work stays on the event loop's thread: one generation at a time, in order.
        return self.generate(messages)

    async def aclose(self):
        pass
