"""The OpenAI request contract of runtime.server: what a request may say, checked up front.

    request = parse_chat(body, cfg, n_vocab)        # POST /v1/chat/completions
    request = parse_completion(body, cfg, n_vocab)  # POST /v1/completions

Every parameter the server honours is listed in CHAT_PARAMS / COMPLETION_PARAMS; any other
key, or a supported key with a value the server cannot honour (`n` above 1, `echo`,
`best_of`, `suffix`), is a 400 naming it: nothing is silently ignored. The sampling extensions
mlx_lm.server accepts (`top_k`, `min_p`, `repetition_penalty`) are accepted too; penalties and
`logit_bias` run as mlx-lm's own logits processors (over the last 20 tokens, as mlx_lm.server).
`model` and `user` are accepted and have no effect (one model is served; no per-user state).

Logprobs (chat: `logprobs: true` + `top_logprobs` 0..20; completions: `logprobs` 0..20, the
legacy shape) report the distribution after logits processors and before temperature, as
mlx_lm.server does; each entry also carries the token `id` (mlx_lm.server's field), so the
server can be the next student's teacher (mlx_student.teacher.http aligns by id). After a
"stop" on the end-of-sequence token, its position is the last entry (as mlx_lm.server).
"""

from dataclasses import dataclass, field
from typing import List, Optional

from mlx_student.messages import MessageError, find_surrogate, normalize_messages

from .constrained import check_schema, tool_call_schema
from .generate import GenerationParams

MAX_TOP_LOGPROBS = 20  # OpenAI's limit

SAMPLING_PARAMS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                   "stream", "stream_options", "n", "user", "logit_bias", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logprobs"}
CHAT_PARAMS = SAMPLING_PARAMS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                 "parallel_tool_calls", "response_format"}
COMPLETION_PARAMS = SAMPLING_PARAMS | {"prompt", "echo", "best_of", "suffix"}


class RequestError(Exception):
    """A request the server answers with an HTTP error: status, message, the parameter at
    fault (OpenAI's `param`), an error code and OpenAI's error type."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass
class Request:
    """One checked request. `mode`: "text", "json" (response_format) or "tool" (tools);
    `schema`: the JSON schema the output is constrained to (json and tool modes)."""

    params: GenerationParams
    stream: bool
    include_usage: bool
    mode: str = "text"
    schema: Optional[dict] = None
    messages: Optional[list] = None  # chat
    tools: Optional[list] = None  # chat, tool mode
    prompt: object = None  # completions: a string or token ids
    processor_args: dict = field(default_factory=dict)  # mlx_lm make_logits_processors kwargs


def _number(body, key, default, lo, hi, cast=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (cast is int and int(v) != v):
        raise RequestError(400, f"'{key}' must be a {'integer' if cast is int else 'number'}", key)
    if not lo <= v <= hi:
        raise RequestError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return cast(v)


def _only(body, key, allowed, why):
    if key in body and body[key] not in allowed:
        raise RequestError(400, f"'{key}' = {body[key]!r} is not supported: {why}", key)


def _common(body, cfg, known, n_vocab):
    """The checks every route shares; returns (GenerationParams, stream, include_usage, processor_args)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    for key in body:
        if key not in known:
            raise RequestError(400, f"unsupported parameter '{key}'", key, code="unsupported_parameter")
    for key, value in body.items():
        try:
            find_surrogate(value, key)
        except MessageError as e:
            raise RequestError(400, str(e), e.path)
    _only(body, "n", (None, 1), "one choice per request (send n requests, with different seeds)")
    limit = cfg["max_tokens_limit"]
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, min(cfg["default_max_tokens"], limit), 1, limit, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError(400, "'stream_options' is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise RequestError(400, "'stream_options' supports only {\"include_usage\": true|false}", "stream_options")
        include_usage = options.get("include_usage", False)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise RequestError(400, "'logit_bias' must map token ids to biases", "logit_bias")
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise RequestError(400, "'logit_bias' must map token ids to numbers", "logit_bias") from None
        bad = [k for k, v in bias.items() if not 0 <= k < n_vocab or not -100 <= v <= 100]
        if bad:
            raise RequestError(400, f"'logit_bias': token id {bad[0]} is outside the vocabulary ({n_vocab}) "
                               "or its bias outside [-100, 100]", "logit_bias")
    processor_args = {k: v for k, v in {
        "logit_bias": bias or None,
        "presence_penalty": _number(body, "presence_penalty", 0.0, -2.0, 2.0) or None,
        "frequency_penalty": _number(body, "frequency_penalty", 0.0, -2.0, 2.0) or None,
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, 0.0, 10.0) or None,
    }.items() if v is not None}
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, 0, 1 << 20, int),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=_number(body, "seed", None, 0, 2**63 - 1, int),
        stop=stop, time_limit_s=cfg["time_limit"], num_draft_tokens=cfg["num_draft_tokens"])
    return params, stream, include_usage, processor_args


def _checked_schema(schema, param):
    try:
        check_schema(schema)
    except ValueError as e:
        raise RequestError(400, f"{param}: {e}", param)
    return schema


def parse_chat(body, cfg: dict, n_vocab: int) -> Request:
    """A checked /v1/chat/completions request (raises RequestError)."""
    params, stream, include_usage, processor_args = _common(body, cfg, CHAT_PARAMS, n_vocab)
    try:
        messages = normalize_messages(body.get("messages"))
    except MessageError as e:
        raise RequestError(400, str(e), e.path)
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(400, "'logprobs' must be a boolean", "logprobs")
    top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, int)
    if top and not logprobs:
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params.logprobs, params.top_logprobs = bool(logprobs), top

    schema, mode = None, "text"
    tools = body.get("tools") or None
    choice = body.get("tool_choice", "auto")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RequestError(400, "'tools' must be a list of objects", "tools")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if t.get("function", t).get("name") == name]
            if not tools:
                raise RequestError(400, f"tool_choice names an unknown tool {name!r}", "tool_choice")
        elif choice not in ("auto", "required", "none"):
            raise RequestError(400, "tool_choice must be none, auto, required or a function", "tool_choice")
        if choice != "none":
            try:
                schema, mode = tool_call_schema(tools), "tool"
            except (ValueError, AttributeError) as e:
                raise RequestError(400, f"bad tools: {e}", "tools")
            _checked_schema(schema, "tools")
    elif body.get("tool_choice") not in (None, "none", "auto"):
        raise RequestError(400, "'tool_choice' needs 'tools'", "tool_choice")
    if not isinstance(body.get("parallel_tool_calls", True), bool):
        raise RequestError(400, "'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    fmt = body.get("response_format")
    if fmt is not None and mode == "text":
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            js = fmt.get("json_schema") or {}
            if not isinstance(js.get("schema"), dict):
                raise RequestError(400, "response_format.json_schema.schema must be an object",
                                   "response_format")
            schema, mode = _checked_schema(js["schema"], "response_format.json_schema.schema"), "json"
        elif kind == "json_object":
            schema, mode = {"type": "object"}, "json"
        elif kind != "text":
            raise RequestError(400, "response_format.type must be text, json_object or json_schema",
                               "response_format")
    if mode != "text" and params.stop:
        raise RequestError(400, f"'stop' cannot be combined with {'tools' if mode == 'tool' else 'response_format'}: "
                           "a stop string would cut the constrained document", "stop")
    return Request(params, stream, include_usage, mode, schema, messages=messages,
                   tools=tools if mode == "tool" else None, processor_args=processor_args)


def parse_completion(body, cfg: dict, n_vocab: int) -> Request:
    """A checked /v1/completions request (raises RequestError)."""
    params, stream, include_usage, processor_args = _common(body, cfg, COMPLETION_PARAMS, n_vocab)
    _only(body, "echo", (None, False), "the prompt is not echoed")
    _only(body, "best_of", (None, 1), "one candidate per request")
    _only(body, "suffix", (None, ""), "no insertion after the completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    ok_ids = isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not ok_ids:
        raise RequestError(400, "'prompt' must be one non-empty string or one list of token ids in "
                           f"the vocabulary ({n_vocab}); send one prompt per request", "prompt")
    top = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, int)
    params.logprobs, params.top_logprobs = top is not None, top or 0
    return Request(params, stream, include_usage, prompt=prompt, processor_args=processor_args)


def token_info(tokenizer, token_id: int) -> dict:
    """{"id", "token", "bytes"}: the token's text and its exact bytes (a byte-level BPE token
    may end inside a UTF-8 character: its text then holds U+FFFD, its bytes do not)."""
    raw = tokenizer.convert_ids_to_tokens(token_id)
    decoder = _byte_decoder()
    if isinstance(raw, str) and raw and all(c in decoder for c in raw):
        data = bytes(decoder[c] for c in raw)
    else:
        data = tokenizer.decode([token_id]).encode("utf-8")
    return {"id": token_id, "token": data.decode("utf-8", errors="replace"), "bytes": list(data)}


_DECODER = {}


def _byte_decoder():
    if not _DECODER:
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2 byte-level map

        _DECODER.update({c: b for b, c in bytes_to_unicode().items()})
    return _DECODER


def chat_logprobs(tokenizer, entries: List[tuple]) -> dict:
    """OpenAI's chat `logprobs` object for generate.Response.logprobs entries."""
    content = []
    for token, logprob, top in entries:
        content.append({**token_info(tokenizer, token), "logprob": logprob, "top_logprobs": [
            {**token_info(tokenizer, i), "logprob": lp} for i, lp in top]})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, entries: List[tuple], offset: int = 0) -> dict:
    """OpenAI's legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs,
    text_offset); `offset`: characters of text before the first entry."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in entries:
        text = token_info(tokenizer, token)["token"]
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        alternatives = {}
        for i, lp in top:
            alternatives.setdefault(token_info(tokenizer, i)["token"], lp)
        out["top_logprobs"].append(alternatives)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
