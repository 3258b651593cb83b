"""The judge service over a real loopback socket (httpx client): health, score, compare,
text and pre-tokenized inputs, and the 400 / 401 / 404 / 413 answers."""

import socket
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from arbiter.judge import model as judge_model
from arbiter.judge.serve import JudgeServer
from judge_pairs import make_rows
from test_judge import EPS32, tiny_judge

TOKEN = "judge-token"


@pytest.fixture(scope="module")
def judge():
    return tiny_judge(seed=2)[0]


@pytest.fixture(scope="module")
def base_url(judge, tokenizer):
    server = JudgeServer(judge, tokenizer, {"port": 0, "max_request_bytes": 4000,
                                            "max_candidates": 3, "tie_band": 0.0}, api_key=TOKEN)
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


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "judge", "clauses": list(judge_model.CLAUSES),
                        "max_length": 96}


def test_score_equals_the_judge_in_process(client, judge, tokenizer):
    row = make_rows(1, seed=5)[0]
    texts = [row["a"]["text"], row["b"]["text"]]
    r = client.post("/v1/judge/score", json={"prompt": row["prompt"], "candidates": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    s, c = judge_model.score(judge, tokenizer, row["prompt"], texts)
    np.testing.assert_array_equal(np.array(body["scores"], np.float32), np.array(s))
    assert body["clauses"][1] == {k: float(v) for k, v in zip(judge_model.CLAUSES, np.array(c[1]))}
    ids = [judge_model.encode(tokenizer, row["prompt"], t, 96) for t in texts]
    assert body["tokens"] == [len(i) for i in ids]
    r = client.post("/v1/judge/score", json={"input_ids": ids})  # pre-tokenized: same scores
    assert r.json()["scores"] == body["scores"]


def test_compare_and_its_swap(client, judge, tokenizer):
    row = make_rows(1, seed=6)[0]
    ab = client.post("/v1/judge/compare", json={"prompt": row["prompt"], "a": row["a"]["text"],
                                                 "b": row["b"]["text"]}).json()
    ba = client.post("/v1/judge/compare", json={"prompt": row["prompt"], "a": row["b"]["text"],
                                                 "b": row["a"]["text"]}).json()
    assert ab["margin"] == -ba["margin"] != 0
    assert ab["winner"] == ("a" if ab["margin"] > 0 else "b") and ba["winner"] != ab["winner"]
    p = judge_model.preference(judge, tokenizer, row["prompt"], row["a"]["text"], row["b"]["text"])
    assert ab["p_a"] == pytest.approx(p, rel=8 * EPS32)
    ids = {k: judge_model.encode(tokenizer, row["prompt"], row[k]["text"], 96) for k in "ab"}
    by_ids = client.post("/v1/judge/compare", json={"a_ids": ids["a"], "b_ids": ids["b"]}).json()
    assert by_ids["margin"] == ab["margin"]


@pytest.mark.parametrize("path,body,param,message", [
    ("/v1/judge/score", {"prompt": "q"}, "candidates", "'candidates' must be a non-empty list"),
    ("/v1/judge/score", {"prompt": 3, "candidate": "x"}, "prompt", "'prompt' must be a string"),
    ("/v1/judge/score", {"prompt": "q", "candidates": ["x"] * 4}, "candidates",
     "4 candidates, over the limit of 3"),
    ("/v1/judge/score", {"input_ids": [[1] * 97]}, "input_ids[0]",
     "'input_ids[0]' has 97 tokens, over the judge's max_length 96"),
    ("/v1/judge/score", {"input_ids": [[1, 49152]]}, "input_ids[0]",
     "'input_ids[0]' holds ids outside the vocabulary [0, 49152): [49152]"),
    ("/v1/judge/compare", {"prompt": "q", "a": "x"}, "b", "'b' must be a string"),
    ("/v1/judge/compare", {"a_ids": [1, 2], "b_ids": []}, "b_ids",
     "'b_ids' must be a non-empty list of token ids"),
])
def test_bad_requests_get_400(client, path, body, param, message):
    r = client.post(path, json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(message)


def test_invalid_json_400_unknown_route_404(client):
    r = client.post("/v1/judge/score", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("invalid JSON")
    assert client.post("/v1/judge/rank", json={}).status_code == 404


def test_auth_401(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        r = c.get("/health")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        r = c.post("/v1/judge/compare", json={"prompt": "q", "a": "x", "b": "y"},
                   headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_body_over_the_limit_413(client):
    r = client.post("/v1/judge/score", json={"prompt": "q", "candidate": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_port_in_use_is_a_clear_error(judge, tokenizer, tmp_path):
    folder = judge_model.save(tmp_path / "judge", judge, tiny_judge(seed=2)[1], tokenizer)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "arbiter.judge.serve", "--judge", str(folder),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in r.stderr
