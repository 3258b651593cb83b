"""The arbiter's schema helper: every violation named by source, JSON path and rule."""

import pytest

from arbiter.schemas import SchemaError, validate

GOOD = {"id": "m1", "items": [{"id": "E1", "kind": "document", "source": "docs/a.rst",
                               "sha256": "0" * 64, "text": "The re module ..."}]}


def test_a_good_evidence_manifest_validates():
    assert validate(GOOD, "evidence_manifest") is GOOD


def test_every_violation_is_listed_with_source_path_and_rule():
    bad = {"id": "m1", "extra": 1, "items": [{"id": "E 1", "kind": "doc", "source": "a"}]}
    with pytest.raises(SchemaError) as e:
        validate(bad, "evidence_manifest", source="ev.json")
    assert e.value.errors == [
        "$: Additional properties are not allowed ('extra' was unexpected) (rule: additionalProperties)",
        "$.items[0].id: 'E 1' does not match '^[A-Za-z0-9_.:-]{1,64}$' (rule: pattern)",
        "$.items[0].kind: 'doc' is not one of ['test_report', 'lint_report', 'coverage_report', "
        "'diff', 'document', 'log', 'other'] (rule: enum)",
    ]
    assert str(e.value).startswith("ev.json: $: Additional properties")
    with pytest.raises(SchemaError, match=r"\$.items: \[\] should be non-empty"):
        validate({"id": "m", "items": []}, "evidence_manifest")
