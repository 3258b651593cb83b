"""CAWS schemas: the good fixtures validate, the bad ones fail with file, line or JSON path, and rule."""

from pathlib import Path

import pytest

from arbiter.caws import DEFAULT_POLICY, GATES, WAIVABLE
from arbiter.caws.inputs import CAWSError, load_document, load_waivers
from arbiter.schemas import errors_of, validator

FIXTURES = Path(__file__).parent / "fixtures" / "caws"


def _load(path):
    schema = path.name.split(".")[0]
    return load_waivers(path) if schema.startswith("waiver") else load_document(path, schema)


@pytest.mark.parametrize("path", sorted((FIXTURES / "good").iterdir()), ids=lambda p: p.name)
def test_good_fixtures_validate(path):
    assert _load(path)


BAD = {
    "working_spec.tier4.yaml": [
        "working_spec.tier4.yaml:8: $.acceptance[0]: 'then' is a required property (rule: required)",
        "working_spec.tier4.yaml:1: $.id: 'feat-1' does not match '^[A-Z][A-Z0-9]*-[0-9]+$' (rule: pattern)",
        "working_spec.tier4.yaml:3: $.risk_tier: 4 is not one of [1, 2, 3] (rule: enum)",
        "working_spec.tier4.yaml:6: $.scope.in: [] should be non-empty (rule: minItems)",
        "working_spec.tier4.yaml:2: $.title: '' should be non-empty (rule: minLength)",
    ],
    "policy.no_tier3.json": [
        "policy.no_tier3.json: $.risk_tiers: '3' is a required property (rule: required)",
        "policy.no_tier3.json: $.risk_tiers['2'].max_files: 0 is less than the minimum of 1 (rule: minimum)",
        "policy.no_tier3.json: $.risk_tiers['2'].min_coverage: 180 is greater than the maximum of 100 (rule: maximum)",
    ],
    "waiver.tests.yaml": [
        "waiver.tests.yaml:6: $.approvers: [] should be non-empty (rule: minItems)",
        "waiver.tests.yaml:5: $.expiry: 'next week' is not a 'date-time' (rule: format)",
        "waiver.tests.yaml:4: $.gates[0]: 'tests' is not one of ['budget', 'scope', 'lint', 'coverage'] (rule: enum)",
        "waiver.tests.yaml:1: $.id: 'WV-12' does not match '^WV-[0-9]{4}$' (rule: pattern)",
        ("waiver.tests.yaml:3: $.reason: 'because' is not one of ['emergency_hotfix', 'legacy_integration', "
         "'experimental_feature', 'third_party_constraint', 'performance_critical', 'security_patch', "
         "'infrastructure_limitation', 'other'] (rule: enum)"),
    ],
    "gate_report.waived_pass.json": [
        "gate_report.waived_pass.json: $: 'waiver' is a required property (rule: required)",
        "gate_report.waived_pass.json: $.status: 'fail' was expected (rule: const)",
    ],
    "verdict.approved.json": [
        "verdict.approved.json: $.clause_scores: 'WAIVER_JUSTIFICATION' is a required property (rule: required)",
        "verdict.approved.json: $.clause_scores.EVIDENCE_COMPLETENESS: 1.5 is greater than the maximum of 1 (rule: maximum)",
        "verdict.approved.json: $.decision: 'APPROVED' is not one of ['PASS', 'FAIL', 'WAIVER_REQUIRED'] (rule: enum)",
        "verdict.approved.json: $.gates[0].status: 'passed' is not one of ['pass', 'fail', 'warn', 'skipped'] (rule: enum)",
        "verdict.approved.json: $.id: 'sha256:abc' does not match '^sha256:[0-9a-f]{64}$' (rule: pattern)",
    ],
}


def test_every_bad_fixture_has_its_expected_errors():
    assert sorted(BAD) == sorted(p.name for p in (FIXTURES / "bad").iterdir())


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_fixtures_fail_naming_file_line_path_and_rule(name):
    path = FIXTURES / "bad" / name
    with pytest.raises(CAWSError) as e:
        _load(path)
    assert str(e.value).split("\n") == [f"{FIXTURES / 'bad'}/{line}" for line in BAD[name]]


def test_a_waiver_list_names_the_item(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text((FIXTURES / "good" / "waiver_list.mixed.yaml").read_text()
                 .replace("status: revoked", "status: paused"))
    with pytest.raises(CAWSError, match=r"w.yaml:24: \$\[2\].status: 'paused' is not one of "
                                        r"\['active', 'expired', 'revoked'\] \(rule: enum\)"):
        load_waivers(p)
    p.write_text((FIXTURES / "good" / "waiver_list.mixed.yaml").read_text().replace("WV-0002", "WV-0001"))
    with pytest.raises(CAWSError, match=r"w.yaml: \$\[1\].id: duplicate waiver id 'WV-0001'"):
        load_waivers(p)


def test_syntax_errors_name_line_and_column(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text("id: FEAT-1\nscope: [a\n")
    with pytest.raises(CAWSError, match=r"spec.yaml:3:1: invalid YAML"):
        load_document(p, "working_spec")
    p = tmp_path / "spec.json"
    p.write_text('{"id": "FEAT-1",\n "title": }')
    with pytest.raises(CAWSError, match=r"spec.json:2:11: invalid JSON: Expecting value"):
        load_document(p, "working_spec")


def test_schemas_agree_with_the_engine():
    assert errors_of(DEFAULT_POLICY, "policy") == []
    gate_defs = validator("gate_report").schema["$defs"]
    assert tuple(gate_defs["gate"]["enum"]) == GATES
    assert tuple(gate_defs["waivable_gate"]["enum"]) == WAIVABLE
    tiers = DEFAULT_POLICY["risk_tiers"]  # the upstream CAWS numbers
    assert [(tiers[t]["max_files"], tiers[t]["max_loc"], tiers[t]["min_coverage"]) for t in "123"] == [
        (10, 250, 90), (100, 10000, 80), (500, 40000, 70)]
