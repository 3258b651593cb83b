"""Traces: multi-turn conversations in mlx-lm's "tools" chat format, from gold plans or a teacher.

A trace record (one JSON object a line):

    {"id", "messages": [...], "tools": [tool specs], "source": "gold" | "teacher",
     "meta": {"scenario", "complexity", "structure", "control", "adversarial",
              "expected_calls": [{"name", "arguments"}], "facts": [...],
              "locale", "long_context", "index", "split",
              "fixtures": {normalized call: result}},   # Broker(meta["fixtures"]) replays
     "spans": [...]}                       # added by mlx_student.tools.spans

Every item is its own workspace (two items may read the same path and see different files),
so its recorded results travel with it in `meta.fixtures` (and in `<out>/fixtures.json` by id).

How a call is written (what the process loss and the eval harness rely on)
--------------------------------------------------------------------
The student's chat template (SmolLM2's ChatML) renders only `role` and `content`: it drops
both the `tools` list and an assistant's `tool_calls`. So the training text carries them the
way the runtime already serves them (runtime/generate.py `chat_prompt`, runtime/server.py,
runtime/constrained.py):

* messages[0] is the system message `chat_prompt` prepends when the template ignores tools:
  `TOOLS_NOTE + json.dumps(tools)`, byte for byte. Rendering `messages[:k]` with the template
  (add_generation_prompt=True) therefore gives exactly the tokens
  `runtime.generate.chat_prompt(tokenizer, messages[1:k], tools)` gives (tested).
* An assistant turn that calls a tool has `content` = the call in the constrained decoder's
  wire form, `{"name":"read_file","arguments":{"path":"a.py"}}`: compact separators, argument
  keys in schema order, UTF-8 unescaped (`registry.call_text`; llguidance accepts exactly this
  form, tested). It keeps `tool_calls` too ([{"type": "function", "function": {"name",
  "arguments": <JSON string>}}]) for templates and APIs that read them.
* One call per assistant turn (the runtime constrains one call per reply); several calls are
  consecutive assistant/tool turn pairs.
* Tool results are `{"role": "tool", "name": <tool>, "content": <JSON string>}`.
* The last message is the assistant's final answer in plain text; a control (no tool needed)
  is system note, user, answer.

Gold traces come from the generator's plan (it knows the calls, the results and the facts the
answer must carry). Teacher traces: `teacher_trace` runs the conversation against an
OpenAI-compatible endpoint (mlx_student.teacher.http.HTTPTeacher, native `tools`), answers each
call with the broker (a miss becomes an error result the teacher sees), and asks for the final
answer with tool_choice "none" once the call budget is spent. The teacher's calls are
re-written in the wire form above, so both sources train the same text.
"""

import json

from .broker import BrokerMiss
from .registry import TOOLS, call_text, ordered

TOOLS_NOTE = ("You can call these tools. Answer with one JSON object "
              '{"name": <tool name>, "arguments": {...}}.\n')


def system_note(tools):
    return {"role": "system", "content": TOOLS_NOTE + json.dumps(tools)}


def call_message(name, arguments):
    arguments = ordered(name, arguments)
    return {"role": "assistant", "content": call_text(name, arguments), "tool_calls": [{
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}]}


def tool_message(name, result):
    return {"role": "tool", "name": name, "content": json.dumps(result, ensure_ascii=False)}


def calls_of(messages):
    """[(name, arguments dict or None if unparseable)] of the assistant turns that call."""
    out = []
    for m in messages:
        for c in m.get("tool_calls") or []:
            fn = c.get("function", {})
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except (TypeError, ValueError):
                args = None
            out.append((fn.get("name"), args))
    return out


def gold_trace(item):
    """The trace of a generated item (see toolgen.make_item)."""
    tools = [TOOLS[n] for n in item["tools"]]
    messages = [system_note(tools), {"role": "user", "content": item["user"]}]
    for name, args, result in item["steps"]:
        messages += [call_message(name, args), tool_message(name, result)]
    messages.append({"role": "assistant", "content": item["answer"]})
    return {"id": item["id"], "messages": messages, "tools": tools, "source": "gold",
            "meta": item["meta"]}


def _parse_arguments(text):
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def teacher_trace(teacher, gold, broker, max_calls=None):
    """A teacher's trace of the same item as `gold` (a gold trace record): the same tools and
    user turn; the teacher's own calls, answered by `broker`; its own final answer. Returns
    the record, `source` "teacher", with `meta.teacher` = {calls, misses, invalid}."""
    tools = gold["tools"]
    asked = [m for m in gold["messages"][1:] if m["role"] == "user"][:1]
    expected = gold["meta"]["expected_calls"]
    budget = max(1, len(expected)) if max_calls is None else max_calls
    api = list(asked)  # the conversation as the API sees it (native tools)
    ours = [system_note(tools)] + list(asked)  # the same in the training form
    stats = {"calls": 0, "misses": 0, "invalid": 0}
    while True:
        choice = "auto" if stats["calls"] < budget else "none"
        c = await teacher.complete(api, tools=tools, tool_choice=choice)
        call = (c.tool_calls or [None])[0] if choice == "auto" else None
        if call is None:
            ours.append({"role": "assistant", "content": c.text})
            break
        stats["calls"] += 1
        name = call.get("function", {}).get("name")
        raw = call.get("function", {}).get("arguments")
        args = _parse_arguments(raw)
        if args is None:
            stats["invalid"] += 1
            result = {"error": f"arguments are not a JSON object: {str(raw)[:200]}"}
            args = {}
        else:
            try:
                result = broker.call(name, args)
            except BrokerMiss as e:
                stats["misses"] += 1
                result = {"error": str(e)}
        # content carries the call too: templates that drop tool_calls (ours) still show it
        api += [{"role": "assistant", "content": call_text(name, args), "tool_calls": [
                    {"id": f"call_{stats['calls']}", "type": "function",
                     "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]},
                {"role": "tool", "tool_call_id": f"call_{stats['calls']}",
                 "content": json.dumps(result, ensure_ascii=False)}]
        ours += [call_message(name, args), tool_message(name, result)]
    meta = {**gold["meta"], "teacher": stats}
    return {"id": gold["id"], "messages": ours, "tools": tools, "source": "teacher", "meta": meta}
