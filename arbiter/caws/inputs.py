"""Reading the gate engine's inputs: each parsed by its own library and checked by its schema.

Working spec, policy and waivers are YAML or JSON (checked against `arbiter/schemas`; YAML
errors name the line); the diff is `git diff` output (unidiff: renames, /dev/null adds and
deletes, binary files); the test report is JUnit XML (junitparser); the lint report is
`ruff check --output-format json`; coverage is `coverage json` (coverage.py). Every problem is
a `CAWSError` naming the file, the line or JSON path, and the field.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import junitparser
import unidiff
import yaml

from ..schemas import SchemaError, validate


class CAWSError(ValueError):
    """A bad input to the gate engine; the message names file, line or JSON path, and field."""


@dataclass(frozen=True)
class FileChange:
    """One file of a diff. `path` is the path after the change (before it, for a deletion);
    `old_path` is set on renames. Binary files count as changed with 0 lines."""

    path: str
    old_path: str | None
    status: str  # added | deleted | renamed | modified
    added: int
    removed: int
    binary: bool

    @property
    def paths(self) -> tuple:
        return (self.old_path, self.path) if self.old_path else (self.path,)


@dataclass(frozen=True)
class TestSummary:
    tests: int
    failures: int
    errors: int
    skipped: int
    failed: tuple  # "suite::case" names of failed or errored cases, in report order


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CAWSError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def yaml_locator(text: str):
    """A `locate(path_parts) -> line` callback over a YAML document: the 1-based line of the
    deepest node on that JSON path (a missing key: its parent's line)."""
    root = yaml.compose(text)

    def locate(parts):
        node = root
        for part in parts:
            child = None
            if isinstance(node, yaml.MappingNode):
                child = next((v for k, v in node.value if k.value == str(part)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                child = node.value[part]
            if child is None:
                break
            node = child
        return node.start_mark.line + 1 if node is not None else None

    return locate


class _Loader(yaml.SafeLoader):
    """Safe YAML that keeps timestamps as the strings written (the schemas check date-time)."""


_Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _parse(path, text):
    """(object, locate or None) of a YAML or JSON text (.json is JSON, anything else YAML)."""
    try:
        if str(path).endswith(".json"):
            return json.loads(text), None
        obj = yaml.load(text, Loader=_Loader)
        return obj, (yaml_locator(text) if obj is not None else None)
    except json.JSONDecodeError as e:
        raise CAWSError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise CAWSError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None


def load_document(path, schema: str):
    """Read a YAML or JSON file (by suffix: .json is JSON, anything else YAML) and check it
    against `schema`. Returns the parsed object; raises CAWSError on any problem."""
    obj, locate = _parse(path, _read(path))
    try:
        return validate(obj, schema, str(path), locate)
    except SchemaError as e:
        raise CAWSError(str(e)) from None


def load_waivers(path) -> list:
    """A waivers file holds one waiver or a list of them (YAML or JSON), checked against
    schema `waiver` (or `waiver_list`: errors name the item as `$[i]`). Ids must be unique."""
    obj, locate = _parse(path, _read(path))
    try:
        validate(obj, "waiver_list" if isinstance(obj, list) else "waiver", str(path), locate)
    except SchemaError as e:
        raise CAWSError(str(e)) from None
    items = obj if isinstance(obj, list) else [obj]
    seen = set()
    for i, w in enumerate(items):
        if w["id"] in seen:
            raise CAWSError(f"{path}: $[{i}].id: duplicate waiver id {w['id']!r}")
        seen.add(w["id"])
    return items


def _strip(name: str) -> str:
    return name[2:] if name[:2] in ("a/", "b/") else name


def load_diff(path) -> list:
    """The FileChanges of a unified diff file (`git diff` output), in diff order."""
    return parse_diff(_read(path), path)


def parse_diff(text: str, source="<diff>") -> list:
    """The FileChanges of unified-diff `text`; `source` names it in errors."""
    try:
        patch = unidiff.PatchSet(text)
    except unidiff.UnidiffParseError as e:
        raise CAWSError(f"{source}: not a unified diff: {e}") from None
    if not patch and text.strip():
        raise CAWSError(f"{source}: not a unified diff: no file headers (diff --git / --- / +++) found")
    changes = []
    for f in patch:
        status = ("added" if f.is_added_file else "deleted" if f.is_removed_file
                  else "renamed" if f.is_rename else "modified")
        changes.append(FileChange(
            path=f.path, old_path=_strip(f.source_file) if status == "renamed" else None,
            status=status, added=f.added, removed=f.removed, binary=f.is_binary_file))
    return changes


def load_junit(path) -> TestSummary:
    """Count the cases of a JUnit XML report (one <testsuite> or a <testsuites> of them)."""
    try:
        xml = junitparser.JUnitXml.fromfile(str(path))
    except junitparser.junitparser.etree.ParseError as e:  # ElementTree's, or lxml's when installed
        line, col = e.position
        raise CAWSError(f"{path}:{line}:{col}: invalid XML: {e.msg}") from None
    except OSError as e:
        raise CAWSError(f"{path}: cannot read: {e.strerror}") from None
    except junitparser.JUnitXmlError as e:  # a root other than <testsuites> / <testsuite>
        raise CAWSError(f"{path}: not a JUnit XML report: {e}") from None
    suites = [xml] if isinstance(xml, junitparser.TestSuite) else list(xml)
    tests = failures = errors = skipped = 0
    failed = []
    for suite in suites:
        for case in suite:
            tests += 1
            kinds = {type(r) for r in case.result}
            if junitparser.Failure in kinds:
                failures += 1
            elif junitparser.Error in kinds:
                errors += 1
            elif junitparser.Skipped in kinds:
                skipped += 1
                continue
            else:
                continue
            failed.append(f"{case.classname or suite.name}::{case.name}")
    return TestSummary(tests, failures, errors, skipped, tuple(failed))


def _load_json(path, schema):
    text = _read(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CAWSError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    try:
        return validate(obj, schema, source=str(path))
    except SchemaError as e:
        raise CAWSError(str(e)) from None


def load_lint(path) -> list:
    """The findings of a ruff JSON report as 'file:row: CODE message', in report order."""
    return [f"{f['filename']}:{f['location']['row']}: {f.get('code') or '-'} {f['message']}"
            for f in _load_json(path, "ruff_report")]


def load_coverage(path) -> float:
    """totals.percent_covered of a coverage.py JSON report (percent)."""
    return float(_load_json(path, "coverage_report")["totals"]["percent_covered"])
