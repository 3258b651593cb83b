"""Load and tokenize jsonl data folders like mlx-lm's ``--data`` (batches: mlx_student.batches).

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
Records are validated and tokenized by mlx_student.records.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .records import (
    REQUIRED_KEYS,
    SCORED_KEYS,
    RecordError,
    describe,
    detect_format,
    pad_topk,
    tokenize,
    tokenize_text,
)

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A data file or folder that cannot be loaded; the message says where and why."""


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


class _NonJSONNumber(str):
    """What ``NaN``, ``Infinity`` or ``-Infinity`` parses to here (json.loads' parse_constant),
    so that the field holding one can be named."""


def _refuse_non_json_numbers(value, field=""):
    if isinstance(value, _NonJSONNumber):
        raise RecordError(
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


def _pack(stream, limit):
    """Cut a token stream into chunks of ``limit`` tokens; the last may be shorter.

    Consecutive chunks share one token (the last of one is the first of the next), so
    every token after the first is a target exactly once. A final chunk of fewer than
    two tokens has nothing to predict and is not made.
    """
    return [stream[i : i + limit] for i in range(0, len(stream) - 1, limit - 1)]


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
    weights of records with process spans (``records.process_weights``; default all 1.0).
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
                    raise RecordError(f"invalid JSON: {e}") from None
                _refuse_non_json_numbers(record)
                if not isinstance(record, dict):
                    raise RecordError(f"expected a JSON object, got {describe(record)}")
                if fmt is None:
                    fmt, detected_at = detect_format(record), lineno
                scored = fmt == "kd" and "messages" not in record and "ids" in record
                missing = [k for k in (SCORED_KEYS if scored else REQUIRED_KEYS[fmt])
                           if k not in record]
                if missing:
                    raise RecordError(
                        f"missing key(s) {', '.join(map(repr, missing))} "
                        f"(format {fmt!r}, detected from line {detected_at})"
                    )
                if fmt == "text":
                    stream += tokenize_text(record, tokenizer, vocab_size)
                else:
                    records.append(tokenize(record, fmt, tokenizer, vocab_size, weights))
            except RecordError as e:
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
            example.topk_ids, example.topk_logprobs = pad_topk(
                ids[:n], logprobs[:n], max(widths["topk"], 1))
        if "sampled" in targets:
            ids, counts = targets["sampled"]
            example.sampled_ids, example.sampled_counts = pad_topk(
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
    the span type weights (``records.process_weights``) of records with process spans.
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
