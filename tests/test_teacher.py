"""The HTTP teacher against a real mlx_lm.server on loopback (the default teacher, fp32;
conftest's `server`).

Faults a real server cannot be made to produce come from `FaultProxy`, a thin HTTP proxy in
front of the real server that answers scripted requests with 500, 429 + Retry-After, a
connection dropped mid-body or a hang, and forwards everything else unchanged.
"""

import asyncio
import http.server
import threading
import time

import httpx
import pytest

from mlx_student.teacher import server as teacher_server
from mlx_student.teacher.http import (
    AlignmentError, HTTPTeacher, HTTPTeacherArgs, TeacherError, align, parse_response,
)

MESSAGES = [{"role": "user", "content": "Name three colors."}]


class FaultProxy:
    """Forward to `upstream`; the i-th POST gets `faults[i]` if there is one:
    "500", "429" (with Retry-After), "drop" (half the real body, then close) or
    "hang" (say nothing for `hang_s`). `log` holds (time, fault, headers) per POST."""

    def __init__(self, upstream, faults=(), retry_after=1, hang_s=4.0):
        self.upstream, self.faults = upstream, list(faults)
        self.retry_after, self.hang_s = retry_after, hang_s
        self.log, self.lock = [], threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body, headers=()):
                self.send_response(status)
                for k, v in [("Content-Type", "application/json"),
                             ("Content-Length", str(len(body))), *headers]:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                r = httpx.get(proxy.upstream + self.path, timeout=10)
                self._reply(r.status_code, r.content)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    fault = proxy.faults.pop(0) if proxy.faults else None
                    proxy.log.append((time.monotonic(), fault, dict(self.headers)))
                if fault == "500":
                    return self._reply(500, b'{"error": "injected"}')
                if fault == "429":
                    return self._reply(429, b'{"error": "slow down"}',
                                       [("Retry-After", str(proxy.retry_after))])
                if fault == "hang":
                    time.sleep(proxy.hang_s)
                    return
                r = httpx.post(proxy.upstream + self.path, content=body, timeout=120,
                               headers={"Content-Type": "application/json"})
                if fault == "drop":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(r.content)))
                    self.end_headers()
                    self.wfile.write(r.content[: len(r.content) // 2])
                    self.wfile.flush()
                    return  # HTTP/1.0: the connection closes here, the body cut short
                self._reply(r.status_code, r.content)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def posts(self, fault="any"):
        return [e for e in self.log if fault == "any" or e[1] == fault]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.url)
    yield p
    p.close()


def teacher_args(url, **kw):
    defaults = dict(base_url=url + "/v1", model="default_model", max_tokens=12, top_logprobs=5,
                    concurrency=1, timeout=60.0, backoff=0.05, max_retries=4)
    return HTTPTeacherArgs(**{**defaults, **kw})


def complete(args, messages=MESSAGES):
    async def go():
        teacher = HTTPTeacher(args)
        try:
            return await teacher.complete(messages), teacher.retries
        finally:
            await teacher.aclose()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def greedy(server):
    """One real greedy completion with 5 top logprobs per token."""
    completion, _ = complete(teacher_args(server.url))
    return completion


def test_server_health_and_stop(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert server.process.poll() is None


def test_completion_is_complete_with_sorted_aligned_topk(greedy, tokenizer):
    c = greedy
    assert c.text and c.finish_reason in ("stop", "length")
    assert c.usage["completion_tokens"] == len(c.logprobs)
    ids, topk = align(tokenizer, c.text, c.finish_reason, c.logprobs, 49152)
    assert len(ids) == len(topk) == len(c.logprobs)
    assert tokenizer.decode([i for i in ids if i not in tokenizer.eos_token_ids]) == c.text
    for token, top in zip(ids, topk):
        logprobs = [lp for _, lp in top]
        assert logprobs == sorted(logprobs, reverse=True) and len(top) == 5
        assert token == top[0][0]  # greedy: every generated token is its position's argmax
    if c.finish_reason == "stop":
        assert ids[-1] in tokenizer.eos_token_ids


def test_alignment_mismatches_are_reported_not_shifted(greedy, tokenizer):
    c = greedy
    with pytest.raises(AlignmentError, match="no ids from the .* positions' top-k decode to the text"):
        align(tokenizer, c.text, "length", c.logprobs[2:], 49152)
    with pytest.raises(AlignmentError):  # one position short: the ids no longer fit
        align(tokenizer, c.text, c.finish_reason, c.logprobs[1:], 49152)
    text = c.logprobs[:-1] if c.finish_reason == "stop" else c.logprobs
    rotated = text[1:] + text[:1]  # the right count, shifted by one
    with pytest.raises(AlignmentError, match="decode to the text"):
        align(tokenizer, c.text, "length", rotated, 49152)


def test_a_non_canonical_tokenization_is_recovered_exactly(tokenizer):
    """Models sometimes generate "Hel"+"lo" where re-tokenizing gives "Hello": the ids come
    from the top-k lists then, checked by decoding, not by shifting positions."""
    text = " Hello world"
    canonical = tokenizer.encode(text, add_special_tokens=False)
    vocab = tokenizer.get_vocab()
    token = tokenizer.convert_ids_to_tokens(canonical[0])  # "ĠHello"
    cut = next(i for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab)
    generated = [vocab[token[:cut]], vocab[token[cut:]]] + canonical[1:]
    assert tokenizer.decode(generated) == text and len(generated) == len(canonical) + 1
    others = [vocab[t] for t in (",", "Ġthe", "Ġand")]
    positions = [[{"id": g, "logprob": -0.5}] + [{"id": o, "logprob": -2.0 - j} for j, o in enumerate(others)
                 if o != g] for g in generated]
    ids, topk = align(tokenizer, text, "length", positions, 49152)
    assert ids == generated and len(topk) == len(positions)


def test_token_strings_without_ids_map_through_the_vocabulary(greedy, tokenizer):
    """OpenAI-style entries (token strings, no ids) and vLLM's token_id:N give the same ids."""
    c = greedy
    expected = align(tokenizer, c.text, c.finish_reason, c.logprobs, 49152)
    strings = [[{"token": e["token"], "logprob": e["logprob"]} for e in p] for p in c.logprobs]
    vllm = [[{"token": f"token_id:{e['id']}", "logprob": e["logprob"]} for e in p] for p in c.logprobs]
    assert align(tokenizer, c.text, c.finish_reason, strings, 49152) == expected
    assert align(tokenizer, c.text, c.finish_reason, vllm, 49152) == expected
    strings[0][0]["token"] = "no-such-token-xyz"
    with pytest.raises(AlignmentError, match="not in the student's vocabulary"):
        align(tokenizer, c.text, c.finish_reason, strings, 49152)


def test_reasoning_content_is_captured():
    body = {"choices": [{"message": {"content": "4", "reasoning_content": "2+2 is 4"},
                         "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}
    c = parse_response(body)
    assert (c.text, c.reasoning, c.finish_reason, c.logprobs) == ("4", "2+2 is 4", "stop", None)


def test_every_fault_is_retried_until_the_real_answer(proxy, greedy):
    faults = ["500", "429", "drop", "hang"]
    proxy.faults, proxy.retry_after, proxy.hang_s = list(faults), 0, 6.0
    c, retries = complete(teacher_args(proxy.url, timeout=5.0, max_tokens=8))
    # A real answer slower than the timeout on a busy machine is one more (legitimate) retry.
    assert [e[1] for e in proxy.log][:4] == faults and retries == len(proxy.log) - 1 >= 4
    assert len(c.logprobs) == 8 and greedy.text.startswith(c.text)  # the same greedy answer


def test_retry_after_is_honoured(proxy):
    proxy.faults, proxy.retry_after = ["429"], 1
    complete(teacher_args(proxy.url))
    (t429, *_), (t_next, *_) = proxy.log
    assert t_next - t429 >= 1.0  # the jittered backoff alone would wait < 0.05 s


def test_rate_limit_and_giving_up_after_retries(proxy):
    proxy.faults = ["500"] * 3
    with pytest.raises(TeacherError, match="failed after 3 attempts; last: HTTP 500"):
        complete(teacher_args(proxy.url, max_retries=2, rpm=120))
    times = [e[0] for e in proxy.log]  # 120 rpm: starts 0.5 s apart (backoff alone: < 0.1 s)
    assert len(times) == 3 and times[-1] - times[0] >= 0.95


def test_client_errors_fail_at_once_and_the_api_key_is_sent(proxy, monkeypatch):
    monkeypatch.setenv("KD_TEST_KEY", "sk-test")
    with pytest.raises(TeacherError, match="HTTP 404"):  # the real server knows no such model
        complete(teacher_args(proxy.url, model="no/such-model", api_key_env="KD_TEST_KEY"))
    assert len(proxy.log) == 1 and proxy.log[0][2]["Authorization"] == "Bearer sk-test"
    monkeypatch.delenv("KD_TEST_KEY")
    with pytest.raises(TeacherError, match="KD_TEST_KEY is not set"):
        complete(teacher_args(proxy.url, api_key_env="KD_TEST_KEY"))


def test_a_server_that_cannot_start_reports_its_log(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="is up but unhealthy") as e:
        with teacher_server.serve(tmp_path / "no-such-model", log_path=log, timeout=60):
            pass
    assert str(log) in str(e.value) and "no-such-model" in str(e.value)  # the cause, from the log


def test_zero_probability_alternatives_are_left_out_and_records_stay_json(tokenizer, tmp_path):
    """A -inf logprob (zero probability) is no target and not JSON: the record drops it, and
    the KD writer refuses any non-finite number rather than write -Infinity."""
    import math
    import os

    from mlx_student.teacher import http, kd_mix

    alternatives = [{"id": 7, "logprob": -0.5}, {"id": 9, "logprob": -math.inf},
                    {"id": 3, "logprob": -0.5}]
    assert http.sorted_topk(tokenizer, alternatives, 49152) == [[3, -0.5], [7, -0.5]]
    fd = os.open(tmp_path / "kd.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        with pytest.raises(ValueError, match="not JSON compliant"):
            kd_mix.append(fd, {"topk": [[[9, -math.inf]]]})
    finally:
        os.close(fd)
    assert (tmp_path / "kd.jsonl").read_bytes() == b""
