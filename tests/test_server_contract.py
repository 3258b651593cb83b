"""The server's client contract, tried with the official `openai` client and raw sockets
against the real server on loopback over a tiny student: logprobs, usage in streams, the
completions route, refusals by name, every request shape answered, a bounded queue."""

import asyncio
import json
import socket
import threading

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest

import runtime.server as server_module
from mlx_student.teacher.http import HTTPTeacher, HTTPTeacherArgs, align
from runtime.generate import GenerationParams, MLXEngine, chat_prompt, encode_prompt, generate
from runtime.openai_api import token_info
from runtime.server import ChatServer
from conftest import save_tiny

HELLO = [{"role": "user", "content": "Say hello."}]
EPS32 = float(np.finfo(np.float32).eps)


def start(engine, **cfg):
    server = ChatServer(engine, {"port": 0, "max_tokens_limit": 64, **cfg})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, "http://%s:%d" % server.server_address[:2]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer):
    return MLXEngine.load(save_tiny(tmp_path_factory.mktemp("contract") / "tiny", tokenizer, seed=5))


@pytest.fixture(scope="module")
def url(engine):
    server, url = start(engine)
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def reference_logprobs(engine, prompt, tokens):
    """log-softmax of the model's logits at each generated position, in one full forward pass."""
    logits = engine.model(mx.array([list(prompt) + list(tokens)]))[0, len(prompt) - 1:].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def test_chat_logprobs_match_the_model(client, engine):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    content = choice.logprobs.content
    ids = [entry.model_extra["id"] for entry in content]
    prompt = chat_prompt(engine.tokenizer, HELLO)
    expected = generate(engine, prompt, GenerationParams(max_tokens=10))
    extra = [engine.tokenizer.eos_token_id] if expected.finish_reason == "stop" else []
    assert ids == expected.tokens + extra  # the EOS position closes a "stop", as in mlx_lm.server
    assert r.usage.completion_tokens == len(expected.tokens)
    assert "".join(e.token for e in content[:len(expected.tokens)]).lstrip() == choice.message.content.lstrip()
    ref = reference_logprobs(engine, prompt, ids)
    # fp32 rounding: the cached incremental pass and the full pass sum in different orders;
    # each logit is a sum over hidden_size products, so |err| <~ hidden * eps * (1 + |value|).
    hidden = engine.model.args.hidden_size
    for pos, entry in enumerate(content):
        tol = hidden * EPS32 * (1 + abs(entry.logprob))
        assert abs(entry.logprob - ref[pos, entry.model_extra["id"]]) < tol
        top = entry.top_logprobs
        assert len(top) == 5 and [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].model_extra["id"] == int(np.argmax(ref[pos]))  # greedy: the best is the token
        for t in top:
            assert abs(t.logprob - ref[pos, t.model_extra["id"]]) < hidden * EPS32 * (1 + abs(t.logprob))
            assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token


def test_the_server_is_a_teacher_for_the_next_student(url, engine):
    """mlx_student.teacher.http over this server: top-k aligns to the ids the model generated."""
    async def ask():
        teacher = HTTPTeacher(HTTPTeacherArgs(base_url=url + "/v1", model="tiny", max_tokens=12, top_logprobs=4))
        try:
            return await teacher.complete(HELLO)
        finally:
            await teacher.aclose()

    c = asyncio.run(ask())
    ids, topk = align(engine.tokenizer, c.text, c.finish_reason, c.logprobs, engine.model.args.vocab_size)
    expected = generate(engine, chat_prompt(engine.tokenizer, HELLO), GenerationParams(max_tokens=12))
    assert ids[:len(expected.tokens)] == expected.tokens and len(topk) == len(ids)


def test_token_bytes_are_exact_where_text_is_not(tokenizer):
    """A byte-level token may end inside a UTF-8 character: its text shows U+FFFD, its bytes
    are the real ones, and the bytes of all tokens join to the text."""
    text = "naïve 𝔘 café"
    ids = tokenizer.encode(text, add_special_tokens=False)
    infos = [token_info(tokenizer, i) for i in ids]
    assert b"".join(bytes(i["bytes"]) for i in infos).decode("utf-8") == text
    assert any("\ufffd" in i["token"] for i in infos)  # 𝔘 (4 bytes) is split across tokens


def test_stream_usage_logprobs_and_n(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=9, temperature=1.0,
                                                 seed=1, stream=True, stream_options={"include_usage": True},
                                                 logprobs=True, top_logprobs=2))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-2].choices[0].finish_reason == "length"
    entries = [e for c in chunks[:-1] if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 9 and all(len(e.top_logprobs) == 2 for e in entries)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    # the detokenizer drops the first token's leading space (as mlx-lm's does)
    assert b"".join(bytes(e.bytes) for e in entries).decode().lstrip() == streamed.lstrip()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, n=2)
    assert e.value.body["param"] == "n"
    for extra, param in [({"frequency_penalty": 9}, "frequency_penalty"), ({"functions": []}, "functions"),
                         ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"top_logprobs": 3}, "top_logprobs")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=HELLO, extra_body=extra)
        assert e.value.body["param"] == param, extra


def test_completions_route(client, engine):
    r = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8, logprobs=3)
    expected = generate(engine, encode_prompt(engine.tokenizer, "def add(a, b):"), GenerationParams(max_tokens=8))
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason and r.usage.completion_tokens == len(expected.tokens)
    assert len(choice.logprobs.token_logprobs) == len(expected.tokens) + (expected.finish_reason == "stop")
    assert all(len(t) <= 3 for t in choice.logprobs.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="def add(a, b):", max_tokens=8, stream=True) if c.choices)
    assert streamed == expected.text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", echo=True)
    assert e.value.body["param"] == "echo"


def raw(url, data: bytes, path="/v1/chat/completions", method="POST"):
    return httpx.request(method, url + path, content=data, headers={"Content-Type": "application/json"}, timeout=60)


def test_every_request_shape_gets_a_json_answer(url):
    r = raw(url, b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    assert "lone UTF-16 surrogate" in r.json()["error"]["message"]
    r = raw(url, b'{"prompt": "\\udfff", "max_tokens": 2}', path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = raw(url, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = raw(url, b"[]")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = raw(url, b"{}", method="PUT")  # the standard library's own refusal, as JSON too
    assert r.status_code == 501 and "error" in r.json()
    with socket.create_connection((httpx.URL(url).host, httpx.URL(url).port)) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        reply = b"".join(iter(lambda: s.recv(4096), b"")).decode()  # until the server closes
    assert reply.startswith("HTTP/1.1 400") and reply.split("\r\n\r\n", 1)[1].startswith('{"error"')


def test_patternproperties_is_refused_up_front(client):
    schema = {"type": "object", "patternProperties": {"^S_": {"type": "string"}}, "additionalProperties": False}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "'patternProperties' (at $)" in e.value.body["message"]


def test_a_constrained_document_cut_short_is_length(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=1.0, seed=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert r.choices[0].finish_reason == "length"


def test_a_grammar_that_fails_is_never_stop(engine, monkeypatch):
    """The fault of issue 19 (the matcher in an error state, only EOS left) injected around the
    real grammar processor: the reply is a 500 naming the violation, in a stream an error event."""
    real = server_module.json_schema_processor

    def failing(tokenizer, schema, n_vocab):
        inner = real(tokenizer, schema, n_vocab)
        eos = mx.array(np.arange(n_vocab) == tokenizer.eos_token_id)
        calls = []

        def processor(tokens, logits):  # the prompt, two grammar steps, then only EOS
            calls.append(1)
            if len(calls) > 3:
                return mx.where(eos, mx.zeros_like(logits), mx.full(logits.shape, -mx.inf))
            return inner(tokens, logits)
        return processor

    monkeypatch.setattr(server_module, "json_schema_processor", failing)
    server, url = start(engine)
    try:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as e:
                c.chat.completions.create(model="tiny", messages=HELLO, response_format=fmt, max_tokens=20)
            assert e.value.body["code"] == "invalid_constrained_output", e.value.body
            assert "does not match the requested schema (not valid JSON" in e.value.body["message"]
            with pytest.raises(openai.APIError, match="does not match the requested schema"):
                finishes = [ch.choices[0].finish_reason for ch in c.chat.completions.create(
                    model="tiny", messages=HELLO, response_format=fmt, max_tokens=20, stream=True)]
                assert "stop" not in finishes
    finally:
        server.shutdown()
        server.server_close()


def test_a_full_queue_answers_503_with_retry_after(engine):
    server, url = start(engine, max_queue=2)
    statuses, retry = [], []

    def one():
        try:
            r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 40,
                                                                "temperature": 1.0}, timeout=120)
            statuses.append(r.status_code)
            if r.status_code == 503:
                retry.append(int(r.headers["Retry-After"]))
                assert r.json()["error"]["code"] == "server_overloaded"
        except httpx.TransportError as e:  # a dropped connection: the failure this test is about
            statuses.append(type(e).__name__)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.shutdown()
    server.server_close()
    assert len(statuses) == 12 and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1 and all(s >= 1 for s in retry)


def test_serve_without_config_json_is_a_clear_exit_2(tmp_path):
    import subprocess
    import sys

    (tmp_path / "weights").mkdir()
    p = subprocess.run([sys.executable, "-m", "runtime.server", "--model", str(tmp_path / "weights")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"--model {tmp_path / 'weights'}: no config.json in the folder" in p.stderr


def test_a_template_that_refuses_the_messages_is_a_400(engine):
    import copy

    from mlx_lm.tokenizer_utils import TokenizerWrapper

    hf = copy.deepcopy(engine.tokenizer._tokenizer)
    hf.chat_template = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    server, url = start(MLXEngine(engine.model, TokenizerWrapper(hf)))
    try:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={"max_tokens": 2, "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert r.json()["error"]["message"] == ("the model's chat template refused the messages: "
                                                "System role not supported")
    finally:
        server.shutdown()
        server.server_close()


def test_load_script_accounts_for_every_request(url, tmp_path, capsys):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("load_serve", ROOT / "scripts/load_serve.py")
    load_serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_serve)
    out = tmp_path / "load.json"
    assert load_serve.main(["--url", url, "--requests", "6", "--max-tokens", "2", "--json", str(out)]) == 0
    rows = {r["outcome"]: r["count"] for r in json.loads(out.read_text())["runs"][0]["rows"]}
    assert rows == {"answered": 6, "refused": 0, "errors": 0, "dropped": 0}
    assert "| answered | 6 |" in capsys.readouterr().out
