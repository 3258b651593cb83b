"""The judge as an HTTP service on the standard library's server (as runtime/server.py):

    mlx_student.judge_serve --judge runs/judge [--port 8090]
    MLX_STUDENT_API_KEY=secret mlx_student.judge_serve --judge runs/judge   # bearer token

GET /health -> {"status": "ok", "model", "clauses", "max_length"}

POST /v1/judge/score
  {"prompt": str, "candidates": [str, ...]}   (or "candidate": str), or pre-tokenized
  {"input_ids": [[int, ...], ...]}            (each the full judge input, eos last)
  -> {"scores": [float], "clauses": [{CLAUSE: P(satisfied)}], "tokens": [int], "latency_ms"}

POST /v1/judge/compare
  {"prompt": str, "a": str, "b": str}  or  {"a_ids": [int], "b_ids": [int]}
  -> {"p_a": P(a > b), "margin": s(a) - s(b), "winner": "a" | "b" | "tie", "scores": {a, b},
      "clauses": {"a": {...}, "b": {...}}, "tokens": {a, b}, "latency_ms"}
  winner is "tie" when |p_a - 0.5| <= --tie-band.

Binds 127.0.0.1 unless told otherwise. Limits: request body bytes (413), candidates per request
and token ids longer than the judge's max_length or outside its vocabulary (400), a missing or
wrong bearer token (401), a client that stalls mid-request for --time-limit seconds (the socket
is closed). Text inputs are cut to max_length by the judge's own template (arbiter/judge/model.py);
"tokens" says how many were read. Errors are {"error": {"message", "type", "param", "code"}}.
Scoring is serialized (MLX state is not shared across threads).
"""

import argparse
import os
import threading
import time
from http.server import ThreadingHTTPServer

import mlx_student  # noqa: F401  (first: picks OpenBLAS on Linux before mlx loads)
import mlx.core as mx
import numpy as np

from runtime.server import Handler, RequestError

from . import model as judge_model

DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8090,
    "max_request_bytes": 1_000_000,
    "max_candidates": 16,
    "tie_band": 0.0,
    "time_limit": 30.0,  # seconds a client may take to send its request
}


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, judge, tokenizer, cfg: dict, api_key=None, model_name="judge"):
        self.judge, self.tokenizer, self.api_key = judge, tokenizer, api_key
        self.cfg, self.model_name = {**DEFAULTS, **cfg}, model_name
        self.lock = threading.Lock()
        super().__init__((self.cfg["host"], self.cfg["port"]), JudgeHandler)


def _text(body, key):
    v = body.get(key)
    if not isinstance(v, str):
        raise RequestError(400, f"'{key}' must be a string", key)
    return v


def _ids(value, key, max_length, vocab):
    if not isinstance(value, list) or not value or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(400, f"'{key}' must be a non-empty list of token ids", key)
    if len(value) > max_length:
        raise RequestError(400, f"'{key}' has {len(value)} tokens, over the judge's max_length "
                           f"{max_length}", key, "too_many_tokens")
    bad = [t for t in value if not 0 <= t < vocab]
    if bad:
        raise RequestError(400, f"'{key}' holds ids outside the vocabulary [0, {vocab}): {bad[:3]}", key)
    return value


class JudgeHandler(Handler):
    server: JudgeServer

    def setup(self):
        self.timeout = self.server.cfg["time_limit"]  # socket timeout: a stalled client is cut
        super().setup()

    def do_GET(self):
        self._guarded(self._health)

    def _health(self):
        self._authorize()
        if self.path != "/health":
            raise RequestError(404, f"no route {self.path}", kind="not_found_error")
        spec = self.server.judge.spec
        self._json(200, {"status": "ok", "model": self.server.model_name,
                         "clauses": list(spec.clauses), "max_length": spec.max_length})

    def do_POST(self):
        self._guarded(self._route)

    def _route(self):
        self._authorize()
        route = {"/v1/judge/score": self._score, "/v1/judge/compare": self._compare}.get(self.path)
        if route is None:
            raise RequestError(404, f"no route {self.path}", kind="not_found_error")
        body = self._read_body()
        tic = time.perf_counter()
        out = route(body)
        out["latency_ms"] = round((time.perf_counter() - tic) * 1e3, 3)
        self._json(200, out)

    # --- the two routes ------------------------------------------------------------------
    def _encode(self, prompt, text):
        spec = self.server.judge.spec
        return judge_model.encode(self.server.tokenizer, prompt, text, spec.max_length, spec.separator)

    def _run(self, seqs):
        with self.server.lock:
            s, c = self.server.judge(*judge_model.batch_ids(seqs))
            s, c = np.array(s, dtype=np.float64), np.array(mx.sigmoid(c), dtype=np.float64)
        clauses = self.server.judge.spec.clauses
        return s, [{k: float(v) for k, v in zip(clauses, row)} for row in c]

    def _limits(self):
        judge = self.server.judge
        return judge.spec.max_length, judge.backbone.args.vocab_size

    def _score(self, body):
        if "input_ids" in body:
            rows = body["input_ids"]
            if not isinstance(rows, list) or not rows:
                raise RequestError(400, "'input_ids' must be a non-empty list of id lists", "input_ids")
            seqs = [_ids(r, f"input_ids[{i}]", *self._limits()) for i, r in enumerate(rows)]
        else:
            prompt = _text(body, "prompt")
            if "candidate" in body:
                texts = [_text(body, "candidate")]
            else:
                texts = body.get("candidates")
                if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                    raise RequestError(400, "'candidates' must be a non-empty list of strings "
                                       "(or give 'candidate' or 'input_ids')", "candidates")
            seqs = [self._encode(prompt, t) for t in texts]
        if len(seqs) > self.server.cfg["max_candidates"]:
            raise RequestError(400, f"{len(seqs)} candidates, over the limit of "
                               f"{self.server.cfg['max_candidates']}", "candidates")
        s, clauses = self._run(seqs)
        return {"scores": s.tolist(), "clauses": clauses, "tokens": [len(x) for x in seqs]}

    def _compare(self, body):
        if "a_ids" in body or "b_ids" in body:
            seqs = [_ids(body.get(k), k, *self._limits()) for k in ("a_ids", "b_ids")]
        else:
            prompt = _text(body, "prompt")
            seqs = [self._encode(prompt, _text(body, k)) for k in ("a", "b")]
        s, clauses = self._run(seqs)
        margin = float(s[0] - s[1])
        p = float(1 / (1 + np.exp(-margin)))
        band = self.server.cfg["tie_band"]
        winner = "tie" if abs(p - 0.5) <= band else ("a" if margin > 0 else "b")
        return {"p_a": p, "margin": margin, "winner": winner,
                "scores": {"a": float(s[0]), "b": float(s[1])},
                "clauses": {"a": clauses[0], "b": clauses[1]},
                "tokens": {"a": len(seqs[0]), "b": len(seqs[1])}}


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.judge_serve",
        description="Serve a pairwise judge: GET /health, POST "
        "/v1/judge/score, POST /v1/judge/compare (loopback by default).")
    p.add_argument("--judge", required=True, help="judge checkpoint folder (mlx_student.judge_train)")
    p.add_argument("--host", default=DEFAULTS["host"], help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=DEFAULTS["port"])
    p.add_argument("--max-request-bytes", type=int, default=DEFAULTS["max_request_bytes"],
                   help="larger bodies get 413")
    p.add_argument("--max-candidates", type=int, default=DEFAULTS["max_candidates"],
                   help="candidates per score request (more: 400)")
    p.add_argument("--tie-band", type=float, default=DEFAULTS["tie_band"],
                   help="compare answers 'tie' when |P(a > b) - 0.5| <= this (0: only an exact 0.5)")
    p.add_argument("--time-limit", type=float, default=DEFAULTS["time_limit"],
                   help="seconds a client may stall while sending a request")
    p.add_argument("--api-key-env", default="MLX_STUDENT_API_KEY",
                   help="environment variable holding the bearer token (unset: no auth)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        judge, tokenizer, _ = judge_model.load(args.judge)
    except judge_model.JudgeError as e:
        raise SystemExit(f"error: {e}")
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    try:
        server = JudgeServer(judge, tokenizer, cfg, api_key=os.environ.get(args.api_key_env) or None,
                             model_name=os.path.basename(os.path.normpath(args.judge)))
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = server.server_address[:2]
    print(f"judge {args.judge} on http://{host}:{port}/v1/judge/{{score,compare}} "
          f"(auth {'on' if server.api_key else 'off'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
