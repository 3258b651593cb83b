"""Where Claimify's stage outputs and entailment judgments come from: any model the project runs.

A backend answers `complete(messages, schema, n, temperature, task)` with `n` `Output`s:

* `EngineBackend`: an engine of runtime.generate (`MLXEngine` over any mlx-lm folder,
  `CoreMLEngine` over an exported package). With `constrained=True` every output is decoded
  under the stage's JSON Schema by llguidance (runtime/constrained.py), so it parses by
  construction. With `top_k > 0` it also returns, per completion token, the top-k of the
  distribution the tokens were sampled from (the model's, masked by the grammar): the KD
  record's `topk`.
* `EndpointBackend`: any OpenAI-compatible `/chat/completions` endpoint through the project's
  teacher client (mlx_student.teacher.http: concurrency, rate limit, retries with backoff);
  the schema goes as `response_format: {"type": "json_schema", ...}` (runtime/server.py and
  vLLM honour it).
* `ScriptedBackend`: answers from a function of `task` (the structured request the messages
  render: stage, sentence, claim, ...), e.g. the gold set's oracle. The routing, voting and
  verification logic runs unchanged over it.
"""

import asyncio
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from runtime.constrained import engine_vocab, json_schema_processor
from runtime.generate import GenerationParams, chat_prompt, generate


@dataclass
class Output:
    """One completion: the raw text (JSON when constrained), and for engine backends the
    generated token ids (end-of-turn excluded) with their top-k `[[id, logprob], ...]`."""

    text: str
    finish_reason: Optional[str] = "stop"
    usage: dict = field(default_factory=dict)
    completion_ids: Optional[list] = None
    topk: Optional[list] = None


def _finite_topk(logprobs: mx.array, k: int) -> list:
    """The k largest finite entries of a (V,) log-probability vector, sorted descending (ties
    by id); grammar-masked tokens (-inf) are left out, so a position may list fewer than k."""
    from mlx_student.teacher.local import topk_of

    allowed = int(mx.isfinite(logprobs).sum().item())
    return topk_of(logprobs, max(1, min(k, allowed)))


class EngineBackend:
    """Completions from an MLX or CoreML engine; `name` is recorded in KD records."""

    def __init__(self, engine, name: str, max_tokens: int = 256, constrained: bool = True, top_k: int = 0):
        self.engine, self.name, self.endpoint = engine, name, "local"
        self.max_tokens, self.constrained, self.top_k = max_tokens, constrained, top_k
        hf = getattr(engine.tokenizer, "_tokenizer", engine.tokenizer)
        self.n_vocab = engine_vocab(engine) or len(hf)

    def sampling(self, temperature: float) -> dict:
        return {"temperature": temperature, "max_tokens": self.max_tokens, "constrained": self.constrained,
                "top_k_stored": self.top_k}

    def _processor(self, schema):
        return json_schema_processor(self.engine.tokenizer, schema, self.n_vocab)

    def complete(self, messages, schema, n=1, temperature=0.0, task=None, seed=0) -> list:
        prompt = chat_prompt(self.engine.tokenizer, messages)
        outputs = []
        for i in range(n):
            processors = [self._processor(schema)] if self.constrained else None
            params = GenerationParams(max_tokens=self.max_tokens, temperature=temperature,
                                      seed=seed + i if temperature > 0 else None)
            r = generate(self.engine, prompt, params, logits_processors=processors)
            out = Output(r.text, r.finish_reason, {"prompt_tokens": r.prompt_tokens,
                                                    "completion_tokens": r.generation_tokens},
                         completion_ids=list(r.tokens))
            if self.top_k:
                out.topk = self.sampled_topk(prompt, out.completion_ids, schema)
            outputs.append(out)
        return outputs

    def sampled_topk(self, prompt: list, completion: list, schema) -> list:
        """Per completion token, the top-k of the distribution it was decoded from: the
        engine's next-token logits, step by step through its own cache (a CoreML engine gives
        the last position only), masked by a replay of the grammar (when constrained) exactly
        as during decoding, then log-softmax."""
        cache = self.engine.make_cache()
        logits = self.engine(mx.array(prompt)[None], cache=cache)
        processor = self._processor(schema) if self.constrained else None
        tokens, out = list(prompt), []
        for j, token in enumerate(completion):
            row = logits[0, -1].astype(mx.float32)
            if processor is not None:
                row = processor(mx.array(tokens), row[None])[0]
            out.append(_finite_topk(row - mx.logsumexp(row), self.top_k))
            tokens.append(token)
            if j + 1 < len(completion):
                logits = self.engine(mx.array([[token]]), cache=cache)
        return out


class EndpointBackend:
    """Completions from an OpenAI-compatible endpoint (mlx_student.teacher.http.HTTPTeacher).
    Text only: an API's ~5-20 alternatives are not aligned here, so KD records from an
    endpoint are sequence-level (no completion_ids / topk)."""

    def __init__(self, base_url: str, model: str, max_tokens: int = 256, constrained: bool = True,
                 api_key_env: Optional[str] = None, timeout: float = 120.0, max_retries: int = 6,
                 concurrency: int = 4):
        from mlx_student.teacher.http import HTTPTeacher, HTTPTeacherArgs

        self.teacher = HTTPTeacher(HTTPTeacherArgs(
            base_url=base_url, model=model, api_key_env=api_key_env, max_tokens=max_tokens,
            concurrency=concurrency, timeout=timeout, max_retries=max_retries))
        self.name, self.endpoint = model, self.teacher.endpoint
        self.max_tokens, self.constrained = max_tokens, constrained
        self.loop = asyncio.new_event_loop()

    def sampling(self, temperature: float) -> dict:
        return {"temperature": temperature, "max_tokens": self.max_tokens, "constrained": self.constrained}

    def complete(self, messages, schema, n=1, temperature=0.0, task=None, seed=0) -> list:
        def extra(i):
            body = {"temperature": temperature, "seed": seed + i}
            if self.constrained:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "output", "strict": True, "schema": schema}}
            return body

        async def many():
            return await asyncio.gather(*(self.teacher.complete(messages, extra=extra(i)) for i in range(n)))

        return [Output(c.text, c.finish_reason, c.usage) for c in self.loop.run_until_complete(many())]

    def close(self):
        self.loop.run_until_complete(self.teacher.aclose())
        self.loop.close()


class ScriptedBackend:
    """`respond(task, i) -> dict or str` answers the i-th completion of each request; dicts are
    serialised as JSON. `calls` keeps every task asked, in order."""

    def __init__(self, respond: Callable, name: str = "scripted"):
        self.respond, self.name, self.endpoint = respond, name, "scripted"
        self.calls = []

    def sampling(self, temperature: float) -> dict:
        return {"temperature": temperature}

    def complete(self, messages, schema, n=1, temperature=0.0, task=None, seed=0) -> list:
        self.calls.append(task)
        outs = []
        for i in range(n):
            answer = self.respond(task, i)
            outs.append(Output(answer if isinstance(answer, str) else json.dumps(answer)))
        return outs


BACKEND_DEFAULTS = {
    "model": None,  # an mlx-lm folder; None: the default teacher (prepared on first use)
    "package": None,
    "endpoint": None,
    "model_name": "default_model",
    "api_key_env": None,
    "max_tokens": 256,
    "constrained": "on",
    "timeout": 120.0,
    "max_retries": 6,
}


def add_backend_args(add):
    """The backend flags shared by mlx_student.claimify and mlx_student.claims_eval."""
    add("--model", help="mlx-lm model folder run by MLX (default: the default teacher, "
        "SmolLM2-135M-Instruct); with --package, the folder it was exported from (tokenizer)")
    add("--package", help="exported .mlpackage run by the CoreML engine (the MIL executor off macOS)")
    add("--endpoint", help="OpenAI-compatible base URL (e.g. one `mlx_student.serve` prints, ending /v1)")
    add("--model-name", help="model name sent to --endpoint")
    add("--api-key-env", help="environment variable holding --endpoint's API key")
    add("--max-tokens", type=int, help="tokens per stage output")
    add("--constrained", choices=["on", "off"], help="decode stage outputs under their JSON Schema")
    add("--timeout", type=float, help="seconds per endpoint request")
    add("--max-retries", type=int, help="endpoint retries (429, 5xx, timeouts) with backoff")


def make_backend(args, top_k: int = 0):
    """The backend the flags name: --endpoint, else --package (+ --model), else --model (or the
    default teacher) by MLX. Returns (backend, description)."""
    constrained = args.constrained == "on"
    if args.endpoint:
        backend = EndpointBackend(args.endpoint, args.model_name, args.max_tokens, constrained,
                                  args.api_key_env, args.timeout, args.max_retries)
        return backend, f"endpoint {args.endpoint} ({args.model_name})"
    from mlx_student.teacher import default as default_teacher

    model = args.model or str(default_teacher.prepare())
    if args.package:
        from runtime.coreml_engine import CoreMLEngine

        engine = CoreMLEngine.load(args.package, model)
        return EngineBackend(engine, str(args.package), args.max_tokens, constrained, top_k), f"coreml {args.package}"
    from runtime.generate import MLXEngine

    return EngineBackend(MLXEngine.load(model), model, args.max_tokens, constrained, top_k), f"mlx {model}"
