"""Process-target spans: byte and token offsets over the training text, verified by round trip."""

import json

import pytest

from mlx_student.tools import spans, toolgen
from mlx_student.tools.traces import gold_trace


@pytest.fixture(scope="module")
def records(tokenizer):
    out = []
    cjk = next(i for i in range(35, 4000, toolgen.CYCLE)
               if toolgen.make_item(0, i)["meta"]["locale"] in ("ja", "zh"))
    # ordinary, multi, injection, malformed, locale (CJK: multi-byte characters), long context
    for i in (1, 2, 5, 15, cjk, 38):
        r = gold_trace(toolgen.make_item(0, i))
        r["spans"] = spans.compute(tokenizer, r)
        out.append(r)
    return out


def test_spans_hold_names_arguments_and_facts(records, tokenizer):
    for r in records:
        text = tokenizer.apply_chat_template(r["messages"], tools=r["tools"], tokenize=False).encode()
        ids = list(tokenizer.apply_chat_template(r["messages"], tools=r["tools"]))
        calls = [c["function"] for m in r["messages"] for c in m.get("tool_calls") or []]
        names = [s for s in r["spans"] if s["type"] == "tool_name"]
        args = [s for s in r["spans"] if s["type"] == "arguments"]
        assert [text[s["byte_start"]:s["byte_end"]].decode() for s in names] == [c["name"] for c in calls]
        assert [json.loads(text[s["byte_start"]:s["byte_end"]]) for s in args] == \
            [json.loads(c["arguments"]) for c in calls]
        facts = {text[s["byte_start"]:s["byte_end"]].decode() for s in r["spans"] if s["type"] == "integration"}
        assert facts == set(r["meta"]["facts"])  # every fact, in the final answer
        for s in r["spans"]:
            # minimal token cover, checked by decoding: the tokens hold the bytes; one fewer
            # at either end does not
            covered = tokenizer.decode(ids[s["tok_start"]:s["tok_end"]]).encode()
            assert text[s["byte_start"]:s["byte_end"]] in covered
            assert text[s["byte_start"]:s["byte_end"]] not in tokenizer.decode(ids[s["tok_start"] + 1:s["tok_end"]]).encode()
            assert text[s["byte_start"]:s["byte_end"]] not in tokenizer.decode(ids[s["tok_start"]:s["tok_end"] - 1]).encode()


def test_round_trip_aligns_every_span(records, tokenizer):
    for r in records:
        c = spans.check(tokenizer, r)
        assert c["problems"] == [] and c["aligned"] == c["spans"] == len(r["spans"]) > 0


def test_locale_spans_count_bytes_not_characters(records, tokenizer):
    r = records[4]
    answer = r["messages"][-1]["content"]
    assert any(ord(ch) > 0x3000 for ch in answer)
    (span,) = [s for s in r["spans"] if s["type"] == "integration"]
    text = tokenizer.apply_chat_template(r["messages"], tools=r["tools"], tokenize=False)
    start = text.index(answer) + answer.index(r["meta"]["facts"][0])
    assert span["byte_start"] == len(text[:start].encode()) != start


def test_round_trip_catches_shifted_dropped_and_retyped_spans(records, tokenizer):
    r = json.loads(json.dumps(records[1]))
    r["spans"][0]["byte_start"] += 1
    assert "not a span of this trace" in spans.check(tokenizer, r)["problems"][0]
    r = json.loads(json.dumps(records[1]))
    r["spans"][1]["tok_end"] += 1  # no longer minimal
    assert spans.check(tokenizer, r)["aligned"] == len(r["spans"]) - 1
    r = json.loads(json.dumps(records[1]))
    del r["spans"][-1]
    c = spans.check(tokenizer, r)
    assert c["spans"] == len(records[1]["spans"]) and "missing" in c["problems"][0]
    r = json.loads(json.dumps(records[1]))
    r["messages"][-1]["content"] = r["messages"][-1]["content"].replace(r["meta"]["facts"][0], "?", 1)
    assert spans.check(tokenizer, r)["aligned"] < len(r["spans"])  # the text moved under the spans


def test_an_openai_shaped_trace_gets_the_spans_training_sees(records, tokenizer, tmp_path):
    """The same trace with its calls only in tool_calls (content null, arguments a JSON
    string, as an API returns them): spans are measured on the text the loader renders."""
    from mlx_student.data import load_jsonl

    r = json.loads(json.dumps(records[0]))
    for m in r["messages"]:
        if m.get("tool_calls"):
            m["content"] = None
    r["spans"] = spans.compute(tokenizer, r)
    assert r["spans"] == records[0]["spans"]  # calls shown as content, as trained
    assert spans.check(tokenizer, r)["problems"] == []
    (tmp_path / "train.jsonl").write_text(json.dumps(r) + "\n")
    example = load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 4096).examples[0]
    assert example.weights is not None and example.weights.sum() > 0
