"""Teacher traces against a real OpenAI-compatible server on loopback: our own chat server
(runtime/server.py, tools constrained by the grammar) over a random tiny student."""

import asyncio
import copy
import json
import threading

import pytest

from mlx_student.teacher.http import HTTPTeacher, HTTPTeacherArgs
from mlx_student.tools import spans, toolgen, toolverify
from mlx_student.tools.broker import Broker
from mlx_student.tools.registry import call_text
from mlx_student.tools.traces import gold_trace, teacher_trace

from conftest import ROOT, save_tiny, write_jsonl


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tokenizer):
    from runtime.generate import MLXEngine
    from runtime.server import ChatServer

    engine = MLXEngine.load(save_tiny(tmp_path_factory.mktemp("teacher") / "tiny", tokenizer, seed=5))
    server = ChatServer(engine, {"port": 0, "max_tokens_limit": 64, "max_request_bytes": 200_000})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}/v1"
    server.shutdown()
    server.server_close()


def _bounded(tools):
    """The same tools with every string capped at 12 characters, so a random model's
    constrained call always closes within the token budget."""
    tools = copy.deepcopy(tools)

    def walk(s):
        if s.get("type") == "string" and "enum" not in s:
            s["maxLength"] = 12
        for sub in list(s.get("properties", {}).values()) + ([s["items"]] if "items" in s else []):
            walk(sub)

    for t in tools:
        walk(t["function"]["parameters"])
    return tools


def test_teacher_trace_through_the_broker(base_url, tokenizer, tmp_path):
    item = next(toolgen.make_item(0, i) for i in range(1, 40)
                if toolgen.make_item(0, i)["meta"]["complexity"] == "multi")
    gold = gold_trace(item)
    gold["tools"] = _bounded(gold["tools"])
    broker = Broker(gold["meta"]["fixtures"])

    async def run():
        teacher = HTTPTeacher(HTTPTeacherArgs(base_url=base_url, model="tiny", max_tokens=48, max_retries=0))
        try:
            return await teacher_trace(teacher, gold, broker)
        finally:
            await teacher.aclose()

    trace = asyncio.run(run())
    assert trace["source"] == "teacher" and trace["id"] == gold["id"]
    calls = [m for m in trace["messages"] if m.get("tool_calls")]
    stats = trace["meta"]["teacher"]
    assert stats["calls"] == len(calls) == len(item["meta"]["expected_calls"]) == 2  # the call budget
    names = {t["function"]["name"] for t in gold["tools"]}
    for m in calls:  # constrained calls, rewritten in the wire form the student trains on
        fn = m["tool_calls"][0]["function"]
        assert fn["name"] in names and m["content"] == call_text(fn["name"], json.loads(fn["arguments"]))
    # a random model does not guess the recorded arguments: each call is a reported miss, which
    # the teacher saw as an error result
    assert stats["misses"] == len(broker.misses) == 2
    results = [json.loads(m["content"]) for m in trace["messages"] if m["role"] == "tool"]
    assert all("no recorded result" in r["error"] for r in results)
    assert trace["messages"][-1]["role"] == "assistant" and not trace["messages"][-1].get("tool_calls")
    trace["spans"] = spans.compute(tokenizer, trace)
    assert len([s for s in trace["spans"] if s["type"] == "tool_name"]) == 2
    write_jsonl(tmp_path / "teacher.jsonl", [trace])
    report = toolverify.verify([tmp_path / "teacher.jsonl"], tokenizer)
    m = report["metrics"]
    assert m["name_validity"] == m["schema_validity"] == m["wire_form"] == m["alignment_rate"] == 1.0
    assert m["replay_consistency"] == 1.0  # misses are reported as such, not forged results


def test_toolgen_cli_writes_teacher_traces(base_url, tmp_path):
    toolgen.main(["--n", "3", "--out", str(tmp_path / "t"), "--teacher-url", base_url,
                  "--teacher-limit", "2", "--teacher-max-tokens", "40",
                  "--tokenizer", str(ROOT / "models/smollm2-135m-instruct")])
    teacher = [json.loads(x) for f in sorted((tmp_path / "t" / "teacher").glob("*.jsonl"))
               for x in f.read_text().splitlines()]
    assert len(teacher) == 2 and {r["source"] for r in teacher} == {"teacher"}
    gold_ids = {json.loads(x)["id"] for f in (tmp_path / "t").glob("*.jsonl") for x in f.read_text().splitlines()}
    assert {r["id"] for r in teacher} <= gold_ids
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["teacher"]["records"] == 2 and manifest["teacher"]["sources"] == {"teacher": 2}
