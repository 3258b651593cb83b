"""One normaliser for chat messages in every shape OpenAI clients and data files send.

    from mlx_student.messages import MessageError, normalize_messages, calls_in_content

    messages = normalize_messages(body["messages"])              # for a chat template
    messages = normalize_messages(messages, arguments="string")  # for an OpenAI-style API

Used by the data loader (mlx_student.records), the server (runtime.server) and the HTTP teacher
(mlx_student.teacher.http), so a message means the same thing wherever it enters:

* ``content: null`` (or absent) on an assistant message, as OpenAI returns with
  ``tool_calls``, is the empty text ``""``; other roles must carry content.
* ``content`` as a list of parts (``[{"type": "text", "text": "hi"}, ...]``) is the parts'
  text joined; any other part type (``image_url``, ``input_audio`` ...) is refused by name:
  the students are text-only.
* ``tool_calls[j].function.arguments`` may be a JSON string (OpenAI's wire form) or an object
  (what Hugging Face chat templates read, e.g. ``arguments | tojson``): both become an object
  (``arguments="object"``, as mlx_lm.server does before templating) or a JSON string
  (``arguments="string"``, for an API). A string that is not JSON, or JSON that is not an
  object, is refused.
* Strings holding a lone UTF-16 surrogate (``"\\ud800"`` is legal JSON but no Unicode text)
  are refused: no tokenizer can encode them.

Every refusal is a `MessageError` whose ``path`` names the field, e.g.
``messages[2].tool_calls[0].function.arguments``. Inputs are never modified; the result is
new dicts (unknown keys such as ``tool_call_id`` or ``name`` are kept as given).
"""

import json
from typing import Literal

ROLES = ("system", "user", "assistant", "tool")


class MessageError(ValueError):
    """A message that cannot be used. `path`: the field (``messages[i]...``); `problem`: why."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def find_surrogate(value, path: str):
    """Raise MessageError at the first string under `value` (any JSON value) that holds a
    lone surrogate; `path` names `value` itself."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise MessageError(path, f"holds a lone UTF-16 surrogate ({value[e.start]!r} at "
                                     f"character {e.start}), which is not Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            find_surrogate(k, f"{path} (a key)")
            find_surrogate(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            find_surrogate(v, f"{path}[{i}]")


def _kind(value):
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _content(message, role, path):
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        if role == "assistant":
            return ""
        raise MessageError(f"{path}.content", f"a {role} message needs content (a string or a "
                                              "list of text parts)" + (", got null" if "content" in message else ""))
    if not isinstance(content, list):
        raise MessageError(f"{path}.content", f"expected a string or a list of text parts, got {_kind(content)}")
    texts = []
    for k, part in enumerate(content):
        where = f"{path}.content[{k}]"
        if not isinstance(part, dict):
            raise MessageError(where, f"expected a content part object, got {_kind(part)}")
        kind = part.get("type")
        if kind != "text":
            raise MessageError(f"{where}.type", f"content parts of type {kind!r} are not supported "
                                                "(the model reads text only; use type 'text')")
        if not isinstance(part.get("text"), str):
            raise MessageError(f"{where}.text", f"expected a string, got {_kind(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


def _arguments(raw, path, form):
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise MessageError(path, f"not valid JSON ({e}): {raw[:80]!r}") from None
    elif isinstance(raw, dict):
        value = raw
    else:
        raise MessageError(path, f"expected a JSON object or a string holding one, got {_kind(raw)}")
    if not isinstance(value, dict):
        raise MessageError(path, f"must be a JSON object, got {_kind(value)}")
    if form == "object":
        return value
    return raw if isinstance(raw, str) else json.dumps(value, ensure_ascii=False)


def _tool_calls(calls, path, form):
    if not isinstance(calls, list):
        raise MessageError(path, f"expected a list of calls, got {_kind(calls)}")
    out = []
    for j, call in enumerate(calls):
        where = f"{path}[{j}]"
        if not isinstance(call, dict):
            raise MessageError(where, f"expected an object, got {_kind(call)}")
        if call.get("type", "function") != "function":
            raise MessageError(f"{where}.type", f"only 'function' calls are supported, got {call['type']!r}")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise MessageError(f"{where}.function", f"expected an object with name and arguments, got {_kind(fn)}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MessageError(f"{where}.function.name", "expected a non-empty string")
        if "arguments" not in fn:
            raise MessageError(f"{where}.function.arguments", "missing (use {} or \"{}\" for none)")
        args = _arguments(fn["arguments"], f"{where}.function.arguments", form)
        out.append({**call, "type": "function", "function": {**fn, "arguments": args}})
    return out


def normalize_messages(messages, arguments: Literal["object", "string"] = "object") -> list:
    """The messages in one shape (see the module docstring): each a new dict with `role`,
    `content` a string and, on assistant turns that call tools, `tool_calls` whose
    `function.arguments` is a dict (``arguments="object"``, for chat templates) or a JSON
    string (``"string"``, for OpenAI-compatible APIs). Raises MessageError naming the field."""
    if arguments not in ("object", "string"):
        raise ValueError(f"arguments must be 'object' or 'string', got {arguments!r}")
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages", f"expected a list of messages, got {_kind(messages)}"
                           if not isinstance(messages, list) else "the list is empty")
    find_surrogate(messages, "messages")
    out = []
    for i, m in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError(path, f"expected an object with 'role' and 'content', got {_kind(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise MessageError(f"{path}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        message = {**m, "content": _content(m, role, path)}
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise MessageError(f"{path}.tool_calls", f"only assistant messages call tools, not {role}")
            message["tool_calls"] = _tool_calls(calls, f"{path}.tool_calls", arguments)
        elif "tool_calls" in message:
            del message["tool_calls"]  # null: no calls
        out.append(message)
    return out


_PROBE = "probe_tool_name_7f3a"
_RENDERS_CALLS = {}


def template_renders_tool_calls(tokenizer) -> bool:
    """Whether `tokenizer`'s chat template shows an assistant turn's `tool_calls` (SmolLM2's,
    for one, prints only `content`). Cached per tokenizer."""
    key = id(tokenizer)
    if key not in _RENDERS_CALLS:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": _PROBE, "arguments": {_PROBE: 1}}}]}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # a template that refuses tool_calls outright (jinja raise_exception)
            text = ""
        _RENDERS_CALLS[key] = _PROBE in text  # as the name or as an argument
    return _RENDERS_CALLS[key]


def calls_in_content(tokenizer, messages: list) -> list:
    """Normalised `messages` ready for `tokenizer`'s chat template: when the template does not
    show `tool_calls`, an assistant turn that calls tools with empty content gets its calls as
    content, one `{"name":...,"arguments":{...}}` line each (the form runtime.constrained
    constrains and the tool data trains), so the model sees the calls it made."""
    if template_renders_tool_calls(tokenizer):
        return messages
    from .tools.registry import call_text

    out = []
    for m in messages:
        if m.get("tool_calls") and not m["content"]:
            fns = [c["function"] for c in m["tool_calls"]]
            m = {**m, "content": "\n".join(call_text(f["name"], _arguments(f["arguments"], "", "object"))
                                           for f in fns)}
        out.append(m)
    return out
