"""Claimify's three stages (and the entailment judgment) as prompts with JSON-Schema outputs.

Claimify (Metropolitansky & Larson, Microsoft Research, arXiv 2502.10855, ACL 2025) asks an
LLM, per sentence of an answer and with its context:

1. **Selection**: does the sentence contain a specific, verifiable proposition? If only part of
   it does, keep only that part (`kept`); otherwise drop the sentence.
2. **Disambiguation**: can the kept text be rewritten to stand alone (references resolved from
   the question and context)? If readers could reasonably disagree on its meaning and the
   context does not settle it, drop it.
3. **Decomposition**: the maximally clarified sentence and its atomic, decontextualised claims.

The paper's stages answer in free text; here each answer is one JSON object under a schema
(`SCHEMAS`), so under the runtime's constrained decoding it parses by construction. The
`reason` field comes first: the model states its grounds before deciding, as the paper's
prompts ask. `parse(stage, text)` returns the object or None (not JSON, or not schema-valid).
"""

import json

import jsonschema

REASON = {"type": "string", "maxLength": 240}
MAX_TEXT = 400
MAX_CLAIMS = 8
STAGES = ("selection", "disambiguation", "decomposition")
LABELS = ("entailed", "contradicted", "neutral")

SCHEMAS = {
    "selection": {
        "type": "object",
        "properties": {"reason": REASON, "verifiable": {"type": "boolean"},
                       "kept": {"type": "string", "maxLength": MAX_TEXT}},
        "required": ["reason", "verifiable", "kept"], "additionalProperties": False},
    "disambiguation": {
        "type": "object",
        "properties": {"reason": REASON, "resolvable": {"type": "boolean"},
                       "rewritten": {"type": "string", "maxLength": MAX_TEXT}},
        "required": ["reason", "resolvable", "rewritten"], "additionalProperties": False},
    "decomposition": {
        "type": "object",
        "properties": {"clarified": {"type": "string", "maxLength": MAX_TEXT},
                       "claims": {"type": "array", "minItems": 1, "maxItems": MAX_CLAIMS,
                                  "items": {"type": "string", "minLength": 3, "maxLength": 300}}},
        "required": ["clarified", "claims"], "additionalProperties": False},
    "entailment": {
        "type": "object",
        "properties": {"reason": REASON, "label": {"enum": list(LABELS)}},
        "required": ["reason", "label"], "additionalProperties": False},
}

SYSTEM = {
    "selection": (
        "You extract verifiable facts. Given a question, an excerpt of an answer and one sentence "
        "of it, decide whether the sentence contains at least one specific, verifiable "
        "proposition (a fact that could be checked against documentation), as opposed to "
        "opinions, advice, hedges, greetings or sentences that only introduce what follows. If "
        "only part of the sentence is verifiable, copy only that part into `kept`; if none, set "
        "`verifiable` to false and `kept` to an empty string."),
    "disambiguation": (
        "You make sentences stand alone. Given a question, an excerpt of an answer and one "
        "sentence of it, rewrite the sentence so that it can be understood without the excerpt: "
        "replace pronouns and vague references (it, this, the function) by what they refer to. "
        "If the sentence can be read in different ways and the context does not say which is "
        "meant, set `resolvable` to false and `rewritten` to an empty string."),
    "decomposition": (
        "You split sentences into atomic claims. Given a question, an excerpt of an answer and "
        "one sentence of it, write the sentence in its clearest form (`clarified`) and list its "
        "claims: each one short, simple, true or false on its own, understandable without the "
        "excerpt, and together covering every verifiable fact of the sentence."),
    "entailment": (
        "You check claims against evidence. Say whether the evidence entails the claim (every "
        "part of the claim follows from it), contradicts it (some part conflicts with it) or is "
        "neutral (it does not say)."),
}


ASK = {
    "selection": "Does the sentence state a specific fact that can be checked?",
    "disambiguation": "Can the sentence be rewritten to stand alone with one clear meaning?",
    "decomposition": "What are the sentence's atomic claims?",
    "entailment": "Does the evidence entail, contradict, or not decide the claim?",
}


def stage_schema(stage: str, sentence: str = "") -> dict:
    """The stage's schema, with string lengths bounded by the sentence's: Selection keeps a
    part of it; a rewrite may add the references it resolves. The bound also stops a weak
    model from repeating itself until max_tokens inside a string."""
    schema = json.loads(json.dumps(SCHEMAS[stage]))
    limit = min(MAX_TEXT, 2 * len(sentence) + 40)
    props = schema["properties"]
    if stage == "selection":
        props["kept"]["maxLength"] = min(MAX_TEXT, len(sentence))
    elif stage == "disambiguation":
        props["rewritten"]["maxLength"] = limit
    elif stage == "decomposition":
        props["clarified"]["maxLength"] = limit
        props["claims"]["items"]["maxLength"] = limit
    return schema


def _system(stage, schema):
    return f"{SYSTEM[stage]}\nAnswer with one JSON object matching this schema: {json.dumps(schema)}"


def stage_messages(stage: str, sentence: str, question=None, preceding=(), following=()) -> list:
    """The chat messages of one Claimify stage for `sentence` (already selected / rewritten
    for the later stages) with its question and surrounding sentences."""
    excerpt = " ".join([*preceding, f"[{sentence}]", *following])
    user = (f"Question: {question or '(none)'}\n"
            f"Excerpt (the sentence in brackets): {excerpt}\n"
            f"Sentence: {sentence}\n{ASK[stage]}")
    return [{"role": "system", "content": _system(stage, stage_schema(stage, sentence))},
            {"role": "user", "content": user}]


def entailment_messages(claim: str, evidence: str) -> list:
    return [{"role": "system", "content": _system("entailment", SCHEMAS["entailment"])},
            {"role": "user", "content": f"Evidence: {evidence}\nClaim: {claim}\n{ASK['entailment']}"}]


def parse(stage: str, text: str, schema=None):
    """The stage output as a dict, or None when it is not one JSON object valid under
    `schema` (default: the stage's unbounded schema)."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return obj if jsonschema.Draft202012Validator(schema or SCHEMAS[stage]).is_valid(obj) else None
