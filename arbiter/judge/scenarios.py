"""CAWS adjudication cases for judge pairs, labelled by the gate engine.

A case is a working spec, a real diff (arbiter.judge.edits over the stdlib), the change's
evidence (test / lint / coverage results) and waivers, at a clock. `arbiter.caws.evaluate`
gives the true verdict; the right candidate is that verdict written out, the wrong one the
same verdict with one mistake of the scenario's kind (a miscounted budget, a missed scope.out
path, a report taken as given, a waiver misjudged, numbers not from the evidence, a gate
bypassed). Each candidate's clause labels compare its claims with the engine's verdict, gate by
gate, so they are right by construction:

    budget status / numbers            -> BUDGET_ADHERENCE
    scope, spec_completeness           -> PROVENANCE_CLARITY (and report numbers not as measured)
    a report claimed given / missing   -> EVIDENCE_COMPLETENESS
    a given report's status, a bypass  -> GATE_INTEGRITY
    which waiver covers which gate     -> WAIVER_JUSTIFICATION
"""

import copy
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import PurePosixPath

from ..caws import CLAUSES, DEFAULT_POLICY, Change, evaluate
from ..caws.gates import REPORT_GATES, decide, format_time, in_scope
from ..caws.inputs import TestSummary, parse_diff
from . import edits

KINDS = ("budget_violation", "scope_violation", "evidence_completeness",
         "waiver_justification", "provenance", "constitutional_bypass")
EPOCH = datetime(2026, 6, 1, tzinfo=timezone.utc)
MODES = ("feature", "refactor", "fix", "chore")


@dataclass
class Case:
    kind: str
    violation: bool  # the scenario's rule is broken in the change (else the mistake is a false alarm)
    spec: dict
    change: Change
    waivers: list
    now: datetime
    diff: str
    file_lines: int  # lines of the touched files, before plus after (a miscount's material)


# ---- building cases -------------------------------------------------------------------------

def _change_files(rng, corpus, n, large=False):
    """n edits, from one folder of the corpus as far as it goes; large: one of them deletes a
    module of over 260 lines (over tier 1's 250-line budget alone)."""
    home = rng.choice(sorted(d for d, fs in corpus.dirs.items() if len(fs) >= max(3, n)))
    pool = list(corpus.dirs[home])
    rng.shuffle(pool)
    others = [f for f in corpus.files if f not in pool]
    picks = (pool + rng.sample(others, max(0, n - len(pool))))[:n]
    ops = [rng.choice(edits.SMALL) for _ in picks]
    if large:
        big = [f for f in pool if len(corpus.lines(f)) > 260] or \
            [f for f in others if len(corpus.lines(f)) > 260]
        picks[0], ops[0] = rng.choice(big), edits.delete_module
        picks = list(dict.fromkeys(picks))
        ops = ops[:len(picks)]
    return home, [op(rng, corpus, rel) for op, rel in zip(ops, picks)]


def _scope_for(home, es):
    """scope.in covering every path the edits touch: the home folder plus any path outside it."""
    base = f"{edits.PREFIX}*.py" if home == "." else f"{edits.PREFIX}{home}/"
    paths = {p for e in es for p in (e.old_path, e.new_path) if p}
    return [base] + sorted(p for p in paths if not in_scope(p, [base]))


def _spec(rng, tier, scope_in, scope_out=(), full=True):
    spec = {"id": f"{rng.choice(['FEAT', 'FIX', 'REF', 'CHORE'])}-{rng.randrange(100, 10000)}",
            "title": "Change to the standard library", "risk_tier": tier, "mode": rng.choice(MODES),
            "scope": {"in": list(scope_in), **({"out": list(scope_out)} if scope_out else {})}}
    if full:
        spec.update({
            "blast_radius": {"modules": [p.strip("/").removeprefix(edits.PREFIX) for p in scope_in][:3],
                             "data_migration": False},
            "operational_rollback_slo": rng.choice(["5m", "15m", "1h"]),
            "invariants": ["public names keep their signatures"],
            "acceptance": [{"id": "A1", "given": "the edited modules", "when": "the tests run",
                            "then": "they pass"}],
            "non_functional": {"security": ["no new network access"]},
            "contracts": [{"type": "python", "path": scope_in[0].rstrip("/")}]})
    return spec


def _tests(rng, es, failures=0):
    names = [f"test_{PurePosixPath(e.path).stem.strip('_')}::test_{i}" for i, e in enumerate(es)]
    n = rng.randrange(max(8, failures + 1), 160)
    skipped = rng.choice([0, 0, 0, 1, 2])
    return TestSummary(n, failures, 0, skipped, tuple(names[:failures]))


def _coverage(rng, tier, below=False):
    need = DEFAULT_POLICY["risk_tiers"][str(tier)]["min_coverage"]
    return round(rng.uniform(need - 15, need - 0.5) if below else rng.uniform(need, 99.5), 1)


def _lint(rng, es, n):
    codes = [("F401", "imported but unused"), ("E501", "Line too long (112 > 100)"),
             ("F841", "Local variable `tmp` is assigned to but never used")]
    return [f"{es[i % len(es)].path}:{rng.randrange(1, 300)}: {c} {m}"
            for i, (c, m) in enumerate(rng.choice(codes) for _ in range(n))]


def _waiver(rng, wid, gates, spec, now, over=None):
    w = {"id": wid, "title": "Time-boxed exception", "reason": rng.choice(["legacy_integration", "other"]),
         "spec_id": spec["id"], "gates": gates, "expiry": format_time(now + timedelta(days=rng.randrange(3, 60))),
         "approvers": ["alice", "bob"], "status": "active"}
    w.update(over or {})
    return w


def make_case(rng, corpus, kind) -> Case:
    """One case of `kind` (KINDS); the violation / false-alarm variant is drawn 70 / 30."""
    violation = kind == "constitutional_bypass" or rng.random() < 0.7
    now = EPOCH + timedelta(days=rng.randrange(365), hours=rng.randrange(24))
    tier = {"budget_violation": 1, "evidence_completeness": rng.choice([1, 2]),
            "waiver_justification": 1}.get(kind, rng.choice([1, 2, 3]))
    budget = DEFAULT_POLICY["risk_tiers"][str(tier)]
    n = rng.randrange(budget["max_files"] + 1, budget["max_files"] + 5) if (
        kind in ("budget_violation", "waiver_justification") and violation and rng.random() < 0.6) \
        else rng.randrange(1, 6)
    large = kind == "budget_violation" and violation and n <= budget["max_files"]
    home, es = _change_files(rng, corpus, n, large)
    scope_in, scope_out = _scope_for(home, es), []
    if kind == "scope_violation" and violation:
        victim = rng.choice(es)
        if rng.random() < 0.5:
            scope_out = [victim.old_path or victim.path]
        else:
            extra = rng.choice([f for f in corpus.files if not in_scope(edits.PREFIX + f, scope_in)])
            es.append(rng.choice(edits.SMALL)(rng, corpus, extra))
    spec = _spec(rng, tier, scope_in, scope_out, full=not (kind == "provenance" and rng.random() < 0.3))
    reports = {"tests": _tests(rng, es), "lint": [], "coverage": _coverage(rng, tier)}
    if kind == "evidence_completeness" and violation:
        del reports[rng.choice(budget["required_reports"])]
    if kind == "constitutional_bypass":
        if rng.random() < 0.6:
            reports["tests"] = _tests(rng, es, failures=rng.randrange(1, 4))
        else:
            reports["lint"] = _lint(rng, es, rng.randrange(1, 4))
    waivers = []
    if kind == "waiver_justification":
        waivers = _waiver_case(rng, spec, es, reports, budget, now, violation)
    diff = "".join(edits.to_diff(e) for e in es)
    change = Change(files=parse_diff(diff), tests=reports.get("tests"), lint=reports.get("lint"),
                    coverage=reports.get("coverage"))
    file_lines = sum(len(e.old) + len(e.new) for e in es)
    return Case(kind, violation, spec, change, waivers, now, diff, file_lines)


def _waiver_case(rng, spec, es, reports, budget, now, invalid):
    """A failing waivable gate and one waiver for it: valid, or invalid in one drawn way."""
    over_budget = len(es) > budget["max_files"]
    gate = "budget" if over_budget else rng.choice(["coverage", "lint"])
    if gate == "coverage":
        reports["coverage"] = _coverage(rng, spec["risk_tier"], below=True)
    elif gate == "lint":
        reports["lint"] = _lint(rng, es, rng.randrange(1, 4))
    wid = f"WV-{rng.randrange(1, 10000):04d}"
    if not invalid:
        return [_waiver(rng, wid, [gate], spec, now)]
    how = rng.choice(["expired", "revoked", "approvers", "spec", "gate"])
    over = {"expired": {"expiry": format_time(now - timedelta(days=rng.randrange(1, 30)))},
            "revoked": {"status": "revoked"}, "approvers": {"approvers": ["alice"]},
            "spec": {"spec_id": f"FEAT-{rng.randrange(10, 99)}"},
            "gate": {"gates": [g for g in ("scope", "lint", "coverage") if g != gate][:1]}}[how]
    return [_waiver(rng, wid, [gate], spec, now, over)]


def truth(case: Case) -> dict:
    return evaluate(case.spec, DEFAULT_POLICY, case.change, case.waivers, case.now)


# ---- the wrong candidate --------------------------------------------------------------------

def _claim(verdict):
    return {"decision": verdict["decision"], "gates": copy.deepcopy(verdict["gates"]),
            "waivers_applied": list(verdict["waivers_applied"]), "bypass": None}


def _flip(g, summary, findings=None, measured=None):
    g["status"] = "pass" if g["status"] in ("fail", "skipped") else "fail"
    g["summary"] = summary
    g["findings"] = findings or []
    if measured is not None:
        g["measured"] = measured
    if g["status"] == "pass":
        g["waived"] = False
        g.pop("waiver", None)


def mistake(rng, case: Case, verdict: dict) -> dict:
    """The verdict as a candidate gets it wrong in the case's way; the decision follows its gates."""
    c = _claim(verdict)
    g = {x["gate"]: x for x in c["gates"]}
    tier = DEFAULT_POLICY["risk_tiers"][str(case.spec["risk_tier"])]
    files = case.change.files
    if case.kind == "budget_violation":
        b = g["budget"]
        if b["status"] == "fail":  # counts only added lines of modified files
            kept = [f for f in files if f.status == "modified"]
            n, loc = len(kept), sum(f.added for f in kept)
        else:  # counts whole files, before and after, instead of the lines changed
            n, loc = len(files), case.file_lines
        _flip(b, f"{n} file(s), {loc} line(s) changed (limits {tier['max_files']} / {tier['max_loc']})",
              measured={**b["measured"], "files": n, "loc": loc})
    elif case.kind == "scope_violation":
        s = g["scope"]
        paths = sorted({p for f in files for p in f.paths})
        if s["status"] == "fail":
            _flip(s, f"all {len(paths)} path(s) in scope", measured={"paths": len(paths), "out_of_scope": 0})
        else:
            p = rng.choice(paths)
            _flip(s, f"1 of {len(paths)} path(s) out of scope", [f"{p}: matches no scope.in glob"],
                  {"paths": len(paths), "out_of_scope": 1})
    elif case.kind == "evidence_completeness":
        missing = [r for r in REPORT_GATES if "measured" not in g[r] and g[r]["status"] == "fail"]
        if missing:
            r = g[missing[0]]
            r.update(status="pass", summary={"tests": "all 24 passed", "lint": "0 finding(s)",
                                             "coverage": f"{tier['min_coverage'] + 4}.00% covered"}[r["gate"]])
            r["measured"] = {"assumed": True}
        else:
            r = g[rng.choice([x for x in REPORT_GATES if x in tier["required_reports"]])]
            r.update(status="fail", summary=f"report required at tier {case.spec['risk_tier']} but not given")
            r.pop("measured", None)
    elif case.kind == "waiver_justification":
        w = case.waivers[0]
        failing = [x for x in c["gates"] if x["status"] == "fail" and x["gate"] in ("budget", "coverage", "lint")]
        target = next((x for x in failing if x["gate"] in w["gates"]), failing[0])
        if target["waived"]:
            target.update(waived=False, findings=[f"{w['id']} does not count: expired"])
            target.pop("waiver")
            c["waivers_applied"] = []
        else:
            target.update(waived=True, waiver=w["id"], findings=[])
            c["waivers_applied"] = [w["id"]]
    elif case.kind == "provenance":
        sc = g["spec_completeness"]
        if sc["status"] == "fail":
            req = sc["measured"]["required"]
            _flip(sc, f"all {req} required field(s) filled", measured={"required": req, "filled": req})
        else:
            t = g["tests"]
            m = t["measured"]
            extra = rng.randrange(5, 40)
            t["measured"] = {**m, "tests": m["tests"] + extra}
            t["summary"] = t["summary"].replace(str(m["tests"] - m["skipped"]) if m["skipped"] else str(m["tests"]),
                                                str(m["tests"] - m["skipped"] + extra), 1)
    elif case.kind == "constitutional_bypass":
        t = g["tests"] if g["tests"]["status"] == "fail" else g["lint"]
        n = t["measured"]["failures"] + t["measured"]["errors"] if t["gate"] == "tests" else t["measured"]["findings"]
        how = (f"{n} failing case(s) marked xfail to unblock the merge" if t["gate"] == "tests"
               else f"{n} finding(s) silenced with # noqa")
        t.update(status="pass", summary=f"pass after a fix-up: {how}", findings=[])
        c["bypass"] = how
    c["decision"] = decide(c["gates"])
    return c


def clause_labels(claim: dict, verdict: dict) -> dict:
    """1 for each clause where `claim` agrees with the engine's `verdict`, else 0."""
    ok = dict.fromkeys(CLAUSES, 1)
    truth_g = {g["gate"]: g for g in verdict["gates"]}
    for g in claim["gates"]:
        t = truth_g[g["gate"]]
        if (g["waived"], g.get("waiver")) != (t["waived"], t.get("waiver")):
            ok["WAIVER_JUSTIFICATION"] = 0
        same_status, same_numbers = g["status"] == t["status"], g.get("measured") == t.get("measured")
        if g["gate"] == "budget" and not (same_status and same_numbers):
            ok["BUDGET_ADHERENCE"] = 0
        elif g["gate"] in ("scope", "spec_completeness") and not (same_status and same_numbers):
            ok["PROVENANCE_CLARITY"] = 0
        elif g["gate"] in REPORT_GATES:
            if ("measured" in g) != ("measured" in t):
                ok["EVIDENCE_COMPLETENESS"] = 0
            elif not same_status:
                ok["GATE_INTEGRITY"] = 0
            elif not same_numbers:
                ok["PROVENANCE_CLARITY"] = 0
    if sorted(claim["waivers_applied"]) != sorted(verdict["waivers_applied"]):
        ok["WAIVER_JUSTIFICATION"] = 0
    if claim.get("bypass"):
        ok["GATE_INTEGRITY"] = 0
    return ok


# ---- text -----------------------------------------------------------------------------------

def _listing(items, k):
    return ", ".join(items[:k]) + (f" (+{len(items) - k} more)" if len(items) > k else "")


def render_prompt(case: Case) -> str:
    """The judge's prompt: task, spec with the tier's policy, diff stat and excerpt, evidence,
    waivers and clock; short enough for 512 tokens with a candidate (the manifest reports)."""
    s, tier = case.spec, DEFAULT_POLICY["risk_tiers"][str(case.spec["risk_tier"])]
    filled = [f for f in tier["required_spec_fields"] if s.get(f)]
    files = case.change.files
    out_of = f"; scope.out: {_listing(s['scope']['out'], 5)}" if s["scope"].get("out") else ""
    out = ["Adjudicate this change under CAWS: PASS, FAIL or WAIVER_REQUIRED, gate by gate.",
           (f"Spec {s['id']} ({s['mode']}), risk tier {s['risk_tier']}: budget "
            f"{tier['max_files']} files / {tier['max_loc']} lines, coverage >= "
            f"{tier['min_coverage']}%, reports required: {', '.join(tier['required_reports'])}; "
            f"spec fields {len(filled)}/{len(tier['required_spec_fields'])} filled."),
           f"scope.in: {_listing(s['scope']['in'], 5)}{out_of}",
           f"Diff: {len(files)} file(s), +{sum(f.added for f in files)} -{sum(f.removed for f in files)}"]
    for f in files[:6]:
        name = f"{f.old_path} -> {f.path}" if f.old_path else f.path
        out.append(f" {f.status[0].upper()} {name} +{f.added} -{f.removed}")
    if len(files) > 6:
        out.append(f" ... {len(files) - 6} more file(s)")
    hunk = [line for line in case.diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    out += ["Excerpt:"] + [f" {line[:64]}" for line in hunk[:2]]
    ch = case.change
    t = ch.tests
    out.append("Evidence: " + "; ".join([
        f"tests {t.tests} run, {t.failures} failed, {t.errors} errored, {t.skipped} skipped"
        + (f" ({', '.join(t.failed[:2])})" if t.failed else "") if t else "tests: no report",
        f"lint {len(ch.lint)} finding(s)" if ch.lint is not None else "lint: no report",
        f"coverage {ch.coverage}%" if ch.coverage is not None else "coverage: no report"]))
    for w in case.waivers:
        out.append(f"Waiver {w['id']} for {w.get('spec_id', 'any spec')}: gates {', '.join(w['gates'])}, "
                   f"{w['status']}, expires {w['expiry']}, {len(w['approvers'])} approver(s)")
    out.append(f"Now: {format_time(case.now)}")
    return "\n".join(out)


def render_candidate(claim: dict, style: str) -> str:
    """A candidate verdict in words: 'full' (a line per gate) or 'terse' (grouped); same facts."""
    gates = claim["gates"]
    label = lambda g: "waived by " + g["waiver"] if g["waived"] else g["status"]
    notes = [f[:70] for g in gates for f in g.get("findings", [])[:1]]
    applied = ", ".join(claim["waivers_applied"]) or "none"
    if style == "full":
        lines = [f"Decision: {claim['decision']}"]
        lines += [f"- {g['gate']}: {label(g)}; {g['summary']}" for g in gates]
        lines += [f"  {n}" for n in notes] + [f"Waivers applied: {applied}."]
        return "\n".join(lines)
    groups = {}
    for g in gates:
        groups.setdefault(label(g), []).append(f"{g['gate']} ({g['summary']})")
    body = " ".join(f"{k[0].upper() + k[1:]}: {'; '.join(v)}." for k, v in sorted(groups.items()))
    tail = f" Notes: {' | '.join(notes)}." if notes else ""
    return f"{claim['decision']}. {body}{tail} Waivers applied: {applied}."


def pair_of(rng, case: Case, tie: bool) -> dict:
    """(prompt, right text, wrong text, right labels, wrong labels, margin) for one case;
    `tie`: the 'wrong' side is the right verdict in the other style."""
    verdict = truth(case)
    right = _claim(verdict)
    style = rng.choice(["full", "terse"])
    other = "terse" if style == "full" else "full"
    wrong = right if tie else mistake(rng, case, verdict)
    right_l, wrong_l = clause_labels(right, verdict), clause_labels(wrong, verdict)
    texts = render_candidate(right, style), render_candidate(wrong, other if tie else rng.choice(["full", "terse"]))
    if not tie and (texts[0] == texts[1] or right_l == wrong_l):
        raise AssertionError(f"{case.kind}: the mistake left the verdict unchanged")
    return {"prompt": render_prompt(case), "right": texts[0], "wrong": texts[1],
            "right_clauses": right_l, "wrong_clauses": wrong_l,
            "margin": float(sum(right_l.values()) - sum(wrong_l.values())),
            "decision": verdict["decision"]}
