"""Process targets: where a trace's tool names, JSON arguments and integration text lie.

    record["spans"] = compute(tokenizer, record)
    result = check(tokenizer, record)          # round trip of the stored spans
    text, ids, spans = analyze(tokenizer, record)

A span is `{"type": "tool_name" | "arguments" | "integration", "byte_start", "byte_end",
"tok_start", "tok_end"}` (ends exclusive) over the conversation as mlx_student.records renders
it for training: the UTF-8 bytes of `tokenizer.apply_chat_template(messages, tools=tools,
tokenize=False)`, messages normalised as the loader does (`for_template`), and the ids of the
same call with tokenize=True. The token span is the
minimal range of tokens covering the bytes.

* tool_name: the name inside an assistant call `{"name":"<here>","arguments":{...}}`
  (without the quotes); arguments: the whole `{...}` object after `"arguments":`.
* integration: in an assistant text turn that follows a tool result, each occurrence of one
  of the item's facts (`meta.facts`, values from the tool results the answer must carry),
  not glued to a neighbouring word or number.

Token byte offsets come from the byte-level vocabulary (GPT-2's byte-to-unicode table, as
SmolLM2's and most BPE tokenizers use; added tokens are their UTF-8 text). `check` verifies
by round trip: it re-tokenizes the rendered text, checks that the tokens' bytes concatenate
to the text and that each stored span equals the one recomputed over the new tokens (so the
template's ids and a re-tokenization agree), its bytes hold what its type says
(the call's name, JSON equal to the call's arguments, a fact) and its tokens cover exactly it.
"""

import bisect
import json
import re
from functools import lru_cache

from ..messages import MessageError, calls_in_content, normalize_messages

TYPES = ("tool_name", "arguments", "integration")


@lru_cache(maxsize=1)
def _byte_decoder():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_TOKEN_BYTES = {}


def token_bytes(tokenizer, ids):
    """The UTF-8 bytes each token of `ids` stands for."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    cache = _TOKEN_BYTES.setdefault(id(hf), {})
    missing = [i for i in set(ids) if i not in cache]
    if missing:
        table = _byte_decoder()
        for i, tok in zip(missing, hf.convert_ids_to_tokens(missing)):
            tok = tok or ""
            cache[i] = bytes(table[c] for c in tok) if all(c in table for c in tok) else tok.encode()
    return [cache[i] for i in ids]


def _turn_starts(tokenizer, record, text):
    """Char offset in `text` of each assistant message's content: {message index: offset}."""
    messages, out = record["messages"], {}
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:k], tools=record.get("tools"),
                                               add_generation_prompt=True, tokenize=False)
        if not (text.startswith(prefix) and text.startswith(m["content"] or "", len(prefix))):
            raise ValueError(f"message {k}: the chat template does not render the assistant "
                             "content after the generation prompt (not prefix-stable)")
        out[k] = len(prefix)
    return out


def fact_pattern(facts):
    """A regex of any fact not glued to letters, digits or a decimal point on either side."""
    alts = "|".join(re.escape(f) for f in sorted(set(facts), key=len, reverse=True) if f)
    return re.compile(rf"(?<![\w.-])(?:{alts})(?![\w-]|\.\d)") if alts else None


def _char_spans(tokenizer, record, text):
    """[(type, char_start, char_end)] of a record."""
    starts = _turn_starts(tokenizer, record, text)
    pattern = fact_pattern(record.get("meta", {}).get("facts") or [])
    out, after_tool = [], False
    for k, m in enumerate(record["messages"]):
        if m["role"] == "tool":
            after_tool = True
        if k not in starts:
            continue
        o, content = starts[k], m["content"] or ""
        calls = m.get("tool_calls") or []
        if calls:
            name = calls[0]["function"]["name"]
            head = '{"name":' + json.dumps(name, ensure_ascii=False) + ',"arguments":'
            if content.startswith(head) and content.endswith("}"):
                out.append(("tool_name", o + len('{"name":"'), o + len(head) - len('","arguments":')))
                out.append(("arguments", o + len(head), o + len(content) - 1))
        elif after_tool and pattern is not None:
            out += [("integration", o + mt.start(), o + mt.end()) for mt in pattern.finditer(content)]
    return out


def _token_range(starts, byte_start, byte_end):
    return bisect.bisect_right(starts, byte_start) - 1, bisect.bisect_left(starts, byte_end)


def _offsets(pieces):
    starts, ends = [0], []
    for p in pieces:
        ends.append(starts[-1] + len(p))
        starts.append(ends[-1])
    return starts[:-1], ends


def for_template(tokenizer, record):
    """The record with its messages as the data loader renders them (mlx_student.messages:
    normalised, calls shown as content where the template drops tool_calls), so spans are
    measured on the very text training tokenizes. Raises MessageError naming a bad field."""
    return {**record, "messages": calls_in_content(tokenizer, normalize_messages(record["messages"]))}


def template_text(tokenizer, record):
    """The chat template's text of a record, as training renders it."""
    return tokenizer.apply_chat_template(for_template(tokenizer, record)["messages"],
                                         tools=record.get("tools"), tokenize=False)


def analyze(tokenizer, record, ids=None):
    """(text, ids, spans) of a record; `ids` default to the template's own tokenization."""
    record = for_template(tokenizer, record)
    text = tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"),
                                         tokenize=False)
    if ids is None:
        ids = list(tokenizer.apply_chat_template(record["messages"], tools=record.get("tools")))
    starts, _ = _offsets(token_bytes(tokenizer, ids))
    spans = []
    for kind, cs, ce in _char_spans(tokenizer, record, text):
        bs = len(text[:cs].encode())
        be = bs + len(text[cs:ce].encode())
        ts, te = _token_range(starts, bs, be)
        spans.append({"type": kind, "byte_start": bs, "byte_end": be, "tok_start": ts, "tok_end": te})
    return text, ids, spans


def compute(tokenizer, record):
    """The spans of a trace record (see the module docstring)."""
    return analyze(tokenizer, record)[2]


def _arguments(raw):
    return json.loads(raw) if isinstance(raw, str) else raw


def _content_problem(span, data, record):
    """Why a span's bytes do not hold what its type says, or None."""
    try:
        s = data[span["byte_start"]:span["byte_end"]].decode()
    except UnicodeDecodeError:
        return "cuts a UTF-8 character"
    calls = [c["function"] for m in record["messages"] for c in m.get("tool_calls") or []]
    if span["type"] == "tool_name":
        return None if any(s == c["name"] for c in calls) else f"{s!r} is not a called tool's name"
    if span["type"] == "arguments":
        try:
            value = json.loads(s)
        except ValueError:
            return f"{s[:40]!r} is not JSON"
        return None if any(value == _arguments(c["arguments"]) for c in calls) else \
            "JSON that is not a call's arguments"
    facts = record.get("meta", {}).get("facts") or []
    return None if s in facts else f"{s!r} is not a fact"


def check(tokenizer, record, ids=None):
    """Round-trip the stored spans of a record: re-tokenize its rendered text (or take `ids`,
    that re-tokenization done in a batch), recompute the spans over those tokens and compare.
    Returns {"spans": n checked (stored plus missing), "aligned": n passing, "exact": n whose
    bytes start and end on token boundaries, "problems": [str]}."""
    stored = record.get("spans") or []
    out = {"spans": len(stored), "aligned": 0, "exact": 0, "problems": []}
    try:
        record = for_template(tokenizer, record)
    except MessageError as e:
        out["problems"].append(str(e))
        return out
    text = tokenizer.apply_chat_template(record["messages"], tools=record.get("tools"),
                                         tokenize=False)
    if ids is None:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    data = text.encode()
    pieces = token_bytes(tokenizer, ids)
    if b"".join(pieces) != data:
        out["problems"].append("the tokens' bytes do not concatenate to the rendered text")
        return out
    starts, ends = _offsets(pieces)
    try:
        expected = analyze(tokenizer, record, ids)[2]
    except ValueError as e:
        out["problems"].append(str(e))
        return out
    fields = ("type", "byte_start", "byte_end", "tok_start", "tok_end")
    want = {tuple(s[k] for k in fields) for s in expected}
    have = set()
    for i, s in enumerate(stored):
        key = tuple(s.get(k) for k in fields)
        have.add(key)
        bs, be, ts, te = key[1:]
        if key not in want:
            out["problems"].append(f"spans[{i}] {key}: not a span of this trace "
                                   "(re-tokenized, the spans differ)")
            continue
        problem = _content_problem(s, data, record)
        if problem is None and not (starts[ts] <= bs < ends[ts] and starts[te - 1] < be <= ends[te - 1]
                                    and data[bs:be] in b"".join(pieces[ts:te])):
            problem = "its tokens do not minimally cover its bytes"
        if problem:
            out["problems"].append(f"spans[{i}] ({s['type']}): {problem}")
            continue
        out["aligned"] += 1
        out["exact"] += starts[ts] == bs and ends[te - 1] == be
    missing = want - have
    if missing:
        out["spans"] += len(missing)
        out["problems"].append(f"{len(missing)} span(s) of the trace are missing, e.g. {sorted(missing)[0]}")
    return out
