"""One generation API over engines: prefill, decode with a KV cache, sampling, stop strings,
streaming, optional speculative decoding and logits processors (e.g. a JSON-schema grammar).

An *engine* is anything that calls like an mlx-lm model and makes its own cache:

    logits = engine(tokens[None], cache=cache)    # (1, T) int -> (1, T, vocab) logits, cache advanced
    cache = engine.make_cache()                   # list of per-layer objects with mlx-lm's cache API:
                                                  # .state (mx arrays, may be []), .offset,
                                                  # .is_trimmable() and .trim(n) (speculative rewinds)
    engine.tokenizer                              # an mlx-lm TokenizerWrapper

That is exactly the contract of mlx_lm.generate.generate_step, so the decode loop, the sampler and
the logits processors are mlx-lm's own and every engine shares them. MLXEngine (here) wraps an
mlx-lm model folder; CoreMLEngine (runtime/coreml_engine.py) the exported multifunction package.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream, speculative_generate_step, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_student.hf_config import load as load_folder

from mlx_student.messages import calls_in_content


class MLXEngine:
    """An mlx-lm model folder (a student checkpoint or any mlx-lm llama) run by MLX."""

    name = "mlx"

    def __init__(self, model, tokenizer, path=None, load_s: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        self.path = str(path) if path is not None else None
        self.load_s = load_s

    @classmethod
    def load(cls, path, lazy: bool = False) -> "MLXEngine":
        tic = time.perf_counter()
        model, tokenizer = load_folder(path, lazy=lazy)
        mx.eval(model.parameters())
        return cls(model, tokenizer, path, time.perf_counter() - tic)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.model(inputs, cache=cache)

    def make_cache(self) -> list:
        return make_prompt_cache(self.model)

    @property
    def layers(self):  # mlx-lm's speculative step slices a joint cache by len(model.layers)
        return self.model.layers


@dataclass
class GenerationParams:
    """Sampling and limits for one request. temperature 0 is greedy (argmax)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    time_limit_s: Optional[float] = None  # wall-clock budget; finish_reason "length" when hit
    num_draft_tokens: int = 3  # used only when a drafter is given
    logprobs: bool = False  # report each generated token's log-probability (Response.logprobs)
    top_logprobs: int = 0  # ... and the `top_logprobs` likeliest alternatives at its position


@dataclass
class Response:
    """One streamed step. `text` is the new text (may be empty while a stop string could still
    be forming); the last response carries finish_reason ("stop" or "length") and the stats."""

    text: str
    token: Optional[int]
    finish_reason: Optional[str] = None
    from_draft: bool = False
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_s: float = 0.0
    decode_tps: float = 0.0
    tokens: List[int] = field(default_factory=list)  # all generated ids, on the last response
    draft_flags: List[bool] = field(default_factory=list)  # per token: proposed by the drafter
    # With params.logprobs: (id, logprob, [(id, logprob), ...] top alternatives likeliest first)
    # of each token sampled since the previous Response; the last Response also carries the
    # end-of-sequence token's entry when generation stopped on it (as mlx_lm.server reports).
    # Log-probabilities are of the distribution after logits processors, before temperature.
    logprobs: List[tuple] = field(default_factory=list)


def encode_prompt(tokenizer: TokenizerWrapper, prompt) -> List[int]:
    if isinstance(prompt, str):
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        return tokenizer.encode(prompt, add_special_tokens=add_special)
    return list(prompt)


def chat_prompt(tokenizer: TokenizerWrapper, messages: list, tools: Optional[list] = None) -> List[int]:
    """The chat template's tokens for normalised `messages` (mlx_student.messages). A template
    that ignores `tools` (SmolLM2's does) gets them as a system message, so the model sees the
    schema it must call; one that ignores `tool_calls` sees earlier calls as their content."""
    messages = calls_in_content(tokenizer, messages)
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if tools:
        with_tools = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False)
        if with_tools == plain:
            import json

            note = ("You can call these tools. Answer with one JSON object "
                    '{"name": <tool name>, "arguments": {...}}.\n' + json.dumps(tools))
            messages = [{"role": "system", "content": note}] + list(messages)
            plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            plain = with_tools
    return tokenizer.encode(plain, add_special_tokens=False)


def _stop_index(text: str, stop: Sequence[str], start: int) -> int:
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else -1


def stream(
    engine,
    prompt,
    params: Optional[GenerationParams] = None,
    logits_processors: Optional[List[Callable]] = None,
    draft=None,
    prefill_step_size: int = 2048,
) -> Iterator[Response]:
    """Generate from `prompt` (a string or token ids), yielding Responses as tokens arrive.

    `draft` (an engine sharing the tokenizer) turns on speculative decoding through mlx-lm's
    speculative_generate_step: the drafter proposes params.num_draft_tokens tokens and the
    target verifies them in one forward pass; with greedy sampling the output is the target's
    greedy output. Stop strings are matched on the decoded text and held back while they could
    still be forming, so streamed text never contains a stop string.
    """
    p = params or GenerationParams()
    if p.max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    tokenizer = engine.tokenizer
    ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError("empty prompt")
    if p.seed is not None:
        mx.random.seed(p.seed)
    sampler = make_sampler(p.temperature, top_p=p.top_p if p.top_p < 1 else 0.0,
                           min_p=p.min_p, top_k=p.top_k)
    prompt_arr = mx.array(ids, mx.uint32)
    if draft is None:
        steps = ((t, lp, False) for t, lp in generate_step(
            prompt_arr, engine, max_tokens=p.max_tokens, sampler=sampler,
            logits_processors=logits_processors, prefill_step_size=prefill_step_size,
            prompt_cache=engine.make_cache()))
    else:
        if logits_processors:
            raise ValueError("speculative decoding with logits processors is not supported "
                             "(a stateful grammar cannot be rewound)")
        steps = speculative_generate_step(
            prompt_arr, engine, draft, num_draft_tokens=p.num_draft_tokens,
            max_tokens=p.max_tokens, sampler=sampler, prefill_step_size=prefill_step_size)

    eos = set(tokenizer.eos_token_ids)
    stop = [s for s in p.stop if s]
    hold = max((len(s) for s in stop), default=1) - 1
    detok = tokenizer.detokenizer
    detok.reset()
    text, sent, tokens, flags = "", 0, [], []
    finish, ttft, tic = "length", 0.0, time.perf_counter()
    decode_tic = tic
    module = getattr(engine, "model", None)
    ctx = wired_limit(module, [generation_stream]) if module is not None else _null()
    entries, given = [], 0
    with ctx:
        for n, (token, logprobs, from_draft) in enumerate(steps):
            token = int(token)
            if n == 0:
                ttft = time.perf_counter() - tic
                decode_tic = time.perf_counter()
            if p.logprobs:
                entries.append(_logprob_entry(token, logprobs, p.top_logprobs))
            if token in eos:
                finish = "stop"
                break
            tokens.append(token)
            flags.append(bool(from_draft))
            detok.add_token(token)
            text += detok.last_segment
            if stop:
                i = _stop_index(text, stop, max(0, sent - hold))
                if i >= 0:
                    text, finish = text[:i], "stop"
                    break
                safe = max(sent, len(text) - hold)
            else:
                safe = len(text)
            if len(tokens) == p.max_tokens:
                break
            if p.time_limit_s is not None and time.perf_counter() - tic > p.time_limit_s:
                break
            if safe > sent:
                yield Response(text[sent:safe], token, from_draft=from_draft,
                               prompt_tokens=len(ids), generation_tokens=len(tokens),
                               logprobs=entries[given:])
                sent, given = safe, len(entries)
        steps.close()
    if finish == "length":
        detok.finalize()
        text += detok.last_segment
        if stop:
            i = _stop_index(text, stop, max(0, sent - hold))
            if i >= 0:
                text, finish = text[:i], "stop"
    elapsed = time.perf_counter() - decode_tic
    yield Response(text[sent:], tokens[-1] if tokens else None, finish, prompt_tokens=len(ids),
                   generation_tokens=len(tokens), ttft_s=ttft,
                   decode_tps=(len(tokens) - 1) / elapsed if len(tokens) > 1 and elapsed > 0 else 0.0,
                   tokens=tokens, draft_flags=flags, logprobs=entries[given:])


def _logprob_entry(token: int, logprobs: mx.array, top: int) -> tuple:
    """(token, its logprob, [(id, logprob)] of the `top` likeliest, likeliest first); ids a
    logits processor masked out (-inf) are left out of the alternatives."""
    alternatives = []
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        pairs = zip(ids.tolist(), logprobs[ids].tolist())
        alternatives = sorted(((i, v) for i, v in pairs if v != -math.inf), key=lambda t: (-t[1], t[0]))
    return token, logprobs[token].item(), alternatives


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def generate(engine, prompt, params: Optional[GenerationParams] = None, **kwargs) -> Response:
    """The whole completion as one Response (text, tokens, finish_reason, stats, logprobs)."""
    text, entries, last = "", [], None
    for last in stream(engine, prompt, params, **kwargs):
        text += last.text
        entries += last.logprobs
    last.text, last.logprobs = text, entries
    return last
