"""An OpenAI-compatible server over one engine:

    mlx_student.serve --model runs/pilot [--port 8080] [--draft-model PATH]
    MLX_STUDENT_API_KEY=secret mlx_student.serve --model runs/pilot      # require a bearer token

POST /v1/chat/completions (streaming as SSE or not; `tools` + `tool_choice`; `response_format`
json_schema / json_object; `logprobs` + `top_logprobs`; `stream_options.include_usage`),
POST /v1/completions (a prompt string or token ids), GET /v1/models, GET /health. Binds
127.0.0.1 unless told otherwise. The request contract (every parameter checked, unknown ones
refused by name) is runtime/openai_api.py; messages go through mlx_student.messages.

Every connection gets an answer, and every failure is an OpenAI-shaped JSON error
{"error": {"message", "type", "param", "code"}}: 400 for a bad request (naming the parameter),
401, 404, 411, 413, 503 with `Retry-After` when the bounded queue is full (`max_queue`
requests admitted, generating or waiting) or a request waited longer than `queue_timeout`,
500 for a failure of the server itself (logged with its traceback). A stream that fails after
its headers ends with an SSE `data: {"error": ...}` event (the openai client raises it).
Limits: request body bytes (413), max_tokens (400 above the server's limit), wall-clock time
of generation per request (finish_reason "length" when hit).

Constrained output (tools, response_format) is validated against its schema with jsonschema
before it is reported finished: a document that fails is never `finish_reason: "stop"`, but a
500 `invalid_constrained_output` error (in a stream: the error event instead of the finish
chunk). A document cut by max_tokens or the time limit is `finish_reason: "length"`.

Tool calls: with `tools` and tool_choice other than "none" the reply is constrained to one call
{"name", "arguments"} of the offered tools (tool_choice "auto" is treated as "required": a small
student is asked to call, not to decide whether to), returned as message.tool_calls with
finish_reason "tool_calls". Generation is serialized (one request at a time; MLX state is not
shared across threads); the HTTP layer is the standard library's, as in mlx_lm.server.
"""

import argparse
import hmac
import json
import math
import os
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from jinja2 import TemplateError
from mlx_lm.sample_utils import make_logits_processors

from mlx_student.config import ConfigError

from .constrained import GrammarError, engine_vocab, json_schema_processor, schema_errors
from .generate import MLXEngine, chat_prompt, encode_prompt, stream
from .openai_api import RequestError, chat_logprobs, completion_logprobs, parse_chat, parse_completion

DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8080,
    "max_tokens_limit": 2048,  # a request asking for more gets 400
    "default_max_tokens": 256,
    "max_request_bytes": 1_000_000,
    "time_limit": 120.0,  # seconds of generation per request
    "num_draft_tokens": 3,
    "max_queue": 64,  # requests admitted at once (1 generating, the rest waiting); more: 503
    "queue_timeout": 300.0,  # seconds a request may wait for its turn; longer: 503
}
CHAT_ROUTES = ("/v1/chat/completions", "/chat/completions")
COMPLETION_ROUTES = ("/v1/completions", "/completions")


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: connections wait for accept, not reset

    def __init__(self, engine, cfg: dict, api_key=None, draft=None, model_name=None):
        self.engine, self.cfg, self.api_key, self.draft = engine, {**DEFAULTS, **cfg}, api_key, draft
        self.model_name = model_name or os.path.basename(str(getattr(engine, "path", "") or "model"))
        self.n_vocab = engine_vocab(engine) or len(getattr(engine.tokenizer, "_tokenizer", engine.tokenizer))
        self.lock = threading.Lock()  # one generation at a time
        self.state = threading.Lock()
        self.pending = 0  # admitted requests, generating or waiting
        self.seconds_per_request = 1.0  # moving average of generation time, for Retry-After
        super().__init__((self.cfg["host"], self.cfg["port"]), Handler)

    @contextmanager
    def turn(self):
        """Admit one request to the bounded queue and hold the engine for it; RequestError 503
        (with a Retry-After estimate) when the queue is full or the wait too long."""
        with self.state:
            if self.pending >= self.cfg["max_queue"]:
                raise self._busy(f"the server is busy ({self.pending} requests queued)")
            self.pending += 1
        try:
            if not self.lock.acquire(timeout=self.cfg["queue_timeout"]):
                raise self._busy(f"waited {self.cfg['queue_timeout']:.0f} s for a turn")
            try:
                tic = time.perf_counter()
                yield
            finally:
                self.seconds_per_request += 0.2 * (time.perf_counter() - tic - self.seconds_per_request)
                self.lock.release()
        finally:
            with self.state:
                self.pending -= 1

    def _busy(self, why):
        e = RequestError(503, f"{why}; retry later", code="server_overloaded", kind="server_error")
        e.retry_after = max(1, math.ceil(self.seconds_per_request * self.pending))
        return e


class OutputError(Exception):
    """Constrained output that does not meet its schema (the grammar engine failed)."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # a garbled request line still gets a status line
    timeout = 120  # seconds a socket may stall (a body that never comes, an idle keep-alive)
    server: ChatServer

    def log_message(self, fmt, *args):  # quiet; one line per request at most
        if os.environ.get("MLX_STUDENT_SERVE_LOG"):
            super().log_message(fmt, *args)

    def _json(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.sent_headers = True
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError):
        headers = [("WWW-Authenticate", "Bearer")] if e.status == 401 else []
        if getattr(e, "retry_after", None):
            headers.append(("Retry-After", str(e.retry_after)))
        if e.status in (408, 411, 413) or (self.command == "POST" and not self.body_read):
            # a refused body left unread would be parsed as the next request: close instead
            headers.append(("Connection", "close"))
            self.close_connection = True
        self._json(e.status, _error_body(e), headers)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a malformed request line, an unsupported
        method, headers too long) as JSON errors too."""
        self.close_connection = True
        try:
            self._json(code, {"error": {"message": message or HTTPStatus(code).phrase,
                                        "type": "invalid_request_error", "param": None, "code": None}},
                       [("Connection", "close")])
        except OSError:
            pass

    def _authorize(self):
        if self.server.api_key is None:
            return
        got = self.headers.get("Authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.server.api_key.encode())):
            raise RequestError(401, "missing or wrong bearer token", code="invalid_api_key",
                               kind="authentication_error")

    def _guarded(self, work):
        """Run `work`, answering every failure: RequestError as itself, anything else as a 500
        (or, once a stream has begun, an SSE error event); the traceback goes to stderr."""
        self.sent_headers = self.body_read = False
        try:
            work()
        except RequestError as e:
            if not self.sent_headers:
                self._error(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away or stalled
        except Exception as e:  # noqa: BLE001  (the server's own failure: answer, log, go on)
            print(f"mlx_student.serve: {self.command} {self.path} failed:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)
            error = RequestError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error",
                                 code="invalid_constrained_output" if isinstance(e, (OutputError, GrammarError)) else None)
            try:
                if not self.sent_headers:
                    self._error(error)
                else:
                    self.wfile.write(f"data: {json.dumps(_error_body(error))}\n\ndata: [DONE]\n\n".encode())
                    self.close_connection = True
            except OSError:
                self.close_connection = True

    def do_GET(self):
        self._guarded(self._get)

    def _get(self):
        self._authorize()
        if self.path == "/health":
            return self._json(200, {"status": "ok"})
        if self.path in ("/v1/models", "/models"):
            return self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "owned_by": "mlx-student"}]})
        raise RequestError(404, f"no route {self.path}", kind="not_found_error")

    def _read_body(self) -> dict:
        """The request body as a JSON object. Raises RequestError: 411 without a
        Content-Length, 413 over cfg["max_request_bytes"] (left unread: the connection closes),
        400 for invalid JSON or a body that is not an object."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "Content-Length required")
        if int(length) > self.server.cfg["max_request_bytes"]:
            raise RequestError(413, f"request body over {self.server.cfg['max_request_bytes']} bytes",
                               code="request_too_large")
        try:
            raw = self.rfile.read(int(length))
            self.body_read = True
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"invalid JSON: {e}")
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def do_POST(self):
        self._guarded(self._post)

    def _post(self):
        self._authorize()
        if self.path not in CHAT_ROUTES + COMPLETION_ROUTES:
            raise RequestError(404, f"no route {self.path}", kind="not_found_error")
        body = self._read_body()
        chat = self.path in CHAT_ROUTES
        request = (parse_chat if chat else parse_completion)(body, self.server.cfg, self.server.n_vocab)
        engine = self.server.engine
        processors = make_logits_processors(**request.processor_args)
        try:
            if chat:
                prompt = chat_prompt(engine.tokenizer, request.messages, request.tools)
            else:
                prompt = encode_prompt(engine.tokenizer, request.prompt)
        except (ValueError, TemplateError) as e:  # e.g. a template that wants alternating roles
            raise RequestError(400, f"the model's chat template refused the messages: {e}", "messages")
        try:
            if request.schema is not None:
                processors.append(json_schema_processor(engine.tokenizer, request.schema, self.server.n_vocab))
        except ValueError as e:
            raise RequestError(400, str(e), "response_format" if request.mode == "json" else "tools")
        params = request.params
        draft = self.server.draft if not processors and params.temperature == 0 else None

        def steps():
            return stream(engine, prompt, params, processors or None, draft=draft)

        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.server.model_name}
        with self.server.turn():
            if request.stream:
                self._stream(request, steps, head, chat)
            else:
                self._whole(request, steps, head, chat)

    def _whole(self, request, steps, head, chat):
        text, entries, last = "", [], None
        for last in steps():
            text += last.text
            entries += last.logprobs
        finish = _checked_finish(text, request, last.finish_reason)
        tokenizer = self.server.engine.tokenizer
        if chat:
            choice = {"index": 0, "message": _message(text, request.mode, finish), "finish_reason": finish,
                      "logprobs": chat_logprobs(tokenizer, entries) if request.params.logprobs else None}
            if choice["message"].get("tool_calls"):
                choice["finish_reason"] = "tool_calls"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish,
                      "logprobs": completion_logprobs(tokenizer, entries) if request.params.logprobs else None}
        self._json(200, {**head, "object": "chat.completion" if chat else "text_completion",
                         "choices": [choice], "usage": _usage(last)})

    def _stream(self, request, steps, head, chat):
        self.send_response(200)
        self.sent_headers = True
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        tokenizer, logprobs = self.server.engine.tokenizer, request.params.logprobs
        kind = "chat.completion.chunk" if chat else "text_completion"

        def send(payload, choices=True):
            chunk = {**head, "object": kind, **({"choices": [{"index": 0, **payload}]} if choices else payload)}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        def piece(text, entries, finish=None):
            if chat:
                delta = {"content": text} if text else {}
                send({"delta": delta, "finish_reason": finish,
                      "logprobs": chat_logprobs(tokenizer, entries) if logprobs else None})
            else:
                send({"text": text, "finish_reason": finish,
                      "logprobs": completion_logprobs(tokenizer, entries, offset) if logprobs else None})

        if chat:
            send({"delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None})
        text, offset, held = "", 0, []  # held: tool mode's logprobs, sent with the call
        for r in steps():
            text += r.text
            if request.mode == "tool":
                held += r.logprobs
            if r.finish_reason:
                break
            if request.mode != "tool" and (r.text or r.logprobs):
                piece(r.text, r.logprobs)
                offset += len(r.text)
        finish = _checked_finish(text, request, r.finish_reason)
        if request.mode == "tool":
            message = _message(text, request.mode, finish)
            if message.get("tool_calls"):
                calls = [{"index": 0, **c} for c in message["tool_calls"]]
                send({"delta": {"tool_calls": calls}, "finish_reason": None,
                      "logprobs": chat_logprobs(tokenizer, held) if logprobs else None})
                piece("", [], "tool_calls")
            else:
                piece(text, held, finish)
        else:
            piece(r.text, r.logprobs, finish)
        if request.include_usage:
            send({"choices": [], "usage": _usage(r)}, choices=False)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _usage(last):
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
            "total_tokens": last.prompt_tokens + last.generation_tokens}


def _error_body(e: RequestError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def _checked_finish(text, request, finish):
    """The finish reason of a finished generation; constrained output that claims to be done
    ("stop") must be a document valid under its schema, else OutputError."""
    if request.schema is None or finish != "stop":
        return finish
    problem = schema_errors(text, request.schema)
    if problem:
        raise OutputError(f"the constrained output does not match the requested schema ({problem}); "
                          f"output: {text[:200]!r}")
    return finish


def _message(text, mode, finish):
    if mode == "tool" and finish == "stop":  # valid: _checked_finish has seen it
        call = json.loads(text)
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}
    return {"role": "assistant", "content": text}  # text, or a call cut by max_tokens / time


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.serve",
        description="OpenAI-compatible server for a student: /v1/chat/completions, /v1/completions, "
                    "/v1/models, /health. Requests beyond --max-queue get 503 with Retry-After.")
    p.add_argument("--model", required=True, help="mlx-lm model folder (a student checkpoint, with config.json)")
    p.add_argument("--draft-model", help="drafter folder for speculative decoding (greedy requests)")
    p.add_argument("--host", default=DEFAULTS["host"], help="address to listen on; 0.0.0.0 "
                   "for every interface (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULTS["port"],
                   help="TCP port, 0-65535; 0 picks a free one (default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULTS["max_tokens_limit"],
                   help="largest max_tokens a request may ask for (more: 400) (default: %(default)s)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULTS["default_max_tokens"],
                   help="max_tokens of a request that gives none (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULTS["max_request_bytes"],
                   help="largest request body; larger: 413 (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=DEFAULTS["time_limit"],
                   help="seconds of generation per request (then finish_reason 'length') "
                   "(default: %(default)s)")
    p.add_argument("--num-draft-tokens", type=int, default=DEFAULTS["num_draft_tokens"],
                   help="tokens the --draft-model proposes per target pass (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"],
                   help="requests admitted at once, generating or waiting; more get 503 + "
                   "Retry-After (default: %(default)s)")
    p.add_argument("--queue-timeout", type=float, default=DEFAULTS["queue_timeout"],
                   help="seconds a request may wait for its turn (then 503 + Retry-After) "
                   "(default: %(default)s)")
    p.add_argument("--api-key-env", default="MLX_STUDENT_API_KEY",
                   help="environment variable holding the bearer token (unset: no auth)")
    return p


def _load(parser, flag, path):
    """An engine from a model folder, or a clear message naming the folder (exit 2)."""
    folder = Path(path)
    if not folder.is_dir():
        parser.error(f"{flag} {path}: no such folder")
    if not (folder / "config.json").is_file():
        parser.error(f"{flag} {path}: no config.json in the folder (an mlx-lm model folder has "
                     "config.json, weights *.safetensors and tokenizer files)")
    try:
        return MLXEngine.load(folder)
    except ConfigError as e:  # hf_config: a config.json refused, naming the file and key
        parser.error(f"{flag} {path}: {e}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"{flag} {path}: cannot load the model: {type(e).__name__}: {e}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("max_tokens_limit", "default_max_tokens", "max_request_bytes", "max_queue",
                 "num_draft_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("time_limit", "queue_timeout"):
        if not getattr(args, flag) > 0:  # NaN too
            parser.error(f"--{flag.replace('_', '-')} must be a number of seconds > 0, got "
                         f"{getattr(args, flag)}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0-65535, got {args.port}")
    engine = _load(parser, "--model", args.model)
    draft = _load(parser, "--draft-model", args.draft_model) if args.draft_model else None
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    try:
        server = ChatServer(engine, cfg, api_key=os.environ.get(args.api_key_env) or None, draft=draft)
    except OSError as e:
        parser.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    host, port = server.server_address[:2]
    print(f"serving {args.model} on http://{host}:{port}/v1 (chat/completions, completions; "
          f"auth {'on' if server.api_key else 'off'}; queue {server.cfg['max_queue']})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
