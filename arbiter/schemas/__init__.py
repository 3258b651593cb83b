"""The arbiter's JSON Schemas (2020-12), loaded from this folder and checked with `jsonschema`.

    validate(obj, "evidence_manifest", source="evidence.json")

raises `SchemaError` listing every violation as `source: $.json.path: message (rule: keyword)`,
or `source:line: ...` when a `locate` callback maps the JSON path to a line of the source file
(YAML inputs: `arbiter.caws.inputs.yaml_locator`).
"""

import functools
import json
from pathlib import Path

import jsonschema
import referencing

SCHEMA_DIR = Path(__file__).parent


class SchemaError(ValueError):
    """An instance failed its schema; `.errors` holds one line per violation."""

    def __init__(self, source, errors, lines=None):
        self.errors = errors
        self.lines = lines or [None] * len(errors)
        super().__init__("\n".join(f"{source}:{n}: {e}" if n else f"{source}: {e}"
                                   for n, e in zip(self.lines, errors)))


@functools.cache
def registry() -> referencing.Registry:
    """Every schema of this folder under its `$id`, so one may `$ref` another by file name."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text())
        resources.append((schema["$id"], referencing.Resource.from_contents(schema)))
    return referencing.Registry().with_resources(resources)


@functools.cache
def validator(name: str) -> jsonschema.protocols.Validator:
    """The 2020-12 validator of `<name>.json` in this folder (format checks on)."""
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, registry=registry(), format_checker=cls.FORMAT_CHECKER)


def _violations(obj, name: str) -> list:
    return sorted(validator(name).iter_errors(obj),
                  key=lambda e: (list(map(str, e.absolute_path)), str(e.validator)))


def _line(e) -> str:
    return f"{e.json_path}: {e.message} (rule: {e.validator})"


def errors_of(obj, name: str) -> list[str]:
    """Every violation of schema `name` by `obj` as '$.path: message (rule: keyword)', sorted."""
    return [_line(e) for e in _violations(obj, name)]


def validate(obj, name: str, source: str = "<input>", locate=None):
    """Raise SchemaError naming `source`, the JSON path and the rule for each violation;
    `locate(path_parts) -> line or None` adds the line of the source file."""
    errs = _violations(obj, name)
    if errs:
        lines = [locate(list(e.absolute_path)) for e in errs] if locate else None
        raise SchemaError(source, [_line(e) for e in errs], lines)
    return obj
