"""The chat server over a real HTTP socket, with httpx as the client."""

import json
import threading

import httpx
import jsonschema
import pytest

from runtime.constrained import tool_call_schema
from runtime.generate import GenerationParams, MLXEngine, chat_prompt, generate
from mlx_student.messages import normalize_messages
from runtime.server import ChatServer, main as serve_main
from conftest import save_tiny

TOKEN = "s3cret-token"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer):
    return MLXEngine.load(save_tiny(tmp_path_factory.mktemp("srv") / "tiny", tokenizer, seed=3))


@pytest.fixture(scope="module")
def base_url(engine):
    server = ChatServer(engine, {"port": 0, "max_tokens_limit": 64, "max_request_bytes": 20_000},
                        api_key=TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


def chat(content="Say hello.", **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


def test_non_streaming_equals_the_engine(client, engine):
    r = client.post("/v1/chat/completions", json=chat(max_tokens=12))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    prompt = chat_prompt(engine.tokenizer, [{"role": "user", "content": "Say hello."}])
    expected = generate(engine, prompt, GenerationParams(max_tokens=12))
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == len(expected.tokens)
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_streaming_sse(client, engine):
    req = chat("Tell me a story.", max_tokens=20, temperature=1.0, seed=4, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 5
    r2 = client.post("/v1/chat/completions", json={**req, "stream": False})
    assert r2.json()["choices"][0]["message"]["content"] == text


def test_tools_give_valid_tool_calls(client):
    for seed in range(3):
        r = client.post("/v1/chat/completions", json=chat("Weather in Oslo for 3 days?", tools=[WEATHER],
                                                          temperature=1.0, seed=seed, max_tokens=60))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        call = choice["message"]["tool_calls"][0]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])


def test_tools_streaming(client):
    req = chat("Weather?", tools=[WEATHER], tool_choice="required", stream=True, max_tokens=60)
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x and x != "data: [DONE]"]
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert len(calls) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    args = json.loads(calls[0][0]["function"]["arguments"])
    jsonschema.validate({"name": calls[0][0]["function"]["name"], "arguments": args}, tool_call_schema([WEATHER]))


def test_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        r = client.post("/v1/chat/completions", json=chat("Who?", response_format=fmt, temperature=1.0,
                                                          seed=seed, max_tokens=60))
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def error(r, status):
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["message"] and body["type"]
    return body


def test_bad_requests(client, base_url):
    url = "/v1/chat/completions"
    error(client.post(url, content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    error(client.post(url, json={"messages": []}), 400)
    error(client.post(url, json=chat(max_tokens=65)), 400)  # over the server's limit of 64
    error(client.post(url, json=chat(max_tokens=0)), 400)
    error(client.post(url, json=chat(temperature="hot")), 400)
    error(client.post(url, json=chat(response_format={"type": "xml"})), 400)
    error(client.post(url, json=chat(tools=[WEATHER], tool_choice={"type": "function",
                                                                   "function": {"name": "nope"}})), 400)
    error(client.post(url, json=chat("x" * 30_000)), 413)
    error(client.get("/v1/nothing"), 404)
    # authentication
    assert error(httpx.post(base_url + url, json=chat(max_tokens=2)), 401)["type"] == "authentication_error"
    error(httpx.post(base_url + url, json=chat(max_tokens=2), headers={"Authorization": "Bearer wrong"}), 401)
    with httpx.Client(base_url=base_url) as keep_alive:  # the refused body is not read as a request
        for _ in range(2):
            error(keep_alive.post(url, json=chat(max_tokens=2)), 401)
    assert client.get("/health").json() == {"status": "ok"}


def test_max_tokens_is_honoured(client):
    r = client.post("/v1/chat/completions", json=chat("Tell me a long story.", max_tokens=7, temperature=1.0, seed=0))
    body = r.json()
    assert body["usage"]["completion_tokens"] == 7 and body["choices"][0]["finish_reason"] == "length"


HISTORY = [{"role": "user", "content": "Weather in Oslo?"},
           {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
               "name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 4}'}]


def test_openai_shaped_history_is_served(client, engine):
    """What the server itself returns for a call (content null, arguments a JSON string) comes
    back as history; arguments as an object or the content as text parts mean the same."""
    r = client.post("/v1/chat/completions", json={"messages": HISTORY, "max_tokens": 8})
    assert r.status_code == 200, r.text
    same = [{"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
            {**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "function": {
                "name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}}]}, HISTORY[2]]
    r2 = client.post("/v1/chat/completions", json={"messages": same, "max_tokens": 8})
    assert r2.json()["choices"] == r.json()["choices"]
    prompt = chat_prompt(engine.tokenizer, normalize_messages(HISTORY))
    assert r.json()["usage"]["prompt_tokens"] == len(prompt)
    assert '{"name":"get_weather","arguments":{"city":"Oslo","days":1}}' in engine.tokenizer.decode(prompt)


def test_invalid_tool_arguments_are_a_400_naming_the_field(client):
    bad = [HISTORY[0], {**HISTORY[1], "tool_calls": [{**HISTORY[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": "{city: Paris}"}}]}, HISTORY[2]]
    body = error(client.post("/v1/chat/completions", json={"messages": bad}), 400)
    assert body["param"] == "messages[1].tool_calls[0].function.arguments"
    assert body["message"].startswith("messages[1].tool_calls[0].function.arguments: not valid JSON")
    body = error(client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}), 400)
    assert body["param"] == "messages[0].content[0].type" and "'image_url'" in body["message"]


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "--port must be in 0-65535, got 99999"),
    (["--time-limit", "-5"], "--time-limit must be a number of seconds > 0, got -5.0"),
    (["--queue-timeout", "0"], "--queue-timeout must be a number of seconds > 0, got 0.0"),
    (["--num-draft-tokens", "0"], "--num-draft-tokens must be at least 1, got 0")])
def test_cli_refuses_out_of_range_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as e:  # checked before the model is read
        serve_main(["--model", "runs/never-read"] + flags)
    assert e.value.code == 2 and capsys.readouterr().err.endswith(f"error: {message}\n")
