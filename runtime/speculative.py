"""Speculative decoding: a drafter proposes k tokens, the target verifies them in one pass.

The loop is mlx-lm's speculative_generate_step (runtime.generate.stream(..., draft=drafter)):
per round the drafter decodes k tokens, the target runs once over [last token, k drafts] and
keeps the drafts up to the first one that differs from its own choice, plus its own next token,
then both caches are trimmed back. With greedy sampling the output is the target's greedy
output (tests/test_speculative.py checks it token for token). This module adds the drafters
we can build without training one, and the acceptance statistics.
"""

from dataclasses import dataclass
from typing import List

import mlx.core as mx
import mlx.nn as nn

from .generate import GenerationParams, MLXEngine, stream


def quantized_drafter(path, bits: int = 4, group_size: int = 64) -> MLXEngine:
    """The target itself with its weights quantized (self-speculation): same tokenizer, cheaper
    to read per token, mostly the same argmax."""
    engine = MLXEngine.load(path)
    nn.quantize(engine.model, group_size=group_size, bits=bits)
    mx.eval(engine.model.parameters())
    return engine


@dataclass
class SpecStats:
    tokens: int  # generated
    rounds: int  # target verification passes
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0


def spec_stats(from_draft: List[bool], k: int, max_tokens: int) -> SpecStats:
    """Reconstruct rounds from mlx-lm's per-token from_draft flags: a round yields its accepted
    drafts (True) then the target's own token (False); it proposed min(k, tokens left) drafts."""
    rounds = drafted = accepted = done = 0
    i = 0
    while i < len(from_draft):
        rounds += 1
        drafted += min(k, max_tokens - done)
        while i < len(from_draft) and from_draft[i]:
            accepted += 1
            i += 1
            done += 1
        if i < len(from_draft):  # the target's token closing the round
            i += 1
            done += 1
    return SpecStats(len(from_draft), rounds, drafted, accepted)


def generate_speculative(target, drafter, prompt, params: GenerationParams):
    """(Response, SpecStats) of one speculative generation."""
    text, last = "", None
    for last in stream(target, prompt, params, draft=drafter):
        text += last.text
    last.text = text
    return last, spec_stats(last.draft_flags, params.num_draft_tokens, params.max_tokens)
