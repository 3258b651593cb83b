"""JSON-schema constrained decoding on an untrained (random) tiny student: every output is valid."""

import json

import jsonschema
import pytest

from runtime.constrained import engine_vocab, json_schema_processor, tool_call_schema
from runtime.generate import GenerationParams, MLXEngine, chat_prompt, generate
from conftest import save_tiny


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "temp": {"type": "number", "minimum": -40, "maximum": 55.5},
            "units": {"type": "string", "enum": ["c", "f"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
            "where": {"type": "object", "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "exclusiveMinimum": -180, "exclusiveMaximum": 180}},
                "required": ["lat"], "additionalProperties": False},
        },
        "required": ["city", "days", "temp"],
        "additionalProperties": False}},
}
BOOK = {"type": "function", "function": {"name": "book_table", "parameters": {
    "type": "object",
    "properties": {"people": {"type": "integer", "minimum": 1, "maximum": 12},
                   "time": {"type": "string", "enum": ["18:00", "19:30", "21:00"]},
                   "notes": {"type": ["string", "null"], "maxLength": 20}},
    "required": ["people", "time"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory, tokenizer):
    return MLXEngine.load(save_tiny(tmp_path_factory.mktemp("c") / "tiny", tokenizer, seed=7))


def run(engine, schema, n, temperature, max_tokens=160):
    prompt = chat_prompt(engine.tokenizer, [{"role": "user", "content": "Weather in Paris, please."}],
                         tools=[WEATHER, BOOK])
    outs = []
    for seed in range(n):
        proc = json_schema_processor(engine.tokenizer, schema, engine_vocab(engine))
        outs.append(generate(engine, prompt, GenerationParams(
            max_tokens=max_tokens, temperature=temperature, seed=seed), logits_processors=[proc]))
    return outs


def test_random_model_tool_calls_are_valid_100_of_100(random_tiny):
    schema = tool_call_schema([WEATHER, BOOK])
    outs = run(random_tiny, schema, 100, temperature=1.0)
    names, optional = set(), 0
    for out in outs:
        assert out.finish_reason == "stop", out.text  # ended by EOS, not by the token limit
        call = json.loads(out.text)
        jsonschema.validate(call, schema)
        names.add(call["name"])
        optional += len(call["arguments"]) > (3 if call["name"] == "get_weather" else 2)
    assert names == {"get_weather", "book_table"}  # the walk really explores the schema
    assert optional > 0


def test_greedy_and_single_tool(random_tiny):
    schema = WEATHER["function"]["parameters"]
    for out in run(random_tiny, schema, 3, temperature=0.0):
        jsonschema.validate(json.loads(out.text), schema)


def test_unconstrained_random_model_is_not_json(random_tiny):
    """The control: without the processor the same model does not produce a valid call."""
    prompt = chat_prompt(random_tiny.tokenizer, [{"role": "user", "content": "Weather?"}], tools=[WEATHER])
    out = generate(random_tiny, prompt, GenerationParams(max_tokens=40, temperature=1.0, seed=0))
    with pytest.raises(ValueError):
        jsonschema.validate(json.loads(out.text), tool_call_schema([WEATHER]))


def test_tool_call_schema_shape():
    s = tool_call_schema([WEATHER])
    assert s["properties"]["name"] == {"const": "get_weather"}
    assert "anyOf" in tool_call_schema([WEATHER, BOOK])
    with pytest.raises(ValueError):
        tool_call_schema([])
