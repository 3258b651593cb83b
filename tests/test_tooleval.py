"""The tool-use eval harness (issue 11, item 7): multi-turn episodes with broker replay, metrics,
constrained decoding on a random tiny model, an OpenAI-compatible endpoint on loopback."""

import json
import threading

import pytest
from conftest import save_tiny, write_jsonl

from mlx_student.tools.toolgen import make_item
from mlx_student.tools.traces import gold_trace, system_note
from runtime import tooleval
from runtime.generate import MLXEngine
from runtime.server import ChatServer
from runtime.tooleval import EndpointRunner, EngineRunner, ast_match, evaluate, integration_f1, parse_reply


@pytest.fixture(scope="module")
def golds():
    """40 gold traces of mlx_student.toolgen (one cycle: controls, injections, malformed output,
    a locale probe, a long-context item and ordinary single / multi / branching items)."""
    return [gold_trace(make_item(0, i)) for i in range(40)]


class GoldRunner:
    """Answers every turn with the gold trace's next assistant message, after checking that the
    conversation it was handed is the gold one so far: the harness fed the broker's results
    back exactly as the trace has them. `plant` maps an item id to a function that alters its
    first reply."""

    def __init__(self, golds, plant=None):
        self.by_user = {r["messages"][1]["content"]: r for r in golds}
        self.plant = plant or {}
        self.turns = 0

    def reply(self, messages, tools, constrained, must_call):
        rec = self.by_user[messages[1]["content"]]
        gold = rec["messages"]
        assert tools == rec["tools"]
        assert messages == gold[: len(messages)]
        self.turns += 1
        text = gold[len(messages)]["content"]
        first = len(messages) == next(i for i, m in enumerate(gold) if m["role"] == "assistant")
        return self.plant[rec["id"]](text) if first and rec["id"] in self.plant else text


def test_gold_replies_score_perfectly_and_results_are_fed_back(golds):
    runner = GoldRunner(golds)
    metrics, episodes = evaluate(runner, golds, modes=(False,), progress=False)
    m = metrics["unconstrained"]
    assert runner.turns == sum(len([x for x in r["messages"] if x["role"] == "assistant"]) for r in golds)
    assert m["json_valid"] == m["schema_valid"] == m["tool_select"] == m["arg_match"] == 1.0
    assert m["first_call_select"] == 1.0 and m["irrelevance"] == 1.0 and m["broker_misses"] == 0
    assert m["controls"] == 4 and m["expected_calls"] == sum(len(r["meta"]["expected_calls"]) for r in golds)
    assert m["integration_f1"] > 0.95  # every fact is in the gold answer; precision over its values


def test_planted_defects_are_counted(golds):
    ordinary = [r for r in golds if not r["meta"]["control"] and len(r["meta"]["expected_calls"]) == 1]
    control = next(r for r in golds if r["meta"]["control"])
    (wrong_name, wrong_value, broken), call = ordinary[:3], json.loads(ordinary[0]["messages"][2]["content"])
    other = next(t["function"]["name"] for t in wrong_name["tools"] if t["function"]["name"] != call["name"])

    def bump_value(text):
        c = json.loads(text)
        key = next(k for k, v in c["arguments"].items() if isinstance(v, str))
        c["arguments"][key] += "_x"
        return json.dumps(c)

    plant = {wrong_name["id"]: lambda t: t.replace(f'"name":"{call["name"]}"', f'"name":"{other}"'),
             wrong_value["id"]: bump_value,
             broken["id"]: lambda t: t[:-2],
             control["id"]: lambda t: '{"name":"read_file","arguments":{"path":"x.py"}}'}
    items = [wrong_name, wrong_value, broken, control]
    # No calls beyond the expected ones: each episode ends after its (planted) first reply.
    m = evaluate(GoldRunner(golds, plant), items, modes=(False,), extra_calls=0,
                 progress=False)[0]["unconstrained"]
    assert m["expected_calls"] == 3 and m["controls"] == 1
    assert m["call_attempts"] == 4 and m["json_valid"] == 3 / 4  # the broken one
    assert m["tool_select"] == 1 / 3 and m["first_call_select"] == 1 / 3  # only the wrong value
    assert m["arg_match"] == 0.0  # wrong name, wrong value, invalid JSON
    assert m["irrelevance"] == 0.0
    assert m["broker_misses"] == 3  # the wrong name, the wrong value and the control's call
    assert m["arg_failures"] == {"name": 1, "value": 1, "invalid JSON": 1}


def test_ast_match_and_scoring_rules():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "number"}, "k": {"type": "integer"},
                                         "s": {"type": "string"}, "b": {"type": "boolean"}},
        "required": ["n"]}}}]
    want = {"name": "f", "arguments": {"n": 2.0, "s": "Paris"}}
    assert ast_match("f", {"n": 2, "s": " paris "}, want, tools) is None  # int for number; case
    assert ast_match("g", {"n": 2}, want, tools).startswith("name:")
    assert ast_match("f", {"s": "Paris"}, want, tools).startswith("missing required:")
    assert ast_match("f", {"n": 2, "s": "Paris", "z": 1}, want, tools).startswith("unknown parameter:")
    assert ast_match("f", {"n": True, "s": "Paris"}, want, tools).startswith("wrong type:")
    assert ast_match("f", {"n": 2, "s": "Paris", "k": 1.5}, want, tools).startswith("wrong type:")
    assert ast_match("f", {"n": 2, "s": "Paris", "b": False}, want, tools).startswith("unexpected optional:")
    assert ast_match("f", {"n": 2}, want, tools).startswith("missing optional:")
    assert ast_match("f", {"n": 3, "s": "Paris"}, want, tools).startswith("value:")
    assert parse_reply(' {"name": "f", "arguments": {}}') == ("call", ("f", {}))
    assert parse_reply('{"name": "f", "arguments": [1]}') == ("invalid", None)
    assert parse_reply('{"name": "f", "arguments": {') == ("invalid", None)
    assert parse_reply("It is 21 C.") == ("answer", None)
    p, r, f1 = integration_f1("Version 6.0.12 from 2026-03-13, see a.py and b.py",
                              ["6.0.12", "2026-03-13", "2830"], "6.0.12 2026-03-13 2830 a.py")
    assert (p, r) == (3 / 4, 2 / 3) and f1 == pytest.approx(2 * p * r / (p + r))


# Bounded strings: an untrained model under the grammar must close every string, so its calls end.
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "units": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "days"], "additionalProperties": False}}}
BOOK = {"type": "function", "function": {"name": "book_table", "parameters": {
    "type": "object", "properties": {
        "people": {"type": "integer", "minimum": 1, "maximum": 12},
        "time": {"type": "string", "enum": ["18:00", "19:30", "21:00"]}},
    "required": ["people", "time"], "additionalProperties": False}}}


def bounded_records(n):
    tools = [WEATHER, BOOK]
    out = []
    for i in range(n):
        call = {"name": "get_weather", "arguments": {"city": f"Paris{i}", "days": 2}}
        out.append({
            "id": f"w{i}", "tools": tools, "source": "gold",
            "messages": [system_note(tools), {"role": "user", "content": f"Weather in Paris{i} for 2 days?"},
                         {"role": "assistant", "content": json.dumps(call)},
                         {"role": "tool", "content": '{"temp_c": 21}'},
                         {"role": "assistant", "content": "21 C."}],
            "meta": {"control": False, "expected_calls": [call], "facts": ["21"],
                     "fixtures": {f'get_weather:{{"city":"Paris{i}","days":2}}': {"temp_c": 21}}}})
    return out


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory, tokenizer):
    return MLXEngine.load(save_tiny(tmp_path_factory.mktemp("te") / "tiny", tokenizer, seed=7))


def test_random_tiny_model_with_constraints_gives_100_percent_valid_json(random_tiny, tmp_path):
    records = bounded_records(4)
    runner = EngineRunner(random_tiny, max_tokens=40)
    metrics, episodes = evaluate(runner, records, modes=(False, True), tool_choice="required",
                                 progress=False)
    on, off = metrics["constrained"], metrics["unconstrained"]
    assert on["call_attempts"] >= len(records)  # the first reply of each episode is a call
    assert on["json_valid"] == 1.0 and on["schema_valid"] == 1.0
    assert off["json_valid"] in (None, 0.0)  # unconstrained, the untrained model writes no JSON
    # Deterministic: the same model and data give the same episodes, through the CLI as well.
    write_jsonl(tmp_path / "test.jsonl", records[:1])
    argv = ["--model", random_tiny.path, "--data", str(tmp_path / "test.jsonl"), "--out",
            str(tmp_path / "ev"), "--max-tokens", "40", "--tool-choice", "required", "--constrained", "on"]
    tooleval.main(argv)
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    first = [json.loads(line) for line in (tmp_path / "ev" / "episodes.jsonl").read_text().splitlines()]
    assert [e["turns"] for e in first if e["mode"] == "constrained"] == \
        [e.turns for e in episodes["constrained"][:1]]
    assert report["metrics"]["constrained"]["json_valid"] == 1.0
    assert "| JSON validity (call attempts) |" in (tmp_path / "ev" / "report.md").read_text()


def test_endpoint_runner_over_a_real_server(random_tiny):
    server = ChatServer(random_tiny, {"port": 0, "time_limit": 60})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        runner = EndpointRunner(url, "tiny", max_tokens=40)
        metrics, episodes = evaluate(runner, bounded_records(2), modes=(False, True), extra_calls=0,
                                     progress=False)
    finally:
        server.shutdown()
        server.server_close()
    # The server constrains every request with tools to one call: native tool_calls come back
    # and are scored in the wire form; without tools the untrained model writes text.
    on = metrics["constrained"]
    assert on["call_attempts"] == 2 and on["json_valid"] == on["schema_valid"] == 1.0
    assert all(e.turns[0]["call"]["name"] in ("get_weather", "book_table") for e in episodes["constrained"])
    assert metrics["unconstrained"]["call_attempts"] == 0
