"""The Markdown summary of a CAWS verdict: decision, gate table, clause scores, findings, evidence."""

MARK = {"pass": "pass", "warn": "warn", "skipped": "skipped", "fail": "**fail**"}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(verdict: dict) -> str:
    """A deterministic Markdown rendering of `verdict` (schema `verdict`)."""
    v = verdict
    out = [f"# CAWS verdict: {v['decision']}", "",
           (f"Spec `{v['spec_id']}`, risk tier {v['risk_tier']}; evaluated at {v['evaluated_at']} "
            f"by {v['judge']['name']} v{v['judge']['version']} ({v['judge']['kind']})."),
           f"Verdict id `{v['id']}`.", "",
           "| gate | status | waiver | summary |", "|---|---|---|---|"]
    for g in v["gates"]:
        out.append(f"| {g['gate']} | {MARK[g['status']]} | {g.get('waiver', '')} | "
                   f"{_cell(g['summary'])} |")
    out += ["", f"Waivers applied: {', '.join(v['waivers_applied']) or 'none'}.", "",
            "| clause | score |", "|---|---|"]
    out += [f"| {c} | {s:.4f} |" for c, s in v["clause_scores"].items()]
    findings = [g for g in v["gates"] if g.get("findings")]
    if findings:
        out += ["", "## Findings"]
        for g in findings:
            out += ["", f"### {g['gate']}", ""] + [f"- {_cell(f)}" for f in g["findings"]]
    out += ["", "## Evidence", "", "| id | kind | source | sha256 |", "|---|---|---|---|"]
    out += [f"| {i['id']} | {i['kind']} | `{_cell(i['source'])}` | `{i.get('sha256', '')[:16]}` |"
            for i in v["evidence"]["items"]]
    return "\n".join(out) + "\n"
