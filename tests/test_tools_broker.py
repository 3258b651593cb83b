"""Tool registry and broker: schemas, wire form under the runtime's grammar, replay, misses,
recording from a real (local) tool."""

import json

import jsonschema
import pytest

from mlx_student.tools.broker import Broker, BrokerMiss, LocalTools, call_key
from mlx_student.tools.registry import SCENARIOS, TOOLS, call_text, ordered, schema_errors


def test_registry_specs_are_valid_json_schemas_covering_every_structure():
    kinds = set()

    def walk(schema):
        t = schema.get("type")
        if "enum" in schema:
            kinds.add("enums")
        if t in ("integer", "number") and "minimum" in schema and "maximum" in schema:
            kinds.add("numeric")
        if t == "array":
            kinds.add("arrays")
            walk(schema["items"])
        if t == "object":
            for name, sub in schema.get("properties", {}).items():
                if sub.get("type") == "object":
                    kinds.add("nested")
                walk(sub)
            if set(schema.get("properties", {})) - set(schema.get("required", [])):
                kinds.add("optional")

    for name, spec in TOOLS.items():
        assert spec["type"] == "function" and spec["function"]["name"] == name
        jsonschema.Draft202012Validator.check_schema(spec["function"]["parameters"])
        walk(spec["function"]["parameters"])
    assert kinds == {"enums", "numeric", "arrays", "nested", "optional"}
    assert {t for group in SCENARIOS.values() for t in group} == set(TOOLS)


def test_schema_errors_name_the_field():
    assert schema_errors("read_file", {"path": "a.py", "max_lines": 10}) == []
    errors = schema_errors("read_file", {"path": "a.py", "max_lines": 0, "colour": "red"})
    assert any(e.startswith("max_lines:") for e in errors)
    assert any("colour" in e for e in errors)
    assert schema_errors("no_such_tool", {}) == ["unknown tool 'no_such_tool'"]
    offered = [TOOLS["list_dir"]]
    assert schema_errors("read_file", {"path": "a.py"}, offered) == ["unknown tool 'read_file'"]


def test_wire_form_is_what_the_runtime_grammar_accepts(tokenizer):
    from llguidance import LLMatcher
    from runtime.constrained import ll_tokenizer, compile_schema, tool_call_schema

    grammar = compile_schema(tool_call_schema(list(TOOLS.values())))
    ll = ll_tokenizer(tokenizer, len(tokenizer._tokenizer))
    args = {"edits": [{"new": "b(", "old": "a("}], "dry_run": True, "path": "src/é.py"}
    text = call_text("edit_file", args)  # keys put in schema order, compact, UTF-8
    assert text == '{"name":"edit_file","arguments":{"path":"src/é.py","edits":[{"old":"a(","new":"b("}],"dry_run":true}}'

    def accepted(s):
        m = LLMatcher(ll, grammar)
        return all(m.consume_token(t) for t in tokenizer.encode(s, add_special_tokens=False)) and m.is_accepting()

    assert accepted(text)
    assert not accepted(json.dumps({"name": "edit_file", "arguments": args}))  # sorted keys, spaces


def test_broker_replays_on_the_normalized_call_and_reports_misses():
    key = call_key("run_python", {"timeout_s": 5.0, "code": "print(1)"})
    assert key == 'run_python:{"code":"print(1)","timeout_s":5}'
    broker = Broker({key: {"stdout": "1\n"}})
    assert broker.call("run_python", {"code": "print(1)", "timeout_s": 5}) == {"stdout": "1\n"}
    with pytest.raises(BrokerMiss) as e:
        broker.call("run_python", {"code": "print(2)"})
    assert e.value.key == 'run_python:{"code":"print(2)"}'
    assert "no recorded result" in str(e.value)
    assert broker.misses == ['run_python:{"code":"print(2)"}']
    assert ordered("read_file", {"max_lines": 3, "path": "x"}) == {"path": "x", "max_lines": 3}


def test_broker_loads_a_fixtures_file_and_says_what_is_wrong(tmp_path):
    path = tmp_path / "fixtures.json"
    path.write_text(json.dumps({call_key("list_dir", {"path": "."}): {"entries": ["a"]}}))
    assert Broker(path).call("list_dir", {"path": "."}) == {"entries": ["a"]}
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        Broker(path)


def test_broker_records_new_fixtures_from_a_real_tool(tmp_path):
    root = tmp_path / "ws"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("x = 1\ndef handler():\n    return x\n")
    broker = Broker({}, record=LocalTools(root))
    got = broker.call("read_file", {"path": "pkg/mod.py", "start_line": 2, "max_lines": 1})
    assert got["lines"] == ["def handler():"] and got["total_lines"] == 3
    assert broker.call("search_code", {"query": "handler"})["matches"] == [
        {"path": "pkg/mod.py", "line": 2, "text": "def handler():"}]
    assert broker.call("run_python", {"code": "print(6 * 7)"})["stdout"] == "42\n"
    assert "outside the workspace" in broker.call("read_file", {"path": "../secret"})["error"]
    assert broker.misses == [] and len(broker.recorded) == 4
    broker.save(tmp_path / "rec.json")
    replay = Broker(tmp_path / "rec.json")  # the recording replays without the tool
    assert replay.call("run_python", {"code": "print(6 * 7)"})["stdout"] == "42\n"
