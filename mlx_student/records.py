"""One record of a jsonl data file to tokens: format detection, field validation, chat-template
tokenization, teacher (KD) targets and process-supervision span weights.

The formats are described in mlx_student.data, which reads the files and reports a
``RecordError`` as a ``DataError`` naming the file and line.
"""

import json
import math

import numpy as np

from .messages import MessageError, calls_in_content, normalize_messages

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


class RecordError(Exception):
    """A record that fails validation; the message names the field."""


def describe(value):
    """The JSON type of ``value`` in words ("an object", "a list", ...) for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _expect(value, types, field, what):
    """Return ``value`` if it has one of ``types`` (a bool is no int here), else raise."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise RecordError(f"field {field!r}: expected {what}, got {describe(value)}")
    return value


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _check_id(token, field, vocab_size):
    if not 0 <= token < vocab_size:
        raise RecordError(
            f"field {field!r}: token id {token} outside the vocabulary (size {vocab_size})"
        )


def _check_vocab(tokens, field, vocab_size):
    """Tokens the tokenizer made must also fit the model's vocabulary."""
    bad = [t for t in tokens if t >= vocab_size]
    if bad:
        raise RecordError(
            f"field {field!r}: the tokenizer made token id {bad[0]}, outside the "
            f"vocabulary (size {vocab_size})"
        )


def detect_format(record):
    """The format (a key of REQUIRED_KEYS) of a record from its keys; raises RecordError when
    it has no format's keys."""
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
    raise RecordError(f"unknown format with keys {sorted(record)}; expected keys ({formats})")


def _messages(record, last_is_assistant, tokenizer):
    """The record's messages normalised (mlx_student.messages) for the tokenizer's template."""
    try:
        messages = normalize_messages(record["messages"])
    except MessageError as e:
        raise RecordError(f"field {e.path!r}: {e.problem}") from None
    role = messages[-1]["role"]
    if last_is_assistant and role != "assistant":
        raise RecordError(
            f"field 'messages': the last message must be the assistant's, got role {role!r}"
        )
    if not last_is_assistant and role == "assistant":
        raise RecordError("field 'messages': a KD prompt must not end with an assistant message")
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
        raise RecordError(f"field 'messages': the chat template failed: {e}") from e


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
        raise RecordError(f"field 'messages': the chat template failed: {e}") from e
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(tokens):
        raise RecordError("field 'spans': the rendered text does not re-tokenize to the template's "
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
            raise RecordError(f"field {field!r}: missing key(s) {missing}")
        if span["type"] not in SPAN_TYPES:
            raise RecordError(f"field '{field}.type': expected one of {list(SPAN_TYPES)}, got {span['type']!r}")
        bs, be, ts, te = (_expect(span[k], int, f"{field}.{k}", "an integer")
                          for k in ("byte_start", "byte_end", "tok_start", "tok_end"))
        if not 0 <= bs < be <= n_bytes:
            raise RecordError(f"field {field!r}: bytes {bs}..{be} are not a range inside the "
                           f"rendered conversation ({n_bytes} bytes)")
        if not 0 <= ts < te <= len(mask):
            raise RecordError(f"field {field!r}: tokens {ts}..{te} are not a range inside the "
                           f"conversation's {len(mask)} tokens")
        cover = np.flatnonzero((offsets[:, 1] > bs) & (offsets[:, 0] < be))
        expected = (int(cover[0]), int(cover[-1]) + 1) if len(cover) else None
        if (ts, te) != expected:
            raise RecordError(f"field {field!r}: tokens {ts}..{te} are not the minimal cover of "
                           f"bytes {bs}..{be} (that is tokens {expected})")
        if not mask[ts:te].all():
            raise RecordError(f"field {field!r}: tokens {ts}..{te} ({span['type']}) lie outside "
                           "the assistant turns")
        span_w[ts:te] = np.maximum(span_w[ts:te], weights[span["type"]])
    return np.where(span_w >= 0, span_w, mask).astype(np.float32)


def _topk(topk, n, source, vocab_size):
    """Validate ``topk`` (one list of [id, logprob] pairs per completion token)."""
    _expect(topk, list, "topk", "a list with one list per completion token")
    if len(topk) != n:
        raise RecordError(f"field 'topk': {len(topk)} entries but {source} {n} tokens")
    ids, logprobs = [], []
    for i, position in enumerate(topk):
        _expect(position, list, f"topk[{i}]", "a list of [id, logprob] pairs")
        for j, pair in enumerate(position):
            field = f"topk[{i}][{j}]"
            if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0])
                    and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)):
                raise RecordError(
                    f"field {field!r}: expected an [id, logprob] pair of an integer and "
                    f"a number, got {json.dumps(pair)}"
                )
            _check_id(pair[0], field, vocab_size)
            if math.isnan(pair[1]) or pair[1] > MAX_LOGPROB:
                raise RecordError(
                    f"field {field!r}: logprob {pair[1]} is not a log-probability (<= 0)"
                )
        mass = math.fsum(math.exp(min(p[1], 0.0)) for p in position)
        if mass > MAX_TOPK_MASS:
            raise RecordError(
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
        raise RecordError(f"field 'sampled': {len(sampled)} entries but {source} {n} tokens")
    for i, position in enumerate(sampled):
        _expect(position, list, f"sampled[{i}]", "a list of [id, count] pairs")
        for j, pair in enumerate(position):
            field = f"sampled[{i}][{j}]"
            if not (isinstance(pair, list) and len(pair) == 2 and _is_int(pair[0])
                    and _is_int(pair[1]) and pair[1] > 0):
                raise RecordError(f"field {field!r}: expected an [id, count] pair of an integer "
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


def pad_topk(ids, logprobs, k, fill=-np.inf):
    """Ragged top-k (or sampled) rows as ``(n, k)`` arrays padded with id 0 and `fill`."""
    out_ids = np.zeros((len(ids), k), np.int32)
    out_logprobs = np.full((len(ids), k), fill, np.float32)
    for i, (row_ids, row_logprobs) in enumerate(zip(ids, logprobs)):
        out_ids[i, : len(row_ids)] = row_ids
        out_logprobs[i, : len(row_logprobs)] = row_logprobs
    return out_ids, out_logprobs


def _token_ids(ids, field, vocab_size):
    _expect(ids, list, field, "a list of token ids")
    for i, token in enumerate(ids):
        _expect(token, int, f"{field}[{i}]", "an integer token id")
        _check_id(token, f"{field}[{i}]", vocab_size)
    return list(ids)


def tokenize_text(record, tokenizer, vocab_size):
    """Tokens of one text document, ending with eos (as mlx-lm's TextDataset)."""
    doc = tokenizer.encode(_expect(record["text"], str, "text", "a string"))
    if not doc or doc[-1] != tokenizer.eos_token_id:
        doc.append(tokenizer.eos_token_id)
    _check_vocab(doc, "text", vocab_size)
    return doc


def tokenize(record, fmt, tokenizer, vocab_size, weights=None):
    """Return ``(tokens, prompt_len, targets, token_weights)`` of a non-text record; targets
    the teacher's (``_targets``), token_weights (records with "spans") an array or None. ``weights``: the
    span type weights (``process_weights``)."""
    eos = tokenizer.eos_token_id
    targets, token_weights = {}, None
    if fmt == "kd" and "messages" not in record:  # scored text
        _expect(record["text"], str, "text", "a string")
        tokens = _token_ids(record["ids"], "ids", vocab_size)
        if len(tokens) < 2:
            raise RecordError(f"field 'ids': {len(tokens)} tokens, nothing to predict")
        targets = _targets(record, len(tokens) - 1, "'ids' has 1 +", vocab_size)
        if not targets:
            raise RecordError("a scored-text record needs 'topk' or 'sampled'")
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
