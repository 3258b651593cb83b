"""An OpenAI-compatible chat server over one engine:

    mlx_student.serve --model runs/pilot [--port 8080] [--draft-model PATH]
    MLX_STUDENT_API_KEY=secret mlx_student.serve --model runs/pilot      # require a bearer token

POST /v1/chat/completions (streaming as SSE or not; `tools` + `tool_choice`; `response_format`
json_schema / json_object), GET /v1/models, GET /health. Binds 127.0.0.1 unless told otherwise.
Limits: request body bytes (413), max_tokens (400 above the server's limit), wall-clock time per
request (finish_reason "length" when hit). Errors are OpenAI-shaped:
{"error": {"message", "type", "param", "code"}}.

Tool calls: with `tools` and tool_choice other than "none" the reply is constrained to one call
{"name", "arguments"} of the offered tools (tool_choice "auto" is treated as "required": a small
student is asked to call, not to decide whether to), returned as message.tool_calls with
finish_reason "tool_calls". Generation is serialized (one request at a time; MLX state is not
shared across threads); the HTTP layer is the standard library's, as in mlx_lm.server.
"""

import argparse
import hmac
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mlx_student.messages import MessageError, normalize_messages

from .constrained import engine_vocab, json_schema_processor, tool_call_schema
from .generate import GenerationParams, MLXEngine, chat_prompt, stream

DEFAULTS = {
    "host": "127.0.0.1",
    "port": 8080,
    "max_tokens_limit": 2048,  # a request asking for more gets 400
    "default_max_tokens": 256,
    "max_request_bytes": 1_000_000,
    "time_limit": 120.0,  # seconds of generation per request
    "num_draft_tokens": 3,
}


class RequestError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _number(body, key, default, lo, hi, cast=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (cast is int and int(v) != v):
        raise RequestError(400, f"'{key}' must be a {'integer' if cast is int else 'number'}", key)
    if not lo <= v <= hi:
        raise RequestError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return cast(v)


def parse_request(body: dict, cfg: dict):
    """Validate an OpenAI chat request. Returns (messages, tools, params, schema, mode, stream)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        messages = normalize_messages(body.get("messages"))
    except MessageError as e:
        raise RequestError(400, str(e), e.path)
    limit = cfg["max_tokens_limit"]
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, key, min(cfg["default_max_tokens"], limit), 1, limit, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, 0, 1 << 20, int),
        seed=_number(body, "seed", None, 0, 2**63 - 1, int),
        stop=stop, time_limit_s=cfg["time_limit"], num_draft_tokens=cfg["num_draft_tokens"])

    schema, mode = None, "text"
    tools = body.get("tools") or None
    choice = body.get("tool_choice", "auto")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RequestError(400, "'tools' must be a list of objects", "tools")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            tools = [t for t in tools if t.get("function", t).get("name") == name]
            if not tools:
                raise RequestError(400, f"tool_choice names an unknown tool {name!r}", "tool_choice")
        elif choice not in ("auto", "required", "none"):
            raise RequestError(400, "tool_choice must be none, auto, required or a function", "tool_choice")
        if choice != "none":
            try:
                schema, mode = tool_call_schema(tools), "tool"
            except (ValueError, AttributeError) as e:
                raise RequestError(400, f"bad tools: {e}", "tools")
    fmt = body.get("response_format")
    if fmt is not None and mode == "text":
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            js = fmt.get("json_schema") or {}
            if not isinstance(js.get("schema"), dict):
                raise RequestError(400, "response_format.json_schema.schema must be an object",
                                   "response_format")
            schema, mode = js["schema"], "json"
        elif kind == "json_object":
            schema, mode = {"type": "object"}, "json"
        elif kind != "text":
            raise RequestError(400, "response_format.type must be text, json_object or json_schema",
                               "response_format")
    stream_ = body.get("stream", False)
    if not isinstance(stream_, bool):
        raise RequestError(400, "'stream' must be a boolean", "stream")
    return messages, tools if mode == "tool" else None, params, schema, mode, stream_


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine, cfg: dict, api_key=None, draft=None, model_name=None):
        self.engine, self.cfg, self.api_key, self.draft = engine, {**DEFAULTS, **cfg}, api_key, draft
        self.model_name = model_name or os.path.basename(str(getattr(engine, "path", "") or "model"))
        self.lock = threading.Lock()
        super().__init__((self.cfg["host"], self.cfg["port"]), Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ChatServer

    def log_message(self, fmt, *args):  # quiet; one line per request at most
        if os.environ.get("MLX_STUDENT_SERVE_LOG"):
            super().log_message(fmt, *args)

    def _json(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError):
        headers = [("WWW-Authenticate", "Bearer")] if e.status == 401 else []
        if e.status in (411, 413):
            headers.append(("Connection", "close"))
            self.close_connection = True
        self._json(e.status, {"error": {"message": e.message, "type": e.kind, "param": e.param,
                                        "code": e.code}}, headers)

    def _authorize(self):
        if self.server.api_key is None:
            return
        got = self.headers.get("Authorization", "")
        if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.server.api_key.encode())):
            raise RequestError(401, "missing or wrong bearer token", code="invalid_api_key",
                               kind="authentication_error")

    def do_GET(self):
        try:
            self._authorize()
            if self.path == "/health":
                return self._json(200, {"status": "ok"})
            if self.path == "/v1/models":
                return self._json(200, {"object": "list", "data": [
                    {"id": self.server.model_name, "object": "model", "owned_by": "mlx-student"}]})
            raise RequestError(404, f"no route {self.path}", kind="not_found_error")
        except RequestError as e:
            self._error(e)

    def do_POST(self):
        try:
            self._authorize()
            if self.path not in ("/v1/chat/completions", "/chat/completions"):
                raise RequestError(404, f"no route {self.path}", kind="not_found_error")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise RequestError(411, "Content-Length required")
            if int(length) > self.server.cfg["max_request_bytes"]:
                raise RequestError(413, f"request body over {self.server.cfg['max_request_bytes']} bytes",
                                   code="request_too_large")
            try:
                body = json.loads(self.rfile.read(int(length)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"invalid JSON: {e}")
            request = parse_request(body, self.server.cfg)
            self._complete(*request)
        except RequestError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-stream

    def _complete(self, messages, tools, params, schema, mode, streaming):
        engine = self.server.engine
        try:
            prompt = chat_prompt(engine.tokenizer, messages, tools)
            processors = [json_schema_processor(engine.tokenizer, schema, engine_vocab(engine))] if schema else None
        except ValueError as e:
            raise RequestError(400, str(e), "response_format" if mode == "json" else "tools")
        draft = self.server.draft if processors is None and params.temperature == 0 else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": self.server.model_name}
        with self.server.lock:
            if not streaming:
                text, last = "", None
                for last in stream(engine, prompt, params, processors, draft=draft):
                    text += last.text
                message, finish = _message(text, mode, last.finish_reason)
                usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
                         "total_tokens": last.prompt_tokens + last.generation_tokens}
                return self._json(200, {**head, "object": "chat.completion", "choices": [
                    {"index": 0, "message": message, "finish_reason": finish}], "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def send(delta, finish=None):
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            send({"role": "assistant", "content": ""})
            text = ""
            for r in stream(engine, prompt, params, processors, draft=draft):
                text += r.text
                if mode != "tool" and r.text:
                    send({"content": r.text})
                if r.finish_reason:
                    message, finish = _message(text, mode, r.finish_reason)
                    if mode == "tool" and message.get("tool_calls"):
                        calls = [{"index": 0, **c} for c in message["tool_calls"]]
                        send({"tool_calls": calls})
                    elif mode == "tool":
                        send({"content": text})
                    send({}, finish)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()


def _message(text, mode, finish):
    if mode == "tool":
        try:
            call = json.loads(text)
            return {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}, "tool_calls"
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # cut by max_tokens or the time limit: hand back what there is
    return {"role": "assistant", "content": text}, finish


def build_parser():
    p = argparse.ArgumentParser(description="OpenAI-compatible chat server for a student.")
    p.add_argument("--model", required=True, help="mlx-lm model folder (a student checkpoint)")
    p.add_argument("--draft-model", help="drafter folder for speculative decoding (greedy requests)")
    p.add_argument("--host", default=DEFAULTS["host"])
    p.add_argument("--port", type=int, default=DEFAULTS["port"])
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULTS["max_tokens_limit"])
    p.add_argument("--default-max-tokens", type=int, default=DEFAULTS["default_max_tokens"])
    p.add_argument("--max-request-bytes", type=int, default=DEFAULTS["max_request_bytes"])
    p.add_argument("--time-limit", type=float, default=DEFAULTS["time_limit"])
    p.add_argument("--num-draft-tokens", type=int, default=DEFAULTS["num_draft_tokens"])
    p.add_argument("--api-key-env", default="MLX_STUDENT_API_KEY",
                   help="environment variable holding the bearer token (unset: no auth)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    engine = MLXEngine.load(args.model)
    draft = MLXEngine.load(args.draft_model) if args.draft_model else None
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    server = ChatServer(engine, cfg, api_key=os.environ.get(args.api_key_env) or None, draft=draft)
    host, port = server.server_address[:2]
    print(f"serving {args.model} on http://{host}:{port}/v1/chat/completions "
          f"(auth {'on' if server.api_key else 'off'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
