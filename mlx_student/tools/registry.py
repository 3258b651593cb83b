"""The tools the worker learns to call, as OpenAI tool specs over JSON Schemas.

    from mlx_student.tools.registry import TOOLS, SCENARIOS, call_text, schema_errors

`TOOLS` maps a name to `{"type": "function", "function": {"name", "description",
"parameters"}}`. Between them the schemas hold every argument structure the generator
stratifies over: flat strings, nested objects, arrays (of strings and of objects), enums,
numeric ranges and optional keys. `SCENARIOS` groups them by the worker's jobs (file
operations, web search, code execution, code edits); multi-step items chain tools across
groups (search_code -> read_file, edit_file -> run_tests, web_search -> fetch_url).

A call's wire form (`call_text`) is the one runtime/constrained.py constrains and
runtime/server.py parses: compact JSON `{"name":...,"arguments":{...}}`, keys in schema
order, UTF-8 unescaped. The tools' results are not computed here: deterministic fixtures
recorded by the generator (mlx_student.tools.toolgen) are replayed by the broker.
"""

import json
from functools import lru_cache

import jsonschema


def _spec(name, description, properties, required):
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required,
                       "additionalProperties": False}}}


_S = {"type": "string"}
_PATHS = {"type": "array", "items": _S, "minItems": 1, "maxItems": 8}

TOOLS = {t["function"]["name"]: t for t in [
    _spec("read_file", "Read a text file of the workspace, optionally a range of lines.", {
        "path": _S,
        "start_line": {"type": "integer", "minimum": 1, "maximum": 100000},
        "max_lines": {"type": "integer", "minimum": 1, "maximum": 500},
    }, ["path"]),
    _spec("list_dir", "List the entries of a workspace folder.", {
        "path": _S,
        "recursive": {"type": "boolean"},
        "patterns": {"type": "array", "items": _S, "minItems": 1, "maxItems": 4},
    }, ["path"]),
    _spec("write_file", "Create or change a file of the workspace.", {
        "path": _S,
        "content": _S,
        "mode": {"type": "string", "enum": ["overwrite", "append", "create"]},
        "options": {"type": "object", "properties": {
            "make_dirs": {"type": "boolean"}, "backup": {"type": "boolean"}},
            "required": ["make_dirs"], "additionalProperties": False},
    }, ["path", "content", "mode"]),
    _spec("web_search", "Search the web; returns titles, urls and snippets.", {
        "query": _S,
        "num_results": {"type": "integer", "minimum": 1, "maximum": 10},
        "sites": {"type": "array", "items": _S, "minItems": 1, "maxItems": 4},
        "filters": {"type": "object", "properties": {
            "recency": {"type": "string", "enum": ["day", "week", "month", "year", "any"]},
            "language": _S}, "required": ["recency"], "additionalProperties": False},
    }, ["query"]),
    _spec("fetch_url", "Fetch a web page as text.", {
        "url": _S,
        "format": {"type": "string", "enum": ["text", "markdown", "html"]},
        "max_chars": {"type": "integer", "minimum": 100, "maximum": 20000},
    }, ["url"]),
    _spec("run_python", "Run a Python snippet in a sandbox; returns stdout, stderr, exit code.", {
        "code": _S,
        "timeout_s": {"type": "number", "minimum": 1, "maximum": 60},
    }, ["code"]),
    _spec("run_tests", "Run pytest on test files of the workspace.", {
        "paths": _PATHS,
        "keyword": _S,
        "report": {"type": "string", "enum": ["summary", "failures", "full"]},
        "options": {"type": "object", "properties": {
            "fail_fast": {"type": "boolean"},
            "workers": {"type": "integer", "minimum": 1, "maximum": 8}},
            "required": ["fail_fast"], "additionalProperties": False},
    }, ["paths"]),
    _spec("search_code", "Search the workspace's code for a string or regex.", {
        "query": _S,
        "paths": _PATHS,
        "mode": {"type": "string", "enum": ["literal", "regex"]},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 50},
    }, ["query"]),
    _spec("edit_file", "Replace exact snippets of a file; each edit's old text must occur once.", {
        "path": _S,
        "edits": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
            "type": "object", "properties": {"old": _S, "new": _S},
            "required": ["old", "new"], "additionalProperties": False}},
        "dry_run": {"type": "boolean"},
    }, ["path", "edits"]),
]}

SCENARIOS = {
    "files": ("read_file", "list_dir", "write_file"),
    "web": ("web_search", "fetch_url"),
    "code_exec": ("run_python", "run_tests"),
    "code_edit": ("search_code", "edit_file"),
}


def ordered(name, arguments):
    """`arguments` with keys in the order of the tool's schema, recursively (the order the
    constrained decoder emits); unknown keys keep their place at the end."""
    def walk(schema, value):
        if isinstance(value, dict):
            props = schema.get("properties", {})
            keys = [k for k in props if k in value] + [k for k in value if k not in props]
            return {k: walk(props.get(k, {}), value[k]) for k in keys}
        if isinstance(value, list):
            return [walk(schema.get("items", {}), v) for v in value]
        return value
    return walk(TOOLS[name]["function"]["parameters"] if name in TOOLS else {}, arguments)


def call_text(name, arguments):
    """The wire form of one call (see the module docstring)."""
    return json.dumps({"name": name, "arguments": ordered(name, arguments)},
                      separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=None)
def _validator(name):
    return jsonschema.Draft202012Validator(TOOLS[name]["function"]["parameters"])


def schema_errors(name, arguments, tools=None):
    """Problems of one call against the offered `tools` (default: all of TOOLS): an unknown
    name, or each JSON Schema violation as 'path: message'. Empty when the call is valid."""
    offered = {t["function"]["name"]: t for t in tools} if tools is not None else TOOLS
    if name not in offered:
        return [f"unknown tool {name!r}"]
    if offered[name] is TOOLS.get(name):
        validator = _validator(name)
    else:
        validator = jsonschema.Draft202012Validator(offered[name]["function"]["parameters"])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<arguments>'}: {e.message}"
            for e in validator.iter_errors(arguments)]
