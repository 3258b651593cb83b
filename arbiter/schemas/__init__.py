"""The arbiter's JSON Schemas (2020-12), loaded from this folder and checked with `jsonschema`.

    validate(obj, "evidence_manifest", source="evidence.json")

raises `SchemaError` listing every violation as `source: $.json.path: message (rule: keyword)`.
"""

import functools
import json
from pathlib import Path

import jsonschema

SCHEMA_DIR = Path(__file__).parent


class SchemaError(ValueError):
    """An instance failed its schema; `.errors` holds one line per violation."""

    def __init__(self, source, errors):
        self.errors = errors
        super().__init__("\n".join(f"{source}: {e}" for e in errors))


@functools.cache
def validator(name: str) -> jsonschema.protocols.Validator:
    """The 2020-12 validator of `<name>.json` in this folder (format checks on)."""
    schema = json.loads((SCHEMA_DIR / f"{name}.json").read_text())
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def errors_of(obj, name: str) -> list[str]:
    """Every violation of schema `name` by `obj` as '$.path: message (rule: keyword)', sorted."""
    errs = sorted(validator(name).iter_errors(obj),
                  key=lambda e: (list(map(str, e.absolute_path)), str(e.validator)))
    return [f"{e.json_path}: {e.message} (rule: {e.validator})" for e in errs]


def validate(obj, name: str, source: str = "<input>"):
    """Raise SchemaError naming `source`, the JSON path and the rule for each violation."""
    errors = errors_of(obj, name)
    if errors:
        raise SchemaError(source, errors)
    return obj
