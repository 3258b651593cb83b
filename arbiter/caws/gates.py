"""The CAWS gates over one change, the waivers that may cover them, and the verdict.

Gates (in this order): spec_completeness (the fields the tier requires are filled), budget
(files changed and lines added + removed within the tier's limits), scope (every path the diff
touches, both sides of a rename, matches a `scope.in` glob and no `scope.out` glob), tests
(JUnit: no failure or error; skipped cases warn), lint (ruff: no finding), coverage
(coverage.py percent >= the tier's threshold). A report the tier requires but the change does
not bring fails its gate; one neither required nor given is skipped.

Waivers cover only budget, scope, lint and coverage (a failing test or an incomplete spec is
never waived). A waiver counts for a failing gate when it lists that gate, is `active`, its
expiry is after `now`, it has the tier's `min_approvers`, its `spec_id` (if any) is the spec's,
and the measured value is within its `delta` (if any). Decision: FAIL if a gate no waiver can
cover fails; else WAIVER_REQUIRED if a waivable gate fails uncovered; else PASS.

Clause scores in [0, 1] (the arbiter's five CAWS clauses, read from the gates):
EVIDENCE_COMPLETENESS = required reports given / required; BUDGET_ADHERENCE = 1 within budget
(or waived), else min(max_files / files, max_loc / loc); GATE_INTEGRITY = tests, lint and
coverage gates that pass / those not skipped; PROVENANCE_CLARITY = mean of (required spec fields
filled / required) and (touched paths in scope / touched paths); WAIVER_JUSTIFICATION = failing
waivable gates covered / failing waivable gates (1 when none fail).
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from wcmatch import glob as wglob

GATES = ("spec_completeness", "budget", "scope", "tests", "lint", "coverage")
WAIVABLE = ("budget", "scope", "lint", "coverage")
REPORT_GATES = ("tests", "lint", "coverage")
CLAUSES = ("EVIDENCE_COMPLETENESS", "BUDGET_ADHERENCE", "GATE_INTEGRITY",
           "PROVENANCE_CLARITY", "WAIVER_JUSTIFICATION")
ENGINE = {"kind": "rules", "name": "arbiter.caws", "version": "1"}
MAX_FINDINGS = 50  # per gate in the verdict; the count is always exact

# Upstream CAWS tier budgets and coverage thresholds.
DEFAULT_POLICY = {
    "version": 1,
    "risk_tiers": {
        "1": {"max_files": 10, "max_loc": 250, "min_coverage": 90, "min_approvers": 2,
              "required_reports": ["tests", "lint", "coverage"],
              "required_spec_fields": ["blast_radius", "operational_rollback_slo", "invariants",
                                       "acceptance", "non_functional", "contracts"]},
        "2": {"max_files": 100, "max_loc": 10000, "min_coverage": 80, "min_approvers": 1,
              "required_reports": ["tests", "coverage"],
              "required_spec_fields": ["invariants", "acceptance", "contracts"]},
        "3": {"max_files": 500, "max_loc": 40000, "min_coverage": 70, "min_approvers": 1,
              "required_reports": ["tests"],
              "required_spec_fields": ["acceptance"]},
    },
}


@dataclass(frozen=True)
class Change:
    """What a change brings: its diff (FileChanges) and the reports given (None: absent)."""

    files: list
    tests: object = None  # inputs.TestSummary
    lint: list | None = None  # findings
    coverage: float | None = None  # percent


def parse_time(text: str) -> datetime:
    """An ISO 8601 / RFC 3339 time; a time without an offset is UTC."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def in_scope(path: str, patterns) -> str | None:
    """The first glob of `patterns` that `path` matches (`**` crosses folders; a pattern also
    covers everything under it as a folder), else None."""
    for p in patterns:
        base = p.rstrip("/")
        if wglob.globmatch(path, [base, f"{base}/**"], flags=wglob.GLOBSTAR | wglob.DOTGLOB):
            return p
    return None


def _gate(gate, status, summary, measured=None, threshold=None, findings=()):
    findings = list(findings)
    if len(findings) > MAX_FINDINGS:
        findings = findings[:MAX_FINDINGS] + [f"... and {len(findings) - MAX_FINDINGS} more"]
    out = {"gate": gate, "status": status, "waived": False, "summary": summary}
    if measured is not None:
        out["measured"] = measured
    if threshold is not None:
        out["threshold"] = threshold
    if findings:
        out["findings"] = findings
    return out


def spec_gate(spec, tier):
    required = tier.get("required_spec_fields", [])
    missing = [f for f in required if not spec.get(f)]
    measured = {"required": len(required), "filled": len(required) - len(missing)}
    if missing:
        return _gate("spec_completeness", "fail", f"{len(missing)} required field(s) empty: "
                     + ", ".join(missing), measured, {"fields": required},
                     [f"{f}: required at tier {spec['risk_tier']}, missing or empty" for f in missing])
    return _gate("spec_completeness", "pass", f"all {len(required)} required field(s) filled",
                 measured, {"fields": required})


def budget_gate(change, tier):
    files = len(change.files)
    loc = sum(f.added + f.removed for f in change.files)
    measured = {"files": files, "loc": loc,
                "binary_files": sum(f.binary for f in change.files)}
    threshold = {"max_files": tier["max_files"], "max_loc": tier["max_loc"]}
    over = []
    if files > tier["max_files"]:
        over.append(f"files changed: {files} > {tier['max_files']}")
    if loc > tier["max_loc"]:
        over.append(f"lines added + removed: {loc} > {tier['max_loc']}")
    summary = f"{files} file(s), {loc} line(s) changed (limits {tier['max_files']} / {tier['max_loc']})"
    return _gate("budget", "fail" if over else "pass", summary, measured, threshold, over)


def scope_gate(change, spec):
    scope_in, scope_out = spec["scope"]["in"], spec["scope"].get("out", [])
    paths = sorted({p for f in change.files for p in f.paths})
    findings = []
    for p in paths:
        hit = in_scope(p, scope_out)
        if hit:
            findings.append(f"{p}: matches scope.out {hit!r}")
        elif not in_scope(p, scope_in):
            findings.append(f"{p}: matches no scope.in glob")
    measured = {"paths": len(paths), "out_of_scope": len(findings)}
    summary = (f"{len(findings)} of {len(paths)} path(s) out of scope" if findings
               else f"all {len(paths)} path(s) in scope")
    return _gate("scope", "fail" if findings else "pass", summary, measured,
                 {"in": scope_in, "out": scope_out}, findings)


def _absent(gate, tier, risk):
    if gate in tier.get("required_reports", []):
        return _gate(gate, "fail", f"report required at tier {risk} but not given")
    return _gate(gate, "skipped", "no report given (not required at this tier)")


def tests_gate(change, tier, risk):
    t = change.tests
    if t is None:
        return _absent("tests", tier, risk)
    measured = {"tests": t.tests, "failures": t.failures, "errors": t.errors, "skipped": t.skipped}
    if t.tests == 0:
        return _gate("tests", "fail", "the report holds no test case", measured)
    if t.failures or t.errors:
        return _gate("tests", "fail", f"{t.failures} failed, {t.errors} errored of {t.tests}",
                     measured, None, t.failed)
    if t.skipped:
        return _gate("tests", "warn", f"{t.tests - t.skipped} passed, {t.skipped} skipped", measured)
    return _gate("tests", "pass", f"all {t.tests} passed", measured)


def lint_gate(change, tier, risk):
    if change.lint is None:
        return _absent("lint", tier, risk)
    n = len(change.lint)
    return _gate("lint", "fail" if n else "pass", f"{n} finding(s)", {"findings": n},
                 {"max_findings": 0}, change.lint)


def coverage_gate(change, tier, risk):
    if change.coverage is None:
        return _absent("coverage", tier, risk)
    pct, need = change.coverage, tier["min_coverage"]
    return _gate("coverage", "fail" if pct < need else "pass",
                 f"{pct:.2f}% covered (threshold {need}%)", {"percent": round(pct, 4)},
                 {"min_percent": need})


def waiver_problem(w, gate, spec, tier, now):
    """Why waiver `w` does not cover failing `gate` (a sentence), or None when it does."""
    if gate["gate"] not in w["gates"]:
        return "does not list this gate"
    if w["status"] != "active":
        return f"status is {w['status']}"
    if parse_time(w["expiry"]) <= now:
        return f"expired at {format_time(parse_time(w['expiry']))} (now {format_time(now)})"
    if w.get("spec_id") not in (None, spec["id"]):
        return f"is for spec {w['spec_id']}, not {spec['id']}"
    need = tier.get("min_approvers", 1)
    if len(w["approvers"]) < need:
        return f"has {len(w['approvers'])} approver(s), tier {spec['risk_tier']} needs {need}"
    delta, m = w.get("delta"), gate.get("measured", {})
    if delta is None:
        return None
    if gate["gate"] == "budget":
        for key, dim in (("max_files", "files"), ("max_loc", "loc")):
            limit = tier[key] + delta.get(key, 0)
            if m[dim] > limit:
                return f"its delta allows {dim} up to {limit}, the change has {m[dim]}"
    if gate["gate"] == "coverage":
        if "percent" not in m:
            return "its delta bounds a coverage the change did not report"
        floor = tier["min_coverage"] - delta.get("coverage_points", 0)
        if m["percent"] < floor:
            return f"its delta allows coverage down to {floor}%, the change has {m['percent']}%"
    return None


def apply_waivers(gates, waivers, spec, tier, now) -> list:
    """Mark each failing waivable gate covered by the first counting waiver (by id); a
    waiver that lists the gate but does not count is named in the gate's findings. Returns
    the ids applied, sorted."""
    applied = set()
    for g in gates:
        if g["status"] != "fail" or g["gate"] not in WAIVABLE:
            continue
        for w in sorted(waivers, key=lambda w: w["id"]):
            if g["gate"] not in w["gates"]:
                continue
            problem = waiver_problem(w, g, spec, tier, now)
            if problem is None:
                g["waived"], g["waiver"] = True, w["id"]
                applied.add(w["id"])
                break
            g.setdefault("findings", []).append(f"{w['id']} does not count: {problem}")
    return sorted(applied)


def clause_scores(gates, change, tier):
    by = {g["gate"]: g for g in gates}
    ok = lambda g: g["status"] in ("pass", "warn") or g["waived"]
    required = tier.get("required_reports", [])
    given = [r for r in required if getattr(change, r) is not None]
    b = by["budget"]
    if ok(b):
        budget = 1.0
    else:
        m, t = b["measured"], b["threshold"]
        budget = min(t["max_files"] / max(m["files"], 1), t["max_loc"] / max(m["loc"], 1), 1.0)
    ran = [by[r] for r in REPORT_GATES if by[r]["status"] != "skipped"]
    spec_m, scope_m = by["spec_completeness"]["measured"], by["scope"]["measured"]
    spec_frac = spec_m["filled"] / spec_m["required"] if spec_m["required"] else 1.0
    scope_frac = 1 - scope_m["out_of_scope"] / scope_m["paths"] if scope_m["paths"] else 1.0
    if by["scope"]["waived"]:
        scope_frac = 1.0
    failing = [g for g in gates if g["gate"] in WAIVABLE and g["status"] == "fail"]
    scores = {
        "EVIDENCE_COMPLETENESS": len(given) / len(required) if required else 1.0,
        "BUDGET_ADHERENCE": budget,
        "GATE_INTEGRITY": sum(map(ok, ran)) / len(ran) if ran else 1.0,
        "PROVENANCE_CLARITY": (spec_frac + scope_frac) / 2,
        "WAIVER_JUSTIFICATION": sum(g["waived"] for g in failing) / len(failing) if failing else 1.0,
    }
    return {k: round(scores[k], 4) for k in CLAUSES}


def decide(gates) -> str:
    failing = [g for g in gates if g["status"] == "fail" and not g["waived"]]
    if any(g["gate"] not in WAIVABLE for g in failing):
        return "FAIL"
    return "WAIVER_REQUIRED" if failing else "PASS"


def content_id(obj) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of `obj`."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def evaluate(spec, policy, change: Change, waivers, now: datetime, evidence=None):
    """The verdict (schema `verdict`) on `change` under `spec` and `policy`.

    spec, policy, waivers: schema-valid objects (working_spec, policy, waiver); now: the clock
    waivers are checked against (aware datetime); evidence: the evidence-manifest items of the
    inputs read (default: none besides the spec). Pure: equal inputs give equal verdicts.
    """
    risk = spec["risk_tier"]
    tier = policy["risk_tiers"][str(risk)]
    gates = [spec_gate(spec, tier), budget_gate(change, tier), scope_gate(change, spec),
             tests_gate(change, tier, risk), lint_gate(change, tier, risk),
             coverage_gate(change, tier, risk)]
    applied = apply_waivers(gates, list(waivers), spec, tier, now)
    items = evidence or [{"id": "spec", "kind": "document", "source": spec["id"],
                          "sha256": content_id(spec).split(":")[1]}]
    body = {
        "decision": decide(gates),
        "spec_id": spec["id"],
        "risk_tier": risk,
        "evaluated_at": format_time(now),
        "gates": gates,
        "waivers_applied": applied,
        "clause_scores": clause_scores(gates, change, tier),
        "judge": dict(ENGINE),
        "evidence": {"id": content_id(items), "items": items},
    }
    return {"id": content_id(body), **body}
