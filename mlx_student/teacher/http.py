"""A teacher behind any OpenAI-compatible `/v1/chat/completions` endpoint, over httpx.

Kimi K2-Thinking's API in production; vLLM, llama.cpp's server or `mlx_lm.server` locally.
`HTTPTeacher.complete(messages)` returns a `Completion`: the text, the reasoning text when
the API returns one (`reasoning_content`, or `reasoning` as mlx_lm.server names it), the
finish reason, the usage and, when asked for (`top_logprobs > 0`) and offered, the raw
top-logprob lists of every generated token.

Messages go out in OpenAI's wire shape (mlx_student.messages.normalize_messages with
`arguments="string"`: null content is "", text parts joined, tool-call arguments JSON strings);
a malformed message raises MessageError naming the field before any request is sent.

Requests run at most `concurrency` at a time and at most `rpm` a minute; 429, 5xx, timeouts
and dropped connections are retried with exponential backoff and full jitter, waiting what
`Retry-After` asks for when the server sends it. Other statuses fail at once.

`align(...)` turns the raw top-logprob lists into `completion_ids` and per-token top-k
sorted by logprob, checked against the student's tokenizer (see its docstring).
"""

import asyncio
import email.utils
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import httpx

from ..messages import normalize_messages
from ..records import MAX_LOGPROB  # teacher logprobs may round to slightly above 0

RETRY_STATUS = {408, 409, 425, 429}


class TeacherError(RuntimeError):
    """A request that failed for good: a non-retryable status, or every retry failed. `kind`
    says how, for counting: 'HTTP <status>', the transport error's class name (ConnectError,
    ReadTimeout, ...), 'malformed response', or 'setup'."""

    def __init__(self, message: str, kind: str = "setup"):
        super().__init__(message)
        self.kind = kind


class AlignmentError(ValueError):
    """Top-k positions that cannot be matched one to one with the completion's tokens."""


@dataclass
class Completion:
    """One teacher answer. `logprobs` holds the API's raw per-token alternatives
    (`[{"id"?, "token", "logprob"}, ...]` per generated token); a local teacher fills
    `completion_ids` and `topk` directly instead."""

    text: str
    reasoning: Optional[str]
    finish_reason: Optional[str]
    usage: dict
    logprobs: Optional[list] = None
    completion_ids: Optional[list] = None
    topk: Optional[list] = None
    tool_calls: Optional[list] = None  # the message's OpenAI tool_calls, when it made any


@dataclass
class HTTPTeacherArgs:
    base_url: str  # ends with /v1, as OpenAI clients expect
    model: str
    api_key_env: Optional[str] = None  # name of the environment variable with the key
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    top_logprobs: int = 0  # 0: do not ask for logprobs
    concurrency: int = 4
    timeout: float = 120.0
    max_retries: int = 6
    backoff: float = 1.0  # seconds before the first retry, doubled each time
    max_backoff: float = 60.0
    rpm: float = 0.0  # requests per minute; 0: unlimited

    def sampling(self) -> dict:
        """The sampling parameters recorded with every completion (and hashed into its id)."""
        out = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.top_logprobs:
            out["top_logprobs"] = self.top_logprobs
        return out


class RateLimiter:
    """Space request starts at least 60/rpm seconds apart (no burst)."""

    def __init__(self, rpm):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next = 0.0
        self.lock = asyncio.Lock()

    async def wait(self):
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            start = max(self.next, now)
            self.next = start + self.interval
        await asyncio.sleep(start - now)


def retry_after(response) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def parse_response(data) -> Completion:
    """A chat.completion JSON body as a `Completion`; KeyError/TypeError if malformed."""
    choice = data["choices"][0]
    message = choice["message"]
    reasoning = message.get("reasoning_content") or message.get("reasoning") or None
    logprobs = choice.get("logprobs") or {}
    content = logprobs.get("content")
    positions = None
    if content:
        positions = [entry.get("top_logprobs") or [] for entry in content]
    return Completion(
        text=message.get("content") or "",
        reasoning=reasoning,
        finish_reason=choice.get("finish_reason"),
        usage=data.get("usage") or {},
        logprobs=positions,
        tool_calls=message.get("tool_calls") or None,
    )


class HTTPTeacher:
    """`await teacher.complete(messages)`; `await teacher.aclose()` when done."""

    def __init__(self, args: HTTPTeacherArgs):
        headers = {}
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise TeacherError(
                    f"the API key variable {args.api_key_env} is not set in the environment"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.args = args
        self.endpoint = args.base_url.rstrip("/") + "/chat/completions"
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(args.timeout),
            limits=httpx.Limits(max_connections=args.concurrency),
        )
        self.semaphore = asyncio.Semaphore(args.concurrency)
        self.limiter = RateLimiter(args.rpm)
        self.retries = 0  # retried attempts, all requests together

    def body(self, messages, tools=None, tool_choice=None, extra=None) -> dict:
        """The request body; `extra` (e.g. `response_format`, `seed`, a per-request
        `temperature`) is merged in last."""
        a = self.args
        messages = normalize_messages(messages, arguments="string")  # MessageError names the field
        body = {"model": a.model, "messages": messages, "temperature": a.temperature,
                "top_p": a.top_p, "max_tokens": a.max_tokens, "stream": False}
        if tools:
            body["tools"] = tools
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        if a.top_logprobs:
            body.update(logprobs=True, top_logprobs=a.top_logprobs)
        body.update(extra or {})
        return body

    async def complete(self, messages, tools=None, tool_choice=None, extra=None) -> Completion:
        """One chat completion; `tools` / `tool_choice` are passed as OpenAI's (tool calls
        come back in `Completion.tool_calls`); `extra` body fields as in `body`."""
        a = self.args
        body = self.body(messages, tools, tool_choice, extra)
        for attempt in range(a.max_retries + 1):
            wait = None
            await self.limiter.wait()
            try:
                async with self.semaphore:
                    response = await self.client.post(self.endpoint, json=body)
            except httpx.TransportError as e:  # connect/read errors, timeouts, dropped bodies
                kind, error = type(e).__name__, f"{type(e).__name__}: {e}"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return parse_response(response.json())
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        kind = "malformed response"
                        error = f"malformed response body ({type(e).__name__}: {e})"
                elif status in RETRY_STATUS or status >= 500:
                    kind, error = f"HTTP {status}", f"HTTP {status}: {response.text[:200]}"
                    wait = retry_after(response)
                else:
                    raise TeacherError(f"{self.endpoint}: HTTP {status}: {response.text[:500]}",
                                       f"HTTP {status}")
            if attempt == a.max_retries:
                break
            if wait is None:  # exponential backoff with full jitter
                wait = random.uniform(0, a.backoff * 2**attempt)
            self.retries += 1
            await asyncio.sleep(min(wait, a.max_backoff))
        raise TeacherError(
            f"{self.endpoint}: failed after {a.max_retries + 1} attempts; last: {error}", kind
        )

    async def aclose(self):
        await self.client.aclose()


def _token_id(tokenizer, entry):
    """The vocabulary id of one top-logprob entry: its `id`, vLLM's `token_id:N`, or its
    token string mapped through the vocabulary (checked by mapping back)."""
    if isinstance(entry.get("id"), int):
        return entry["id"]
    token = entry.get("token")
    if not isinstance(token, str):
        raise AlignmentError(f"a top-logprob entry has neither an id nor a token: {entry}")
    if token.startswith("token_id:") and token[9:].isdigit():
        return int(token[9:])
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise AlignmentError(f"token {token!r} is not in the student's vocabulary")
    return token_id


def sorted_topk(tokenizer, alternatives, vocab_size) -> list:
    """One position's alternatives as [[id, logprob], ...], sorted by logprob descending
    (ties by id); validated: ids unique and in the vocabulary, logprobs <= 0; -inf ones
    (zero probability: no target, and not JSON) are left out."""
    pairs = {}
    for entry in alternatives:
        token_id, logprob = _token_id(tokenizer, entry), entry.get("logprob")
        if not 0 <= token_id < vocab_size:
            raise AlignmentError(f"token id {token_id} outside the vocabulary ({vocab_size})")
        if not isinstance(logprob, (int, float)) or math.isnan(logprob) or logprob > MAX_LOGPROB:
            raise AlignmentError(f"logprob {logprob!r} of token {token_id} is not a log-probability")
        if token_id in pairs:
            raise AlignmentError(f"token id {token_id} is listed twice at one position")
        if logprob > -math.inf:  # a zero-probability alternative carries no target
            pairs[token_id] = min(float(logprob), 0.0)
    return sorted(([i, lp] for i, lp in pairs.items()), key=lambda p: (-p[1], p[0]))


def _search(tokenizer, text, topk, budget):
    """Ids, one from each position's top-k, that decode to exactly `text`; likelier
    candidates first, with backtracking over at most `budget` candidates; or None."""
    ids, tried = [], [0]
    while True:
        i = len(ids)
        if i == len(topk):
            if tokenizer.decode(ids) == text:
                return ids
        elif tried[i] < len(topk[i]) and budget > 0:
            budget -= 1
            candidate = topk[i][tried[i]][0]
            tried[i] += 1
            # A token may end inside a UTF-8 character: it decodes to U+FFFD until completed.
            if text.startswith(tokenizer.decode(ids + [candidate]).rstrip("\ufffd")):
                ids.append(candidate)
                tried.append(0)
            continue
        if not ids:
            return None
        ids.pop()
        tried.pop()


def align(tokenizer, text, finish_reason, positions, vocab_size):
    """Return `(completion_ids, topk)` for an API completion, or raise AlignmentError.

    APIs report alternatives per generated token but not reliably the token that was
    generated (mlx_lm.server reports an arbitrary member of its unsorted top list). So the
    ids are the text re-tokenized by the student's tokenizer when that gives one id per
    position, each among its position's top-k, decoding back to the text. Models do not
    always generate the canonical tokenization (the re-tokenized text can be a token
    shorter); then the ids are searched for among the top-k lists, likelier first, and
    must decode to exactly the text. After a "stop", a last extra position (mlx_lm.server
    reports one) is the end-of-turn token: its best end-of-turn candidate. Anything else is
    a mismatch, never a silent shift.
    """
    topk = [sorted_topk(tokenizer, alternatives, vocab_size) for alternatives in positions]
    canonical = list(tokenizer.encode(text, add_special_tokens=False))
    layouts = [(topk, [])]
    if finish_reason == "stop" and topk:
        stop = [i for i, _ in topk[-1] if i in tokenizer.eos_token_ids]
        if stop:
            layouts.insert(0, (topk[:-1], stop[:1]))
    for text_topk, stop in layouts:
        if len(canonical) == len(text_topk) and tokenizer.decode(canonical) == text and all(
                any(t == c for c, _ in top) for t, top in zip(canonical, text_topk)):
            return canonical + stop, topk
    for text_topk, stop in layouts:
        ids = _search(tokenizer, text, text_topk, budget=4 * sum(map(len, text_topk)))
        if ids is not None:
            return ids + stop, topk
    raise AlignmentError(
        f"no ids from the {len(topk)} positions' top-k decode to the text (it re-tokenizes "
        f"to {len(canonical)} tokens)"
    )
