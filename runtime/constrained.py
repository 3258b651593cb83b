"""JSON-schema constrained decoding as an mlx-lm logits processor, over llguidance.

    processor = json_schema_processor(engine.tokenizer, schema)
    generate(engine, prompt, params, logits_processors=[processor])

llguidance compiles the schema to a token-level grammar; before every sampled token the
processor asks it for the bitmask of allowed next tokens and sets every other logit to -inf,
so any sampler (greedy, temperature, top-p/k) can only produce a prefix of a valid document,
and <|im_end|> (EOS) is allowed exactly when the document is complete.

Why llguidance over xgrammar (both measured on this tokenizer, vocab 49,152, 100 uniformly random
walks under each mask): llguidance produced 100/100 strictly
valid documents, xgrammar 0.2.8 97/100 (it lets raw control characters into strings, which
json.loads rejects); schema compile 6 ms vs 183 ms; mask fill per token about the same.

Defaults: no free whitespace between tokens (`whitespace_flexible: False`), as with xgrammar's
any_whitespace=False: with it, a weak model can wander in whitespace forever.

What is and is not enforced: llguidance itself refuses keywords it does not implement
(`not`, `if`/`then`, `uniqueItems`, `contains`, `propertyNames`, `dependentRequired`,
`unevaluatedProperties`, `oneOf` ...). `NOT_ENFORCED` lists the ones it accepts but that let
invalid documents through (issue 19: `patternProperties` with `additionalProperties: false`
ended generations in a state where only EOS was allowed, 4 of 8 seeds); `check_schema`
refuses those and invalid schemas up front, naming the keyword. The grammar is a guarantee
only as good as its engine, so callers also validate the finished document with jsonschema
(`schema_errors`) before calling it done.
"""

import functools
import json
import time
from typing import Optional

import mlx.core as mx
import numpy as np

_TOKENIZERS = {}
_SHIFTS = None


def ll_tokenizer(tokenizer, n_vocab: int):
    """llguidance's view of an mlx-lm TokenizerWrapper (about 1 s to build; cached)."""
    import llguidance.hf

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    key = (id(hf), n_vocab)
    if key not in _TOKENIZERS:
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
        _TOKENIZERS[key] = (hf, llguidance.hf.from_tokenizer(hf, n_vocab=n_vocab, eos_token=eos))
    return _TOKENIZERS[key][1]


def tool_call_schema(tools: list) -> dict:
    """The schema of one call {"name": ..., "arguments": {...}} to any of OpenAI-style `tools`
    ([{"type": "function", "function": {"name", "parameters"}}] or bare {"name", "parameters"})."""
    options = []
    for tool in tools:
        fn = tool.get("function", tool)
        if "name" not in fn:
            raise ValueError("every tool needs a function name")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise ValueError("no tools")
    return options[0] if len(options) == 1 else {"anyOf": options}


NOT_ENFORCED = {
    "patternProperties": "list the properties under 'properties' instead",
}
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _keywords(schema, path="$"):
    """(keyword, path) of every keyword of `schema` and its subschemas (not property names)."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        yield key, path
        if key in _SUBSCHEMA and isinstance(value, dict):
            yield from _keywords(value, f"{path}.{key}")
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                yield from _keywords(sub, f"{path}.{key}[{i}]")
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _keywords(sub, f"{path}.{key}.{name}")


def check_schema(schema: dict) -> None:
    """Raise ValueError if `schema` is not a valid JSON Schema (jsonschema's meta-schema check)
    or uses a keyword of NOT_ENFORCED; the message names the keyword and where it is."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise ValueError(f"not a valid JSON Schema at {where}: {e.message}") from None
    for key, path in _keywords(schema):
        if key in NOT_ENFORCED:
            raise ValueError(f"the schema uses {key!r} (at {path}), which the grammar engine cannot "
                             f"enforce; {NOT_ENFORCED[key]}")


def schema_errors(text: str, schema: dict) -> Optional[str]:
    """None if `text` is one JSON document valid under `schema`, else what is wrong with it
    (the first violation, with its JSON path)."""
    import jsonschema

    try:
        document = json.loads(text)
    except ValueError as e:
        return f"not valid JSON ({e})"
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(document))
    return None if error is None else f"{error.json_path}: {error.message}"


def compile_schema(schema, whitespace_flexible: bool = False) -> str:
    """The llguidance grammar for a JSON schema (dict or string). Raises ValueError if invalid
    or if it uses a keyword the engine does not enforce (`check_schema`).

    Cached per schema text (key order kept: it is the order properties are generated in):
    the meta-schema check and the compile cost ~30-40 ms, paid once per schema rather than
    once per request or per sample. Errors are not cached."""
    if not isinstance(schema, str):
        try:
            schema = json.dumps(schema)
        except TypeError as e:
            raise ValueError(f"a JSON schema must be JSON data: {e}") from None
    return _compile(schema, whitespace_flexible)


@functools.lru_cache(maxsize=256)
def _compile(schema_text: str, whitespace_flexible: bool) -> str:
    from llguidance import LLMatcher

    schema = json.loads(schema_text)
    check_schema(schema)
    grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": whitespace_flexible})
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"unsupported JSON schema: {error}")
    return grammar


class GrammarError(RuntimeError):
    """The grammar matcher refused a sampled token (its engine and mask disagree)."""


def _unpack(bitmask: mx.array, n: int) -> mx.array:
    """(words,) int32 bitmask -> (n,) bool, inside the MLX graph (no Python loop)."""
    global _SHIFTS
    if _SHIFTS is None:
        _SHIFTS = mx.arange(32, dtype=mx.uint32)
    bits = (bitmask.view(mx.uint32)[:, None] >> _SHIFTS) & 1
    return bits.reshape(-1)[:n].astype(mx.bool_)


class GrammarProcessor:
    """An mlx-lm LogitsProcessor `(tokens, logits) -> logits` driving one llguidance matcher.

    mlx-lm calls it first with the prompt tokens, then once per step with the sequence so far,
    the last entry being the token just sampled. Stateful: one instance per generation.
    """

    def __init__(self, ll_tokenizer, grammar: str, n_vocab: int):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(ll_tokenizer, grammar)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        self.n_vocab = n_vocab
        self.bitmask = np.full(((n_vocab + 31) // 32,), -1, dtype=np.int32)
        self.seen = None
        self.tokens = []
        self.busy_s = 0.0  # time spent in the grammar and mask (not waiting for the model)
        self.calls = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        new = None
        if self.seen is None:
            self.seen = tokens.size  # the prompt: nothing to consume
        else:
            # Start the next forward pass now; the grammar works while it runs.
            mx.async_eval(logits)
            new = tokens[self.seen:].tolist()
            self.seen = tokens.size
        tic = time.perf_counter()
        if new:
            for t in new:
                self.tokens.append(t)
                if not self.matcher.consume_token(t):
                    raise GrammarError(f"grammar rejected token {t}: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        allowed = _unpack(mx.array(self.bitmask), logits.shape[-1])
        out = mx.where(allowed, logits, mx.array(-mx.inf, logits.dtype))
        self.busy_s += time.perf_counter() - tic
        self.calls += 1
        return out

    @property
    def done(self) -> bool:
        return self.matcher.is_accepting()


def json_schema_processor(tokenizer, schema, n_vocab: Optional[int] = None) -> GrammarProcessor:
    """A fresh processor constraining output to one JSON document matching `schema`.
    `n_vocab`: the model's logits width (default: the tokenizer's size)."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    n_vocab = n_vocab or len(hf)
    return GrammarProcessor(ll_tokenizer(tokenizer, n_vocab), compile_schema(schema), n_vocab)


def engine_vocab(engine) -> Optional[int]:
    args = getattr(getattr(engine, "model", None), "args", None)
    return getattr(args, "vocab_size", None)
