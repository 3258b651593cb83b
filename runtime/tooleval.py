"""Tool-use evaluation: multi-turn episodes of held-out tool traces against a model, replayed by
the tool broker, with and without constrained decoding.

    mlx_student.tooleval --model runs/worker --data data/tools/test.jsonl --out runs/worker/tooleval
    mlx_student.tooleval --package artifacts/w/model.mlpackage --model runs/worker --data ...  # CoreML
    mlx_student.tooleval --endpoint http://127.0.0.1:8080/v1 --model-name default --data ...  # any API

An episode starts from a trace's messages before its first assistant turn (the system tools note
and the user's request, as mlx_student.tools.traces writes them). The model replies; a reply that
starts with `{` is a call attempt, parsed as the wire form `{"name": ..., "arguments": {...}}`
(runtime/server.py's); the item's broker (its recorded fixtures) answers a valid call, a miss or
an invalid call comes back as an `{"error": ...}` tool result, and the model goes on until it
answers in text or has made `len(expected_calls) + extra_calls` calls. Greedy decoding: the same
model and data give the same report.

Constrained decoding (`--constrained on`): every reply follows the grammar `call | answer`: either
one JSON call valid under the offered tools' schemas (llguidance, runtime/constrained.py) or text
that does not start with `{`, so the model still decides whether to call. `--tool-choice required`
forces the first reply to be a call. An endpoint gets the tools natively (`tools`, `tool_choice`)
when constrained and a plain chat request (the tools note only) when not.

Metrics, per mode (their names in report.json):
* json_valid: call attempts that parse as a call object / call attempts; schema_valid: of those,
  the share whose arguments satisfy the offered tool's JSON Schema.
* tool_select: expected calls (non-control items) whose position in the episode holds a call
  of the expected name; first_call_select: items whose first call names the first expected tool.
* arg_match: BFCL's AST check of the call at that position: the name, every required parameter
  present, no parameter outside the schema, each value of the schema's type (an integer passes
  for a number), and the same keys and values as the expected call (strings compared stripped
  and case-folded, numbers by value, lists in order).
* integration_f1: of the final answer against the item's facts: recall = facts found in the
  answer; precision = the answer's values (words with a digit, `.`, `_` or `/`: numbers, dates,
  paths, urls, snake_case names) found in the conversation (user turn and tool results).
* irrelevance: controls (no tool should be called) where the model made no call attempt (not
  measured constrained with tool_choice required).
Writes <out>/report.json, report.md and episodes.jsonl (every turn), all in one atomic swap.
"""

import argparse
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mlx_student.config import ConfigError, apply_config
from mlx_student.files import atomic_dir
from mlx_student.tools.broker import Broker, BrokerMiss
from mlx_student.tools.registry import call_text, schema_errors
from mlx_student.tools.traces import TOOLS_NOTE, call_message, tool_message
from tqdm import tqdm

from .constrained import (GrammarProcessor, compile_schema, engine_vocab, ll_tokenizer,
                          tool_call_schema)
from .generate import GenerationParams, chat_prompt, generate

MODES = {"off": (False,), "on": (True,), "both": (False, True)}
CONFIG_DEFAULTS = {
    "data": "data/tools/test.jsonl",
    "fixtures": None,
    "out": "runs/tooleval",
    "model": None,
    "package": None,
    "endpoint": None,
    "model_name": "default",
    "api_key_env": "OPENAI_API_KEY",
    "constrained": "both",
    "tool_choice": "auto",
    "max_tokens": 192,
    "extra_calls": 1,
    "limit": None,
    "timeout": 120.0,
}


# ---------------------------------------------------------------------------- runners

def _answer_or_call(tools) -> str:
    """llguidance lark grammar: one schema-valid call, or text not starting with `{`."""
    schema = {**tool_call_schema(tools), "x-guidance": {"whitespace_flexible": False}}
    return f"start: call | answer\ncall: %json {json.dumps(schema)}\nanswer: /[^{{\\s](?s:.)*/\n"


class EngineRunner:
    """Replies from an engine of runtime.generate (MLXEngine, CoreMLEngine), greedy."""

    def __init__(self, engine, max_tokens):
        self.engine, self.max_tokens = engine, max_tokens
        self.n_vocab = engine_vocab(engine) or len(getattr(engine.tokenizer, "_tokenizer", engine.tokenizer))
        self._grammars = {}

    def _processor(self, tools, must_call):
        from llguidance import LLMatcher

        key = (json.dumps(tools, sort_keys=True), must_call)
        if key not in self._grammars:
            self._grammars[key] = (compile_schema(tool_call_schema(tools)) if must_call
                                   else LLMatcher.grammar_from_lark(_answer_or_call(tools)))
        ll = ll_tokenizer(self.engine.tokenizer, self.n_vocab)
        return GrammarProcessor(ll, self._grammars[key], self.n_vocab)

    def reply(self, messages, tools, constrained, must_call) -> str:
        noted = messages[0]["role"] == "system" and messages[0]["content"].startswith(TOOLS_NOTE)
        prompt = chat_prompt(self.engine.tokenizer, messages, None if noted else tools)
        processors = [self._processor(tools, must_call)] if constrained else None
        params = GenerationParams(max_tokens=self.max_tokens, temperature=0.0)
        return generate(self.engine, prompt, params, logits_processors=processors).text


class EndpointRunner:
    """Replies from an OpenAI-compatible /chat/completions endpoint (temperature 0, seed 0)."""

    def __init__(self, base_url, model_name, max_tokens, api_key=None, timeout=120.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.model_name, self.max_tokens = model_name, max_tokens

    @staticmethod
    def _api_messages(messages):
        """The conversation in the OpenAI form: each call gets an id its tool result names."""
        out, last = [], None
        for i, m in enumerate(messages):
            m = dict(m)
            if m.get("tool_calls"):
                last = f"call_{i}"
                m["tool_calls"] = [{"id": last, **c} for c in m["tool_calls"]]
            elif m["role"] == "tool" and last:
                m["tool_call_id"] = last
            out.append(m)
        return out

    def reply(self, messages, tools, constrained, must_call) -> str:
        body = {"model": self.model_name, "messages": self._api_messages(messages),
                "max_tokens": self.max_tokens, "temperature": 0.0, "seed": 0}
        if constrained:
            body.update(tools=tools, tool_choice="required" if must_call else "auto")
        r = self.client.post("/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{self.client.base_url}: HTTP {r.status_code}: {r.text[:300]}")
        message = r.json()["choices"][0]["message"]
        for call in message.get("tool_calls") or []:  # the first call, in the wire form
            fn = call.get("function", {})
            raw = fn.get("arguments")
            try:
                return call_text(fn.get("name"), json.loads(raw) if isinstance(raw, str) else raw)
            except (TypeError, ValueError):
                return f'{{"name": {json.dumps(fn.get("name"))}, "arguments": {raw}}}'
        return message.get("content") or ""


# ---------------------------------------------------------------------------- scoring

def parse_reply(text):
    """('answer', None) for text, ('call', (name, arguments)) for a valid call, ('invalid', None)
    for a call attempt (starts with `{`) that is not a JSON object {"name": str, "arguments": {}}."""
    s = text.strip()
    if not s.startswith("{"):
        return "answer", None
    try:
        obj = json.loads(s)
    except ValueError:
        return "invalid", None
    if (isinstance(obj, dict) and isinstance(obj.get("name"), str)
            and isinstance(obj.get("arguments"), dict)):
        return "call", (obj["name"], obj["arguments"])
    return "invalid", None


_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "array": (list,), "object": (dict,), "null": (type(None),)}


def _type_ok(value, schema) -> bool:
    kinds = schema.get("type")
    if kinds is None:
        return True
    kinds = [kinds] if isinstance(kinds, str) else kinds
    for kind in kinds:
        ok = isinstance(value, _TYPES.get(kind, object))
        if ok and isinstance(value, bool) and kind != "boolean":
            ok = False
        if ok and kind == "integer" and isinstance(value, float):
            ok = value.is_integer()
        if ok and kind == "array":
            ok = all(_type_ok(v, schema.get("items", {})) for v in value)
        if ok and kind == "object":
            props = schema.get("properties", {})
            ok = all(_type_ok(v, props.get(k, {})) for k, v in value.items())
        if ok:
            return True
    return False


def _same(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().casefold() == b.strip().casefold()
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def ast_match(name, arguments, expected, tools) -> Optional[str]:
    """BFCL-style AST check of one call against the expected one: None if it matches, else the
    first reason it does not, as "<kind>: <detail>"."""
    if name != expected["name"]:
        return f"name: {name!r} instead of {expected['name']!r}"
    offered = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    schema = offered.get(name, {})
    props = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in arguments:
            return f"missing required: {key!r}"
    for key, value in arguments.items():
        if key not in props:
            return f"unknown parameter: {key!r}"
        if not _type_ok(value, props[key]):
            return f"wrong type: {key!r}"
    want = expected["arguments"]
    for key in sorted(set(want) | set(arguments)):
        if key not in arguments:
            return f"missing optional: {key!r}"
        if key not in want:
            return f"unexpected optional: {key!r}"
        if not _same(arguments[key], want[key]):
            got, exp = json.dumps(arguments[key])[:60], json.dumps(want[key])[:60]
            return f"value: {key!r} is {got} instead of {exp}"
    return None


_WORD = re.compile(r"\w[\w.:/-]*\w|\w")  # words with their inner . : / - (paths, urls, dates)


def integration_f1(answer, facts, context):
    """(precision, recall, f1) of an answer: recall over `facts` found in it, precision over
    its values found in `context` (the user turn and the tool results); see the module doc."""
    norm = " ".join(answer.split()).casefold()
    recall = sum(" ".join(f.split()).casefold() in norm for f in facts) / len(facts)
    values = [w for w in _WORD.findall(answer) if re.search(r"[\d._/]", w)]
    ctx = context.casefold()
    precision = sum(v.casefold() in ctx for v in values) / len(values) if values else float(recall > 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# ---------------------------------------------------------------------------- episodes

@dataclass
class Episode:
    id: str
    constrained: bool
    turns: list = field(default_factory=list)  # {"text", "kind", "call", "schema_errors", "result"}
    answer: Optional[str] = None
    misses: int = 0


def run_episode(runner, record, broker, constrained, tool_choice="auto", extra_calls=1) -> Episode:
    """One multi-turn episode (see the module docstring)."""
    tools, meta = record["tools"], record["meta"]
    first = next(i for i, m in enumerate(record["messages"]) if m["role"] == "assistant")
    messages = list(record["messages"][:first])
    budget = len(meta["expected_calls"]) + extra_calls
    ep = Episode(record["id"], constrained)
    while True:
        must_call = constrained and tool_choice == "required" and not ep.turns
        text = runner.reply(messages, tools, constrained, must_call)
        kind, call = parse_reply(text)
        turn = {"text": text, "kind": kind}
        ep.turns.append(turn)
        if kind == "answer":
            ep.answer = text
            return ep
        if call is None:
            result = {"error": "the call is not a JSON object {\"name\": ..., \"arguments\": {...}}"}
            messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": json.dumps(result)}]
        else:
            name, arguments = call
            turn.update(call={"name": name, "arguments": arguments},
                        schema_errors=schema_errors(name, arguments, tools))
            try:
                result = broker.call(name, arguments)
            except BrokerMiss as e:
                ep.misses += 1
                result = {"error": str(e)}
            messages += [call_message(name, arguments), tool_message(name, result)]
        turn["result"] = result
        if len(ep.turns) >= budget:
            return ep


def _rate(num, den):
    return num / den if den else None


def score(episodes, records) -> dict:
    """The metrics of one mode's episodes (see the module docstring)."""
    by_id = {r["id"]: r for r in records}
    c = Counter()
    f1s, reasons = [], Counter()
    for ep in episodes:
        rec = by_id[ep.id]
        meta = rec["meta"]
        attempts = [t for t in ep.turns if t["kind"] != "answer"]
        calls = [t["call"] for t in attempts if t.get("call")]
        c["attempts"] += len(attempts)
        c["valid"] += len(calls)
        c["schema_valid"] += sum(not t["schema_errors"] for t in attempts if t.get("call"))
        c["misses"] += ep.misses
        if meta["control"]:
            c["controls"] += 1
            c["irrelevance"] += not attempts
            continue
        expected = meta["expected_calls"]
        made = [t.get("call") for t in attempts]  # None where the attempt was invalid
        c["items"] += 1
        c["first_select"] += bool(made and made[0] and expected and made[0]["name"] == expected[0]["name"])
        for i, want in enumerate(expected):
            got = made[i] if i < len(made) else None
            c["expected"] += 1
            if got is None:
                reasons["no call" if i >= len(made) else "invalid JSON"] += 1
                continue
            c["select"] += got["name"] == want["name"]
            why = ast_match(got["name"], got["arguments"], want, rec["tools"])
            c["arg_match"] += why is None
            if why:
                reasons[why.split(":")[0]] += 1
        if meta["facts"]:
            context = "\n".join(m["content"] for m in rec["messages"] if m["role"] == "user")
            context += "\n" + "\n".join(json.dumps(t.get("result", ""), ensure_ascii=False) for t in ep.turns)
            f1s.append(integration_f1(ep.answer, meta["facts"], context)[2] if ep.answer else 0.0)
    return {
        "episodes": len(episodes), "call_attempts": c["attempts"],
        "json_valid": _rate(c["valid"], c["attempts"]),
        "schema_valid": _rate(c["schema_valid"], c["attempts"]),
        "tool_select": _rate(c["select"], c["expected"]),
        "first_call_select": _rate(c["first_select"], c["items"]),
        "arg_match": _rate(c["arg_match"], c["expected"]),
        "integration_f1": _rate(sum(f1s), len(f1s)),
        "irrelevance": _rate(c["irrelevance"], c["controls"]),
        "expected_calls": c["expected"], "controls": c["controls"], "broker_misses": c["misses"],
        "arg_failures": dict(reasons.most_common()),
    }


def evaluate(runner, records, fixtures=None, modes=(False, True), tool_choice="auto", extra_calls=1,
             progress=True):
    """Run every record in every mode. Returns (report metrics by mode, episodes by mode)."""
    metrics, episodes = {}, {}
    for constrained in modes:
        name = "constrained" if constrained else "unconstrained"
        eps = []
        for rec in tqdm(records, desc=f"tooleval {name}", disable=not progress):
            fx = rec["meta"].get("fixtures")
            broker = Broker(fx if fx is not None else (fixtures or {}).get(rec["id"], {}))
            eps.append(run_episode(runner, rec, broker, constrained, tool_choice, extra_calls))
        metrics[name], episodes[name] = score(eps, records), eps
        if constrained and tool_choice == "required":
            metrics[name]["irrelevance"] = None  # every first reply was forced to be a call
    return metrics, episodes


# ---------------------------------------------------------------------------- report and CLI

ROWS = [("json_valid", "JSON validity (call attempts)"), ("schema_valid", "schema-valid calls"),
        ("tool_select", "tool selection"), ("first_call_select", "first-call selection"),
        ("arg_match", "argument match (AST)"), ("integration_f1", "integration F1"),
        ("irrelevance", "irrelevance detection (controls)"), ("call_attempts", "call attempts"),
        ("broker_misses", "broker misses")]


def markdown(report) -> str:
    modes = list(report["metrics"])
    lines = [f"# Tool-use evaluation: {report['runner']}", "",
             f"{report['items']} items from `{report['data']}` ({report['controls']} controls); "
             f"tool_choice {report['tool_choice']}, max_tokens {report['max_tokens']}, greedy.", "",
             "| metric | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for key, label in ROWS:
        vals = [report["metrics"][m][key] for m in modes]
        cells = ["n/a" if v is None else (f"{v:.1%}" if isinstance(v, float) else str(v)) for v in vals]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for m in modes:
        if report["metrics"][m]["arg_failures"]:
            lines += ["", f"Expected calls not matched ({m}): " + ", ".join(
                f"{k} x{v}" for k, v in report["metrics"][m]["arg_failures"].items())]
    return "\n".join(lines) + "\n"


def write_report(report, episodes, out):
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "report.md").write_text(markdown(report))
        with open(tmp / "episodes.jsonl", "w") as f:
            for mode, eps in episodes.items():
                for ep in eps:
                    f.write(json.dumps({"mode": mode, **ep.__dict__}, ensure_ascii=False) + "\n")


def load_records(path, limit=None):
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            for key in ("id", "messages", "tools", "meta"):
                if key not in rec:
                    raise ValueError(f"{path}:{lineno}: field {key!r}: missing (a tool trace record "
                                     "of mlx_student.toolgen is needed)")
            if not any(m["role"] == "assistant" for m in rec["messages"]):
                raise ValueError(f"{path}:{lineno}: field 'messages': no assistant turn")
            records.append(rec)
            if limit and len(records) == limit:
                break
    return records


def build_parser():
    p = argparse.ArgumentParser(
        description="Tool-use eval: multi-turn episodes of held-out tool traces against a model "
        "(MLX folder, CoreML package or OpenAI-compatible endpoint), broker-replayed results, "
        "constrained decoding on and off. Flags override the --config file's keys.",
        epilog=f"defaults: {json.dumps(CONFIG_DEFAULTS)}")
    add = p.add_argument
    add("--config", help="YAML with any of the keys in the defaults below")
    add("--data", help="jsonl of tool trace records (mlx_student.toolgen's test.jsonl)")
    add("--fixtures", help="fixtures.json {item id: {call key: result}} for records without meta.fixtures")
    add("--out", help="report folder: report.json, report.md, episodes.jsonl")
    add("--model", help="mlx-lm model folder (also the tokenizer of --package)")
    add("--package", help="exported .mlpackage: run it with the CoreML engine")
    add("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1")
    add("--model-name", help="model name sent to --endpoint")
    add("--api-key-env", help="environment variable with the endpoint's API key")
    add("--constrained", choices=list(MODES), help="constrained decoding off, on or both")
    add("--tool-choice", choices=["auto", "required"], help="constrained: may the first reply be text")
    add("--max-tokens", type=int, help="tokens per reply")
    add("--extra-calls", type=int, help="calls allowed beyond the expected ones")
    add("--limit", type=int, help="only the first N records")
    add("--timeout", type=float, help="seconds per endpoint request")
    return p


def make_runner(args):
    if args.endpoint:
        return EndpointRunner(args.endpoint, args.model_name, args.max_tokens,
                              os.environ.get(args.api_key_env), args.timeout), args.endpoint
    if not args.model:
        raise ConfigError("give --model (an MLX folder, or the tokenizer folder of --package) or --endpoint")
    if args.package:
        from .coreml_engine import CoreMLEngine

        return EngineRunner(CoreMLEngine.load(args.package, args.model), args.max_tokens), f"coreml {args.package}"
    from .generate import MLXEngine

    return EngineRunner(MLXEngine.load(args.model), args.max_tokens), f"mlx {args.model}"


def run(args):
    records = load_records(args.data, args.limit)
    fixtures = None
    path = Path(args.fixtures) if args.fixtures else Path(args.data).parent / "fixtures.json"
    if path.is_file():
        fixtures = json.loads(path.read_text())
    runner, name = make_runner(args)
    metrics, episodes = evaluate(runner, records, fixtures, MODES[args.constrained], args.tool_choice,
                                 args.extra_calls)
    report = {"runner": name, "data": str(args.data), "items": len(records),
              "controls": sum(r["meta"]["control"] for r in records), "tool_choice": args.tool_choice,
              "max_tokens": args.max_tokens, "extra_calls": args.extra_calls, "metrics": metrics}
    write_report(report, episodes, args.out)
    print(markdown(report))
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        apply_config(args, CONFIG_DEFAULTS)
        run(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
