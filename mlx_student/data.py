"""Load jsonl data folders like mlx-lm's ``--data``, tokenize them and make batches.

A data folder holds ``train.jsonl`` (required), ``valid.jsonl`` and ``test.jsonl``
(optional), one JSON object a line. A file's format is detected from its first record
and every later record must have that format's keys:

* ``text``: ``{"text": ...}``. Documents are packed (see ``_pack``); every token is in
  the loss.
* ``completions``: ``{"prompt": ..., "completion": ...}``. The prompt goes through the
  chat template as a user turn; the completion tokens and eos are in the loss.
* ``chat``: ``{"messages": [...]}``; the last message must be the assistant's and only
  it, with the template's end-of-turn tokens, is in the loss: the tokens after the
  template of the earlier messages with the generation prompt. An optional ``"tools"``
  list goes to the chat template.
* ``tools``: ``{"messages": [...], "tools": [...]}``, the same as ``chat``.

  Messages go through ``mlx_student.messages.normalize_messages`` (the server's and the
  HTTP teacher's normaliser): null assistant content is ``""``, lists of text parts are
  joined, ``tool_calls[j].function.arguments`` (a JSON string or an object) becomes the
  object chat templates read, invalid arguments are refused naming the field; a template
  that does not show ``tool_calls`` gets the calls as the turn's content.

  Process supervision: a ``chat`` or ``tools`` record with ``"spans"`` (the tool-use
  traces of ``mlx_student.tools``) has EVERY assistant turn in the loss, and each span
  ``{"type": "tool_name" | "arguments" | "integration", "byte_start", "byte_end",
  "tok_start", "tok_end"}`` (end exclusive; bytes of the template's rendered text, tokens
  of its tokenization, the minimal token range covering the bytes) gives its tokens the
  run's ``process_weights[type]`` (default 1.0; where spans overlap the largest weight
  wins; weight 0 takes the tokens out of the loss). Spans are checked against the
  tokenization: in range, inside an assistant turn and exactly the minimal cover of their
  bytes. Batches then carry ``"token_weights"``.
* ``kd``: a teacher record, detected by ``"messages"`` together with ``"completion"``:
  ``{"messages": [prompt...], "completion": ..., "finish_reason": ...,
  "completion_ids": [...] (optional), "topk": [[[id, logprob], ...], ...] (optional)}``.
  The completion tokens are ``completion_ids`` when given, else the encoded
  ``completion``; eos is appended when ``finish_reason == "stop"`` (unless the ids end
  with it already). ``topk[i]`` is the teacher's distribution for completion token i:
  its probabilities ``exp(logprob)`` sum to at most 1 (+ 1e-4 for fp32 rounding); the
  appended eos has none. ``"sampled": [[[id, count], ...], ...]`` (optional, beside or
  instead of topk) holds, per completion token, the distinct ids among N draws from the
  teacher's full distribution with their counts (random-sampled KD; N is the counts' sum).
  Other keys (``id``, ``reasoning``, ``teacher``, ``usage``) are not used.

  A scored-text record (teacher forcing over existing text, mlx_student.teacher.score) is a
  ``kd`` record too, and may share a file with teacher completions: ``{"text": ...,
  "ids": [t0, ..., tn], "topk": [...], "sampled": [...]}`` with ``topk`` / ``sampled`` (n
  entries each, at least one given) the teacher's distribution for ``ids[1:]``: t0 is
  context only, every later token is in the loss. It is not packed; ``text`` is not used.

Lines are strict JSON: ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's json
writes and reads by default) are refused, naming the field that holds one. Bad records
raise ``DataError`` naming the file, the 1-based line and the field; with
``skip_bad_lines=True`` they are skipped and counted instead. Blank lines are ignored.
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .messages import MessageError, calls_in_content, normalize_messages

SPLITS = ("train", "valid", "test")
PAD_TO = 32
# Teacher logprobs may round to slightly above 0; larger values are not log-probabilities.
MAX_LOGPROB = 1e-4
# A top-k of one distribution sums to at most 1, up to the teacher's fp32 rounding: each stored
# logprob x - logsumexp carries an absolute error of about 2 |logit| 2^-24, so for logits up to
# ~800 the mass is off by at most ~1e-4 (a peaked fp32 teacher's top-32 does exceed 1 + 1e-6).
MAX_TOPK_MASS = 1 + 1e-4
SPAN_TYPES = ("tool_name", "arguments", "integration")
REQUIRED_KEYS = {
    "text": ("text",),
    "completions": ("prompt", "completion"),
    "chat": ("messages",),
    "tools": ("messages", "tools"),
    "kd": ("messages", "completion", "finish_reason"),
}
SCORED_KEYS = ("text", "ids")  # a kd record of scored text


class DataError(ValueError):
    """A data file or folder that cannot be loaded; the message says where and why."""


class _BadLine(Exception):
    """A record that fails validation; the message names the field."""


@dataclass
class Example:
    """One tokenized example.

    ``tokens[prompt_len:]`` are the loss tokens. ``topk_ids`` / ``topk_logprobs``
    ``(n, K)`` hold the teacher's top-k for tokens ``prompt_len .. prompt_len + n - 1``
    (the appended eos has none, so ``n <= len(tokens) - prompt_len``); lists shorter
    than K are padded with id 0 and logprob ``-inf``. ``sampled_ids`` / ``sampled_counts``
    ``(n, S)`` the same for sampled targets, padded with id 0 and count 0. ``weights`` (records with process
    spans) is the loss weight of each token as a target, 0 outside the loss; it replaces
    ``prompt_len`` as the loss mask.
    """

    tokens: np.ndarray
    prompt_len: int
    topk_ids: Optional[np.ndarray] = None
    topk_logprobs: Optional[np.ndarray] = None
    sampled_ids: Optional[np.ndarray] = None
    sampled_counts: Optional[np.ndarray] = None
    weights: Optional[np.ndarray] = None


@dataclass
class Split:
    """The examples of one jsonl file and what loading them skipped (bad lines), truncated
    (longer than the limit) or dropped (no loss token)."""

    examples: list
    format: str
    skipped: int
    truncated: int
    path: Path
    dropped: int = 0


def _describe(value):
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _expect(value, types, field, what):
    """Return ``value`` if it has one of ``types`` (a bool is no int here), else raise."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise _BadLine(f"field {field!r}: expected {what}, got {_describe(value)}")
    return value


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _check_id(token, field, vocab_size):
    if not 0 <= token < vocab_size:
        raise _BadLine(
            f"field {field!r}: token id {token} outside the vocabulary (size {vocab_size})"
        )


def _check_vocab(tokens, field, vocab_size):
    """Tokens the tokenizer made must also fit the model's vocabulary."""
    bad = [t for t in tokens if t >= vocab_size]
    if bad:
        raise _BadLine(
            f"field {field!r}: the tokenizer made token id {bad[0]}, outside the "
            f"vocabulary (size {vocab_size})"
        )


def _detect_format(record):
    if all(k in record for k in SCORED_KEYS):
        return "kd"
    if "messages" in record:
        if "completion" in record:
            return "kd"
        return "tools" if "tools" in record else "chat"
    if "prompt" in record and "completion" in record:
        return "completions"
    if "text" in record:
        return "text"
    formats = "; ".join(f"{f}: {', '.join(keys)}" for f, keys in REQUIRED_KEYS.items())
    raise _BadLine(f"unknown format with keys {sorted(record)}; expected keys ({formats})")


def _messages(record, last_is_assistant, tokenizer):
    """The record's messages normalised (mlx_student.messages) for the tokenizer's template."""
    try:
        messages = normalize_messages(record["messages"])
    except MessageError as e:
        raise _BadLine(f"field {e.path!r}: {e.problem}") from None
    role = messages[-1]["role"]
    if last_is_assistant and role != "assistant":
        raise _BadLine(
            f"field 'messages': the last message must be the assistant's, got role {role!r}"
        )
    if not last_is_assistant and role == "assistant":
        raise _BadLine("field 'messages': a KD prompt must not end with an assistant message")
    tools = record.get("tools")
    if tools is not None:
        _expect(tools, list, "tools", "a list")
    return calls_in_content(tokenizer, messages), tools


def _template(tokenizer, messages, tools, add_generation_prompt):
    try:
        return list(tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        ))
    except Exception as e:  # jinja and tokenizer errors of every kind
        raise _BadLine(f"field 'messages': the chat template failed: {e}") from e


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def process_weights(weights=None):
    """The full ``{span type: weight}`` map of ``weights`` (missing types weigh 1.0).
    Raises ValueError on an unknown type or a negative or non-numeric weight."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(SPAN_TYPES))
    if unknown:
        raise ValueError(f"process_weights: unknown span type(s) {unknown}; known: {list(SPAN_TYPES)}")
    for kind, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"process_weights.{kind}: expected a number >= 0, got {w!r}")
    return {kind: float(weights.get(kind, 1.0)) for kind in SPAN_TYPES}


def _turn_mask(tokenizer, messages, tools, tokens):
    """1.0 on the tokens of every assistant turn (with its end-of-turn tokens), else 0."""
    mask = np.zeros(len(tokens), np.float32)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = _common_prefix(_template(tokenizer, messages[:i], tools, True), tokens) if i else 0
            end = _common_prefix(_template(tokenizer, messages[: i + 1], tools, False), tokens)
            mask[start:end] = 1
    return mask


def _token_bytes(tokenizer, messages, tools, tokens):
    """``(n, 2)`` byte offsets (start, end) of each token in the template's rendered text."""
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception as e:  # jinja errors of every kind
        raise _BadLine(f"field 'messages': the chat template failed: {e}") from e
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(tokens):
        raise _BadLine("field 'spans': the rendered text does not re-tokenize to the template's "
                       "tokens, so byte spans cannot be checked")
    char_bytes = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])])
    return char_bytes[np.array(encoded["offset_mapping"], np.int64).reshape(-1, 2)]


def _span_weights(spans, offsets, mask, weights):
    """Per-token loss weights: ``mask`` with each span's tokens set to its type's weight."""
    _expect(spans, list, "spans", "a list of spans")
    span_w = np.full(len(mask), -1.0, np.float32)
    n_bytes = int(offsets[-1, 1]) if len(offsets) else 0
    for i, span in enumerate(spans):
        field = f"spans[{i}]"
        _expect(span, dict, field, "an object")
        missing = [k for k in ("type", "byte_start", "byte_end", "tok_start", "tok_end") if k not in span]
        if missing:
            raise _BadLine(f"field {field!r}: missing key(s) {missing}")
        if span["type"] not in SPAN_TYPES:
            raise _BadLine(f"field '{field}.type': expected one of {list(SPAN_TYPES)}, got {span['type']!r}")
        bs, be, ts, te = (_expect(span[k], int, f"{field}.{k}", "an integer")
                          for k in ("byte_start", "byte_end", "tok_start", "tok_end"))
        if not 0 <= bs < be <= n_bytes:
            raise _BadLine(f"field {field!r}: bytes {bs}..{be} are not a range inside the "
                           f"rendered conversation ({n_bytes} bytes)")
        if not 0 <= ts < te <= len(mask):
            raise _BadLine(f"field {field!r}: tokens {ts}..{te} are not a range inside the "
                           f"conversation's {len(mask)} tokens")
        cover = np.flatnonzero((offsets[:, 1] > bs) & (offsets[:, 0] < be))
        expected = (int(cover[0]), int(cover[-1]) + 1) if len(cover) else None
        if (ts, te) != expected:
            raise _BadLine(f"field {field!r}: tokens {ts}..{te} are not the minimal cover of "
                           f"bytes {bs}..{be} (that is tokens {expected})")
        if not mask[ts:te].all():
            raise _BadLine(f"field {field!r}: tokens {ts}..{te} ({span['type']}) lie outside "
                           "the assistant turns")
        span_w[ts:te] = np.maximum(span_w[ts:te], weights[span["type"]])
    return np.where(span_w >= 0, span_w, mask).astype(np.float32)


def _topk(topk, n, source, vocab_size):
    """Validate ``topk`` (one list of [id, logprob] pairs per completion token)."""
    _expect(topk, list, "topk", "a list with one list per completion token")
    if len(topk) != n:
        raise _BadLine(f"field 'topk': {len(topk)} entries but {source} {n} tokens")
    ids, logprobs = [], []
    for i, position in enumerate(topk):
        _expect(position, list, f"topk[{i}]", "a list of [id, logprob] pairs")
        for j, pair in enumerate(position):
            field = f"topk[{i}][{j}]"
            if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0])
                    and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)):
                raise _BadLine(
                    f"field {field!r}: expected an [id, logprob] pair of an integer and "
                    f"a number, got {json.dumps(pair)}"
                )
            _check_id(pair[0], field, vocab_size)
            if math.isnan(pair[1]) or pair[1] > MAX_LOGPROB:
                raise _BadLine(
                    f"field {field!r}: logprob {pair[1]} is not a log-probability (<= 0)"
                )
        mass = math.fsum(math.exp(min(p[1], 0.0)) for p in position)
        if mass > MAX_TOPK_MASS:
            raise _BadLine(
                f"field 'topk[{i}]': the probabilities sum to {mass:.6g} > 1; a top-k of "
                "one distribution holds at most all of its mass (are these logits, or "
                "logprobs of another temperature?)"
            )
        ids.append([p[0] for p in position])
        logprobs.append([min(p[1], 0.0) for p in position])
    return ids, logprobs


def _sampled(sampled, n, source, vocab_size):
    """Validate ``sampled`` (one list of [id, count] pairs per completion token)."""
    _expect(sampled, list, "sampled", "a list with one list per completion token")
    if len(sampled) != n:
        raise _BadLine(f"field 'sampled': {len(sampled)} entries but {source} {n} tokens")
    for i, position in enumerate(sampled):
        _expect(position, list, f"sampled[{i}]", "a list of [id, count] pairs")
        for j, pair in enumerate(position):
            field = f"sampled[{i}][{j}]"
            if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0])
                    and _is_int(pair[1]) and pair[1] > 0):
                raise _BadLine(f"field {field!r}: expected an [id, count] pair of an integer "
                               f"and a positive integer, got {json.dumps(pair)}")
            _check_id(pair[0], field, vocab_size)
    return [[p[0] for p in row] for row in sampled], [[p[1] for p in row] for row in sampled]


def _targets(record, n, source, vocab_size):
    """The teacher targets of a kd record's n completion tokens: {"topk": (ids, logprobs),
    "sampled": (ids, counts)}, the ones it has, ragged."""
    out = {}
    if record.get("topk") is not None:
        out["topk"] = _topk(record["topk"], n, source, vocab_size)
    if record.get("sampled") is not None:
        out["sampled"] = _sampled(record["sampled"], n, source, vocab_size)
    return out


def _token_ids(ids, field, vocab_size):
    _expect(ids, list, field, "a list of token ids")
    for i, token in enumerate(ids):
        _expect(token, int, f"{field}[{i}]", "an integer token id")
        _check_id(token, f"{field}[{i}]", vocab_size)
    return list(ids)


def _tokenize_text(record, tokenizer, vocab_size):
    """Tokens of one text document, ending with eos (as mlx-lm's TextDataset)."""
    doc = tokenizer.encode(_expect(record["text"], str, "text", "a string"))
    if not doc or doc[-1] != tokenizer.eos_token_id:
        doc.append(tokenizer.eos_token_id)
    _check_vocab(doc, "text", vocab_size)
    return doc


def _tokenize(record, fmt, tokenizer, vocab_size, weights=None):
    """Return ``(tokens, prompt_len, targets, token_weights)`` of a non-text record; targets
    the teacher's (``_targets``), token_weights (records with "spans") an array or None. ``weights``: the
    span type weights (``process_weights``)."""
    eos = tokenizer.eos_token_id
    targets, token_weights = {}, None
    if fmt == "kd" and "messages" not in record:  # scored text
        _expect(record["text"], str, "text", "a string")
        tokens = _token_ids(record["ids"], "ids", vocab_size)
        if len(tokens) < 2:
            raise _BadLine(f"field 'ids': {len(tokens)} tokens, nothing to predict")
        targets = _targets(record, len(tokens) - 1, "'ids' has 1 +", vocab_size)
        if not targets:
            raise _BadLine("a scored-text record needs 'topk' or 'sampled'")
        return tokens, 1, targets, None
    if fmt == "completions":
        prompt = _expect(record["prompt"], str, "prompt", "a string")
        completion = _expect(record["completion"], str, "completion", "a string")
        tokens = _template(tokenizer, [{"role": "user", "content": prompt}], None, True)
        prompt_len = len(tokens)
        tokens += tokenizer.encode(completion, add_special_tokens=False) + [eos]
    elif fmt in ("chat", "tools"):
        messages, tools = _messages(record, last_is_assistant=True, tokenizer=tokenizer)
        prompt = _template(tokenizer, messages[:-1], tools, True)
        tokens = _template(tokenizer, messages, tools, False)
        # Templates that render earlier turns differently once the last one follows
        # (e.g. dropping reasoning) break the prefix: the loss then starts where they differ.
        prompt_len = _common_prefix(prompt, tokens)
        if "spans" in record:
            mask = _turn_mask(tokenizer, messages, tools, tokens)
            offsets = _token_bytes(tokenizer, messages, tools, tokens)
            token_weights = _span_weights(record["spans"], offsets, mask, weights or process_weights())
            prompt_len = int(np.argmax(mask > 0))
    else:  # kd
        messages, tools = _messages(record, last_is_assistant=False, tokenizer=tokenizer)
        text = _expect(record["completion"], str, "completion", "a string")
        finish = _expect(
            record["finish_reason"], (str, type(None)), "finish_reason", "a string or null"
        )
        tokens = _template(tokenizer, messages, tools, True)
        prompt_len = len(tokens)
        ids = record.get("completion_ids")
        if ids is None:
            completion = tokenizer.encode(text, add_special_tokens=False)
            source = "'completion' encodes to"
        else:
            completion = _token_ids(ids, "completion_ids", vocab_size)
            source = "'completion_ids' has"
        targets = _targets(record, len(completion), source, vocab_size)
        tokens += completion
        if finish == "stop" and (not completion or completion[-1] != eos):
            tokens.append(eos)
    _check_vocab(tokens, "messages" if "messages" in record else "prompt", vocab_size)
    return tokens, prompt_len, targets, token_weights


def _pack(stream, limit):
    """Cut a token stream into chunks of ``limit`` tokens; the last may be shorter.

    Consecutive chunks share one token (the last of one is the first of the next), so
    every token after the first is a target exactly once. A final chunk of fewer than
    two tokens has nothing to predict and is not made.
    """
    return [stream[i : i + limit] for i in range(0, len(stream) - 1, limit - 1)]


def _pad_topk(ids, logprobs, k, fill=-np.inf):
    """Ragged top-k (or sampled) rows as ``(n, k)`` arrays padded with id 0 and `fill`."""
    out_ids = np.zeros((len(ids), k), np.int32)
    out_logprobs = np.full((len(ids), k), fill, np.float32)
    for i, (row_ids, row_logprobs) in enumerate(zip(ids, logprobs)):
        out_ids[i, : len(row_ids)] = row_ids
        out_logprobs[i, : len(row_logprobs)] = row_logprobs
    return out_ids, out_logprobs


class _NonJSONNumber(str):
    """What ``NaN``, ``Infinity`` or ``-Infinity`` parses to here (json.loads' parse_constant),
    so that the field holding one can be named."""


def _refuse_non_json_numbers(value, field=""):
    if isinstance(value, _NonJSONNumber):
        raise _BadLine(
            f"field {field!r}: {value} is not a JSON number (JSON has no NaN or infinities; "
            "leave a zero-probability entry out of its top-k list)"
        )
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for key, v in items:
        if isinstance(v, (dict, list, _NonJSONNumber)):
            sub = f"{field}[{key}]" if isinstance(key, int) else (
                f"{field}.{key}" if field else key)
            _refuse_non_json_numbers(v, sub)


def _fit(tokens, prompt_len, limit):
    """Cut a record to `limit` tokens, keeping its completion: the prompt loses tokens from
    the left (as TRL's truncation_mode="keep_end") but keeps at least min(prompt_len,
    limit // 2) of them; a completion longer than the rest is cut on the right. Every record
    with a completion keeps a loss token. Returns (tokens, prompt_len, tokens cut on the left)."""
    keep = min(prompt_len, max(limit - (len(tokens) - prompt_len), limit // 2))
    cut = prompt_len - keep
    return tokens[cut : cut + limit], keep, cut


def _warn(message):
    print(f"[WARNING] {message}", file=sys.stderr)


def load_jsonl(path, tokenizer, vocab_size, max_seq_length, skip_bad_lines=False, weights=None):
    """Load and tokenize one jsonl file (see the module docstring for the formats).

    Non-text examples longer than ``max_seq_length + 1`` tokens keep their completion, their
    prompt cut from the left (``_fit``; counted in ``Split.truncated`` and reported on
    stderr); records with no loss token are dropped (``Split.dropped``, reported), so no
    batch is ever empty. Text is packed into chunks of that
    length. ``vocab_size`` is the model's: every token id must be below it. K of the
    top-k arrays is the longest top-k list in the file. ``weights``: the span type
    weights of records with process spans (``process_weights``; default all 1.0).
    """
    path = Path(path)
    limit = max_seq_length + 1
    fmt = detected_at = first_error = None
    records, stream = [], []
    skipped = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line, parse_constant=_NonJSONNumber)
                except ValueError as e:
                    raise _BadLine(f"invalid JSON: {e}") from None
                _refuse_non_json_numbers(record)
                if not isinstance(record, dict):
                    raise _BadLine(f"expected a JSON object, got {_describe(record)}")
                if fmt is None:
                    fmt, detected_at = _detect_format(record), lineno
                scored = fmt == "kd" and "messages" not in record and "ids" in record
                missing = [k for k in (SCORED_KEYS if scored else REQUIRED_KEYS[fmt])
                           if k not in record]
                if missing:
                    raise _BadLine(
                        f"missing key(s) {', '.join(map(repr, missing))} "
                        f"(format {fmt!r}, detected from line {detected_at})"
                    )
                if fmt == "text":
                    stream += _tokenize_text(record, tokenizer, vocab_size)
                else:
                    records.append(_tokenize(record, fmt, tokenizer, vocab_size, weights))
            except _BadLine as e:
                if not skip_bad_lines:
                    raise DataError(f"{path}:{lineno}: {e}") from None
                skipped += 1
                first_error = first_error or f"line {lineno}: {e}"
    if skipped:
        _warn(f"skipped {skipped} bad lines in {path} (first: {first_error})")
    if fmt is None and not skipped:
        raise DataError(f"{path}: the file is empty (no JSON records)")
    if not records and not stream:
        raise DataError(f"{path}: no valid records ({skipped} bad lines skipped)")

    if fmt == "text":
        examples = [Example(np.array(c, np.int32), 0) for c in _pack(stream, limit)]
        return Split(examples, fmt, skipped, 0, path)

    widths = {kind: max((len(row) for _, _, t, _ in records if kind in t for row in t[kind][0]),
                        default=0) for kind in ("topk", "sampled")}
    examples, truncated, dropped = [], 0, 0
    for tokens, prompt_len, targets, token_weights in records:
        if len(tokens) <= prompt_len or (token_weights is not None and not token_weights[1:].any()):
            dropped += 1  # nothing to learn: an empty completion, or every weight 0
            continue
        if len(tokens) > limit:
            truncated += 1
            tokens, prompt_len, cut = _fit(tokens, prompt_len, limit)
            if token_weights is not None:
                token_weights = token_weights[cut : cut + limit]
        example = Example(np.array(tokens, np.int32), prompt_len)
        example.weights = token_weights
        n = len(tokens) - prompt_len
        if "topk" in targets:
            ids, logprobs = targets["topk"]
            example.topk_ids, example.topk_logprobs = _pad_topk(
                ids[:n], logprobs[:n], max(widths["topk"], 1))
        if "sampled" in targets:
            ids, counts = targets["sampled"]
            example.sampled_ids, example.sampled_counts = _pad_topk(
                ids[:n], counts[:n], max(widths["sampled"], 1), fill=0)
        examples.append(example)
    if truncated:
        _warn(
            f"{truncated} examples in {path} are longer than max_seq_length + 1 = {limit} "
            "tokens: their prompts were cut from the left to keep the completions (at most "
            "down to half the limit; longer completions were cut on the right); consider "
            "pre-splitting your data"
        )
    if dropped:
        _warn(f"dropped {dropped} records of {path} with no loss tokens (an empty completion)")
    if not examples:
        raise DataError(f"{path}: no record has a loss token ({dropped} dropped)")
    return Split(examples, fmt, skipped, truncated, path, dropped)


def load_dataset(data_dir, tokenizer, vocab_size, max_seq_length, skip_bad_lines=False,
                 weights=None):
    """Load ``train.jsonl`` (required), ``valid.jsonl`` and ``test.jsonl`` of a folder.

    Returns a dict from split name to ``Split`` holding the splits present. ``weights``:
    the span type weights (``process_weights``) of records with process spans.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "train.jsonl").is_file():
        found = "" if data_dir.is_dir() else " (the folder does not exist)"
        raise DataError(
            f"{data_dir}: no train.jsonl{found}; a data folder holds train.jsonl "
            "(required), valid.jsonl and test.jsonl (optional)"
        )
    return {
        name: load_jsonl(
            data_dir / f"{name}.jsonl", tokenizer, vocab_size, max_seq_length, skip_bad_lines,
            weights,
        )
        for name in SPLITS
        if (data_dir / f"{name}.jsonl").is_file()
    }


def _collate(batch, rows, max_seq_length, pad_id, k, weighted=False, s=None):
    lengths = [min(len(ex.tokens), max_seq_length + 1) for ex in batch]
    width = min(PAD_TO * -(-(max(lengths) - 1) // PAD_TO), max_seq_length)
    shape = (rows, width)
    inputs = np.full(shape, pad_id, np.int32)
    targets = np.full(shape, pad_id, np.int32)
    mask = np.zeros(shape, np.float32)
    token_weights = np.zeros(shape, np.float32)
    kd_mask = np.zeros(shape, np.float32)
    if k is not None:
        topk_ids = np.zeros(shape + (k,), np.int32)
        topk_logprobs = np.full(shape + (k,), -np.inf, np.float32)
    if s is not None:
        sampled_ids = np.zeros(shape + (s,), np.int32)
        sampled_counts = np.zeros(shape + (s,), np.float32)
    for j, (ex, length) in enumerate(zip(batch, lengths)):
        n = length - 1
        inputs[j, :n] = ex.tokens[:n]
        targets[j, :n] = ex.tokens[1 : n + 1]
        start = max(ex.prompt_len - 1, 0)  # target index t + 1 >= prompt_len
        if ex.weights is None:
            mask[j, start:n] = 1
            token_weights[j, start:n] = 1
        else:
            token_weights[j, :n] = ex.weights[1 : n + 1]
            mask[j, :n] = token_weights[j, :n] != 0
        if ex.topk_ids is not None:
            m = max(min(len(ex.topk_ids), n - start), 0)
            kk = ex.topk_ids.shape[1]
            topk_ids[j, start : start + m, :kk] = ex.topk_ids[:m]
            topk_logprobs[j, start : start + m, :kk] = ex.topk_logprobs[:m]
            kd_mask[j, start : start + m] = np.isfinite(ex.topk_logprobs[:m]).any(axis=1)
        if ex.sampled_ids is not None:
            m = max(min(len(ex.sampled_ids), n - start), 0)
            ss = ex.sampled_ids.shape[1]
            sampled_ids[j, start : start + m, :ss] = ex.sampled_ids[:m]
            sampled_counts[j, start : start + m, :ss] = ex.sampled_counts[:m]
            kd_mask[j, start : start + m] += (ex.sampled_counts[:m] > 0).any(axis=1)
    out = {"inputs": inputs, "targets": targets, "mask": mask}
    if weighted:
        out["token_weights"] = token_weights
    if k is not None or s is not None:
        out["kd_mask"] = np.minimum(kd_mask, 1)
    if k is not None:
        out.update(topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    if s is not None:
        out.update(sampled_ids=sampled_ids, sampled_counts=sampled_counts)
    return {name: mx.array(a) for name, a in out.items()}


def iterate_batches(
    examples, batch_size, max_seq_length, seed=0, loop=False, pad_id=0, start=0
):
    """Yield batches of ``examples`` as dicts of ``mx.array``, like mlx-lm.

    Examples are sorted by length and consecutive ones grouped into batches of
    ``batch_size``; the longest ``len(examples) % batch_size`` examples, if any, make one
    batch padded with empty rows (mask 0), so nothing is dropped (unlike mlx-lm) and every
    batch has ``batch_size`` rows. Epoch e visits the
    batches in a permutation drawn from ``np.random.default_rng([seed, e])``, so a seed
    fixes the whole sequence. ``loop=False`` makes one pass, ``loop=True`` repeats
    forever. ``start`` skips that many batches (a resumed run's data cursor) without
    collating them.

    Each batch holds ``"inputs"`` ``(B, L)`` int32 (``tokens[:-1]``), ``"targets"``
    ``(B, L)`` int32 (``tokens[1:]``), both padded with ``pad_id``, and ``"mask"``
    ``(B, L)`` float32, 1 where the target is a loss token. If any example carries
    teacher top-k there are also ``"kd_mask"`` ``(B, L)`` float32 (1 where the target
    has teacher top-k), ``"topk_ids"`` ``(B, L, K)`` int32 and ``"topk_logprobs"``
    ``(B, L, K)`` float32 (padding: id 0, logprob ``-inf``), aligned with the targets;
    with sampled targets, ``"sampled_ids"`` ``(B, L, S)`` int32 and ``"sampled_counts"``
    ``(B, L, S)`` float32 (padding: id 0, count 0), and "kd_mask" also 1 where they are.
    If any example has process weights there is also ``"token_weights"`` ``(B, L)``
    float32: each target's loss weight (the mask's 1 elsewhere, 0 outside the loss).
    L is the longest example less one rounded up to a multiple of 32, at most
    ``max_seq_length``; longer examples are truncated.
    """
    if len(examples) < batch_size:
        raise ValueError(
            f"The dataset must have at least batch_size={batch_size} examples "
            f"but only has {len(examples)}."
        )
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    k = max((ex.topk_ids.shape[1] for ex in examples if ex.topk_ids is not None), default=None)
    s = max((ex.sampled_ids.shape[1] for ex in examples if ex.sampled_ids is not None),
            default=None)
    weighted = any(ex.weights is not None for ex in examples)
    epoch, skip = divmod(start, len(batches))
    if epoch and not loop:
        return
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(batches))
        for b in order[skip:]:
            yield _collate(
                [examples[i] for i in batches[b]], batch_size, max_seq_length, pad_id, k, weighted, s
            )
        if not loop:
            break
        epoch, skip = epoch + 1, 0
