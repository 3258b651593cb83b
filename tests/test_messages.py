"""mlx_student.messages: one shape for chat messages, in the data loader, the server and the
HTTP teacher, with the real SmolLM2 tokenizer and a template that renders tool calls."""

import copy
import json

import pytest

from mlx_student.data import DataError, load_jsonl
from mlx_student.messages import MessageError, calls_in_content, normalize_messages, template_renders_tool_calls
from mlx_student.teacher.http import HTTPTeacher, HTTPTeacherArgs

ARGS = {"city": "Paris", "days": 2}
USER = {"role": "user", "content": "Weather in Paris?"}
TOOL = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}
FINAL = {"role": "assistant", "content": "It is 21 degrees."}


def call(arguments, content=None):
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}


def test_shapes_normalise_to_one():
    as_string = [USER, call(json.dumps(ARGS)), TOOL, FINAL]
    as_object = [{"role": "user", "content": [{"type": "text", "text": "Weather in "},
                                              {"type": "text", "text": "Paris?"}]},
                 call(ARGS, content=""), TOOL, FINAL]
    snapshot = copy.deepcopy(as_string)
    a, b = normalize_messages(as_string), normalize_messages(as_object)
    assert a == b
    assert a[1]["content"] == "" and a[1]["tool_calls"][0]["function"]["arguments"] == ARGS
    assert a[2]["tool_call_id"] == "call_1"  # other keys kept
    assert as_string == snapshot  # the input is not modified
    wire = normalize_messages(as_object, arguments="string")
    assert json.loads(wire[1]["tool_calls"][0]["function"]["arguments"]) == ARGS
    raw = '{"city":  "Paris", "days": 2}'  # a string stays the exact string the API gave
    assert normalize_messages([USER, call(raw)], arguments="string")[1]["tool_calls"][0]["function"]["arguments"] == raw


@pytest.mark.parametrize("messages, path, problem", [
    ([USER, call("{city: Paris}")], "messages[1].tool_calls[0].function.arguments",
     "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)): '{city: Paris}'"),
    ([USER, call("[1, 2]")], "messages[1].tool_calls[0].function.arguments", "must be a JSON object, got a list"),
    ([USER, call(3)], "messages[1].tool_calls[0].function.arguments",
     "expected a JSON object or a string holding one, got an integer"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].type",
     "content parts of type 'image_url' are not supported (the model reads text only; use type 'text')"),
    ([{"role": "user", "content": None}], "messages[0].content",
     "a user message needs content (a string or a list of text parts), got null"),
    ([{"role": "user", "content": "a\ud800b"}], "messages[0].content",
     "holds a lone UTF-16 surrogate ('\\ud800' at character 1), which is not Unicode text"),
    ([{"role": "robot", "content": "x"}], "messages[0].role",
     "expected one of system, user, assistant, tool, got 'robot'"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls",
     "only assistant messages call tools, not user"),
    ([], "messages", "the list is empty"),
])
def test_refusals_name_the_field(messages, path, problem):
    with pytest.raises(MessageError) as e:
        normalize_messages(messages)
    assert (e.value.path, e.value.problem) == (path, problem)
    assert str(e.value) == f"{path}: {problem}"


def test_a_template_without_tool_calls_sees_the_call_as_content(tokenizer):
    assert not template_renders_tool_calls(tokenizer)  # SmolLM2's prints only content
    messages = calls_in_content(tokenizer, normalize_messages([USER, call(json.dumps(ARGS)), TOOL]))
    assert messages[1]["content"] == '{"name":"get_weather","arguments":{"city":"Paris","days":2}}'
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert '<|im_start|>assistant\n{"name":"get_weather"' in text


def test_a_template_with_tool_calls_gets_objects(tokenizer):
    hf = copy.deepcopy(tokenizer._tokenizer)
    hf.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
                        "<tool_call>{{ c.function.arguments | tojson }}</tool_call>{% endfor %}\n{% endfor %}")
    assert template_renders_tool_calls(hf)
    a = calls_in_content(hf, normalize_messages([USER, call(json.dumps(ARGS))]))
    b = calls_in_content(hf, normalize_messages([USER, call(ARGS)]))
    assert a[1]["content"] == ""  # the template shows the call itself
    rendered = hf.apply_chat_template(a, tokenize=False)
    assert rendered == hf.apply_chat_template(b, tokenize=False)
    assert '<tool_call>{"city": "Paris", "days": 2}</tool_call>' in rendered  # not a JSON string re-quoted


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_data_loader_reads_every_shape_the_same(tmp_path, tokenizer):
    shapes = [[USER, call(json.dumps(ARGS)), TOOL, FINAL], [USER, call(ARGS, content=""), TOOL, FINAL],
              [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
               call(ARGS), TOOL, FINAL]]
    examples = load_jsonl(write(tmp_path / "train.jsonl", [{"messages": m} for m in shapes]),
                          tokenizer, 49152, 512).examples
    assert len(examples) == 3
    for ex in examples[1:]:
        assert ex.tokens.tolist() == examples[0].tokens.tolist() and ex.prompt_len == examples[0].prompt_len
    text = tokenizer.decode(examples[0].tokens.tolist())
    assert '<|im_start|>assistant\n{"name":"get_weather","arguments":{"city":"Paris","days":2}}<|im_end|>' in text


def test_data_loader_refuses_invalid_arguments_with_file_and_line(tmp_path, tokenizer):
    path = write(tmp_path / "train.jsonl", [{"messages": [USER, FINAL]},
                                            {"messages": [USER, call("{city: Paris}"), TOOL, FINAL]}])
    with pytest.raises(DataError, match=r"train\.jsonl:2: field 'messages\[1\]\.tool_calls\[0\]\.function"
                                        r"\.arguments': not valid JSON \(Expecting property name"):
        load_jsonl(path, tokenizer, 49152, 512)


def test_http_teacher_sends_the_wire_shape():
    teacher = HTTPTeacher(HTTPTeacherArgs(base_url="http://127.0.0.1:9/v1", model="m"))
    body = teacher.body([USER, call(ARGS), TOOL])
    sent = body["messages"][1]
    assert sent["content"] == "" and json.loads(sent["tool_calls"][0]["function"]["arguments"]) == ARGS
    with pytest.raises(MessageError, match=r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"):
        teacher.body([USER, call("{city: Paris}")])
