"""The CAWS gate engine on hand-counted inputs.

tests/fixtures/caws/mixed.diff is `git diff --cached -M` of a real repository (made by hand):
added.py new (+3), gone.py deleted (-2), img.bin binary modified, keep.py (+2 -1), new.bin
binary new, old_name.py renamed to new_name.py (+1 -1): 6 files, 10 lines, 2 binary, 7 paths
touched (both sides of the rename).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from arbiter.caws import DEFAULT_POLICY, main
from arbiter.caws.gates import content_id, in_scope
from arbiter.caws.inputs import load_diff, load_document, load_junit
from arbiter.schemas import errors_of

F = Path(__file__).parent / "fixtures" / "caws"
SPEC1 = F / "good" / "working_spec.tier1.yaml"
STRICT = F / "good" / "policy.strict.yaml"
WAIVERS = F / "good" / "waiver_list.mixed.yaml"
REPORTS = ["--junit", F / "junit_pass.xml", "--lint", F / "ruff_clean.json",
           "--coverage", F / "coverage_95.json"]


def caws(tmp_path, *args, spec=SPEC1, now="2026-11-30T00:00:00Z"):
    """Run the CLI in process; return (exit status, verdict)."""
    out = tmp_path / "verdict.json"
    argv = ["--spec", spec, "--diff", F / "mixed.diff", "--out", out, *args]
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv + (["--now", now] if now else [])])
    verdict = json.loads(out.read_text()) if out.exists() else None
    if verdict is not None:
        assert errors_of(verdict, "verdict") == []
    return e.value.code, verdict


def gates(v):
    return {g["gate"]: g for g in v["gates"]}


def test_the_diff_is_counted_like_by_hand():
    files = {f.path: f for f in load_diff(F / "mixed.diff")}
    assert {p: (f.status, f.added, f.removed, f.binary) for p, f in files.items()} == {
        "added.py": ("added", 3, 0, False), "gone.py": ("deleted", 0, 2, False),
        "img.bin": ("modified", 0, 0, True), "keep.py": ("modified", 2, 1, False),
        "new.bin": ("added", 0, 0, True), "new_name.py": ("renamed", 1, 1, False)}
    assert files["new_name.py"].old_path == "old_name.py"


def test_a_clean_tier1_change_passes(tmp_path):
    code, v = caws(tmp_path, *REPORTS)
    assert code == 0 and v["decision"] == "PASS"
    g = gates(v)
    assert g["budget"]["measured"] == {"files": 6, "loc": 10, "binary_files": 2}
    assert g["budget"]["threshold"] == {"max_files": 10, "max_loc": 250}
    assert g["scope"]["measured"] == {"paths": 7, "out_of_scope": 0}
    assert g["tests"]["measured"] == {"tests": 3, "failures": 0, "errors": 0, "skipped": 0}
    assert g["coverage"]["measured"] == {"percent": 95.0}
    assert g["spec_completeness"]["measured"] == {"required": 6, "filled": 6}
    assert set(v["clause_scores"].values()) == {1.0}
    assert [i["id"] for i in v["evidence"]["items"]] == ["spec", "policy", "diff", "junit", "lint", "coverage"]


def test_over_budget_needs_a_waiver_and_the_waiver_counts_until_expiry(tmp_path):
    code, v = caws(tmp_path, "--policy", STRICT, *REPORTS)
    assert (code, v["decision"]) == (3, "WAIVER_REQUIRED")
    assert gates(v)["budget"]["findings"] == ["files changed: 6 > 5", "lines added + removed: 10 > 8"]
    assert v["clause_scores"]["BUDGET_ADHERENCE"] == 0.8  # min(5 / 6, 8 / 10)
    assert v["clause_scores"]["WAIVER_JUSTIFICATION"] == 0.0

    code, v = caws(tmp_path, "--policy", STRICT, *REPORTS, "--waivers", WAIVERS)
    assert (code, v["decision"], v["waivers_applied"]) == (0, "PASS", ["WV-0001"])
    assert gates(v)["budget"]["waived"] and gates(v)["budget"]["waiver"] == "WV-0001"
    assert v["clause_scores"]["WAIVER_JUSTIFICATION"] == 1.0

    code, v = caws(tmp_path, "--policy", STRICT, *REPORTS, "--waivers", WAIVERS,
                   now="2026-12-31T00:00:00Z")  # expiry is exclusive
    assert (code, v["decision"], v["waivers_applied"]) == (3, "WAIVER_REQUIRED", [])
    assert gates(v)["budget"]["findings"][-1] == (
        "WV-0001 does not count: expired at 2026-12-31T00:00:00Z (now 2026-12-31T00:00:00Z)")


def test_a_waiver_delta_bounds_what_it_covers(tmp_path):
    w = tmp_path / "w.yaml"
    w.write_text((F / "good" / "waiver.budget.yaml").read_text().replace("max_files: 2", "max_files: 0"))
    _, v = caws(tmp_path, "--policy", STRICT, *REPORTS, "--waivers", w)
    assert v["decision"] == "WAIVER_REQUIRED"
    assert gates(v)["budget"]["findings"][-1] == (
        "WV-0001 does not count: its delta allows files up to 5, the change has 6")


def test_coverage_waiver_with_points_and_an_injected_clock(tmp_path):
    reports = ["--junit", F / "junit_pass.xml", "--lint", F / "ruff_clean.json",
               "--coverage", F / "coverage_85.json", "--waivers", WAIVERS]
    _, v = caws(tmp_path, *reports, now="2026-05-01T12:00:00+02:00")
    assert (v["decision"], v["waivers_applied"]) == ("PASS", ["WV-0002"])  # 85 >= 90 - 10
    assert v["evaluated_at"] == "2026-05-01T10:00:00Z"
    _, v = caws(tmp_path, *reports, now="2026-07-01T00:00:00Z")
    assert (v["decision"], v["waivers_applied"]) == ("WAIVER_REQUIRED", [])
    assert gates(v)["coverage"]["summary"] == "85.00% covered (threshold 90%)"


def test_revoked_and_under_approved_waivers_do_not_count(tmp_path):
    _, v = caws(tmp_path, "--junit", F / "junit_pass.xml", "--lint", F / "ruff_two.json",
                   "--coverage", F / "coverage_95.json", "--waivers", WAIVERS)
    assert v["decision"] == "WAIVER_REQUIRED"
    assert gates(v)["lint"]["findings"] == [
        "new_name.py:1: F401 `os` imported but unused", "keep.py:5: E501 Line too long (120 > 100)",
        "WV-0003 does not count: status is revoked",
        "WV-0004 does not count: has 1 approver(s), tier 1 needs 2"]
    assert v["clause_scores"]["GATE_INTEGRITY"] == round(2 / 3, 4)


def test_failing_tests_fail_whatever_the_waivers(tmp_path):
    code, v = caws(tmp_path, "--policy", STRICT, "--junit", F / "junit_fail.xml", "--lint",
                   F / "ruff_clean.json", "--coverage", F / "coverage_95.json", "--waivers", WAIVERS)
    assert (code, v["decision"]) == (1, "FAIL")
    t = gates(v)["tests"]
    assert t["measured"] == {"tests": 5, "failures": 1, "errors": 1, "skipped": 1}
    assert t["findings"] == ["tests.test_keep::test_values", "tests.test_new_name::test_six"]
    assert gates(v)["budget"]["waived"]  # waivers still apply to what they cover


def test_skipped_tests_warn(tmp_path):
    code, v = caws(tmp_path, "--junit", F / "junit_skip.xml", "--lint", F / "ruff_clean.json",
                   "--coverage", F / "coverage_95.json")
    assert (code, v["decision"], gates(v)["tests"]["status"]) == (0, "PASS", "warn")
    assert load_junit(F / "junit_skip.xml").tests == 2  # a bare <testsuite> root


def test_missing_required_reports_and_spec_fields(tmp_path):
    code, v = caws(tmp_path, "--junit", F / "junit_pass.xml")
    g = gates(v)
    assert (g["lint"]["status"], g["coverage"]["status"]) == ("fail", "fail")
    assert g["lint"]["summary"] == "report required at tier 1 but not given"
    assert v["decision"] == "WAIVER_REQUIRED"
    assert v["clause_scores"]["EVIDENCE_COMPLETENESS"] == round(1 / 3, 4)

    spec = tmp_path / "spec.yaml"
    text = SPEC1.read_text()
    spec.write_text(text[:text.index("non_functional:")])  # drops non_functional and contracts
    code, v = caws(tmp_path, *REPORTS, spec=spec)
    assert (code, v["decision"]) == (1, "FAIL")
    assert gates(v)["spec_completeness"]["findings"] == [
        "non_functional: required at tier 1, missing or empty",
        "contracts: required at tier 1, missing or empty"]
    assert v["clause_scores"]["PROVENANCE_CLARITY"] == round((4 / 6 + 1) / 2, 4)


def test_scope_in_and_out_over_both_sides_of_a_rename(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC1.read_text().replace(
        "in: [keep.py, added.py, new_name.py, old_name.py, gone.py, \"*.bin\"]",
        "in: [keep.py, new_name.py, \"*.bin\", gone.py]").replace("out: [secrets/]", "out: [gone.py]"))
    _, v = caws(tmp_path, *REPORTS, spec=spec)
    assert gates(v)["scope"]["findings"] == [
        "added.py: matches no scope.in glob", "gone.py: matches scope.out 'gone.py'",
        "old_name.py: matches no scope.in glob"]
    assert v["clause_scores"]["PROVENANCE_CLARITY"] == round((1 + 4 / 7) / 2, 4)
    assert v["decision"] == "WAIVER_REQUIRED"


def test_globs():
    assert in_scope("arbiter/caws/gates.py", ["arbiter/"]) == "arbiter/"
    assert in_scope("arbiter/caws/gates.py", ["arbiter"]) == "arbiter"
    assert in_scope("arbiter/caws/gates.py", ["*.py"]) is None  # * stays in one folder
    assert in_scope("arbiter/caws/gates.py", ["**/*.py"]) == "**/*.py"
    assert in_scope("docs/.hidden.md", ["docs/*.md"]) == "docs/*.md"
    assert in_scope("arbiterx/a.py", ["arbiter/"]) is None


def test_reruns_are_byte_identical_and_the_id_is_the_content_hash(tmp_path):
    args = ["--policy", STRICT, *REPORTS, "--waivers", WAIVERS]
    caws(tmp_path, *args)
    first = [(tmp_path / n).read_bytes() for n in ("verdict.json", "verdict.md")]
    caws(tmp_path, *args)
    assert [(tmp_path / n).read_bytes() for n in ("verdict.json", "verdict.md")] == first
    v = json.loads(first[0])
    assert v["id"] == content_id({k: x for k, x in v.items() if k != "id"})
    assert json.loads((F / "good" / "verdict.waived.json").read_text())["gates"] == v["gates"]


def test_bad_inputs_end_with_a_message_not_a_traceback(tmp_path):
    junk = tmp_path / "junk.diff"
    junk.write_text("diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n")
    broken = tmp_path / "broken.xml"
    broken.write_text("<testsuites>\n<testsuite name='x'>\n</testsuites>\n")
    cases = [
        (["--spec", F / "bad" / "working_spec.tier4.yaml", "--diff", F / "mixed.diff"],
         "working_spec.tier4.yaml:3: $.risk_tier: 4 is not one of [1, 2, 3] (rule: enum)"),
        (["--spec", SPEC1, "--diff", junk], "junk.diff: not a unified diff: Hunk is shorter than expected"),
        (["--spec", SPEC1, "--diff", F / "mixed.diff", "--junit", broken],
         re.compile(r"broken.xml:\d+:\d+: invalid XML: ")),  # line:column from ElementTree or lxml
        (["--spec", SPEC1, "--diff", F / "mixed.diff", "--now", "tomorrow"],
         "--now: 'tomorrow' is not an ISO 8601 time"),
        (["--spec", SPEC1, "--diff", tmp_path / "none.diff"], "none.diff: cannot read: No such file"),
        (["--spec", SPEC1], "--diff is required"),
    ]
    for argv, message in cases:
        r = subprocess.run([sys.executable, "-m", "arbiter.caws", "--out", str(tmp_path / "v.json"),
                            *map(str, argv)], capture_output=True, text=True, check=False)
        found = message.search(r.stderr) if isinstance(message, re.Pattern) else message in r.stderr
        assert r.returncode == 2 and found and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "v.json").exists()


def test_the_shipped_examples_are_valid():
    configs = Path(__file__).parents[1] / "configs" / "caws"
    assert load_document(configs / "arbiter_gate.yaml", "working_spec")["risk_tier"] == 2
    assert load_document(configs / "policy.yaml", "policy") == DEFAULT_POLICY
