"""CAWS gate engine: a working spec, a policy, a diff and the change's reports -> a verdict.

    mlx_student.caws_eval --spec configs/caws/arbiter_gate.yaml --diff change.diff \\
        --junit junit.xml --lint ruff.json --coverage coverage.json \\
        --waivers waivers.yaml --now 2026-11-30T00:00:00Z --out verdict.json --summary verdict.md

Writes the verdict (schema `verdict`: decision PASS | FAIL | WAIVER_REQUIRED, one report per
gate, waivers applied, the five CAWS clause scores, the engine's identity, the evidence read
with sha256, a content-hash id) and a Markdown summary, each atomically. The same inputs and
`--now` give byte-identical files. Exit status: 0 PASS, 1 FAIL, 3 WAIVER_REQUIRED, 2 a bad input
(the message names file, line or JSON path, and field). Gate rules: `arbiter.caws.gates`.
"""

import argparse
import sys
from datetime import datetime, timezone

from mlx_student.config import ConfigError, apply_config
from mlx_student.files import write_json_atomic, write_text_atomic

from ..schemas import validate
from .gates import (
    CLAUSES,
    DEFAULT_POLICY,
    GATES,
    WAIVABLE,
    Change,
    content_id,
    evaluate,
    parse_time,
)
from .inputs import (
    CAWSError,
    load_coverage,
    load_diff,
    load_document,
    load_junit,
    load_lint,
    load_waivers,
    sha256_file,
)
from .report import markdown

__all__ = [
    "CLAUSES",
    "DEFAULT_POLICY",
    "GATES",
    "WAIVABLE",
    "CAWSError",
    "Change",
    "evaluate",
    "main",
    "markdown",
]

EXIT = {"PASS": 0, "FAIL": 1, "WAIVER_REQUIRED": 3}
CONFIG_DEFAULTS = {"spec": None, "policy": None, "diff": None, "junit": None, "lint": None,
                   "coverage": None, "waivers": None, "now": None, "out": "verdict.json",
                   "summary": None}
EVIDENCE = (  # flag, evidence-manifest kind
    ("spec", "document"), ("policy", "document"), ("diff", "diff"), ("junit", "test_report"),
    ("lint", "lint_report"), ("coverage", "coverage_report"), ("waivers", "document"))


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.caws_eval",
        description="Check one change against its CAWS working spec and policy: budgets by "
        "risk tier, scope globs, spec completeness, tests, lint, coverage, waivers.",
        epilog="Exit status: 0 PASS, 1 FAIL, 3 WAIVER_REQUIRED, 2 bad input. Make the inputs "
        "with: git diff BASE > change.diff; pytest --junitxml junit.xml --cov --cov-report "
        "json:coverage.json; ruff check --output-format json > ruff.json.")
    p.add_argument("--config", help="YAML run config (keys as the flags, with _); flags override it")
    p.add_argument("--spec", help="working spec, YAML or JSON (schema working_spec)")
    p.add_argument("--policy", help="policy, YAML or JSON (schema policy); default: the upstream "
                   "CAWS tiers (1: 10 files / 250 LOC / 90%%, 2: 100 / 10000 / 80%%, "
                   "3: 500 / 40000 / 70%%)")
    p.add_argument("--diff", help="unified diff of the change (git diff output)")
    p.add_argument("--junit", help="test report, JUnit XML")
    p.add_argument("--lint", help="lint report, ruff JSON (ruff check --output-format json)")
    p.add_argument("--coverage", help="coverage report, coverage.py JSON (coverage json)")
    p.add_argument("--waivers", help="waivers file (one waiver or a list), YAML or JSON")
    p.add_argument("--now", help="the clock waivers are checked against, ISO 8601 "
                   "(default: the current UTC time; set it for reproducible verdicts)")
    p.add_argument("--out", help=f"verdict JSON (default: {CONFIG_DEFAULTS['out']})")
    p.add_argument("--summary", help="Markdown summary (default: the verdict's path with .md)")
    return p


def _now(text):
    if text is None:
        return datetime.now(timezone.utc).replace(microsecond=0)
    try:
        return parse_time(text)
    except ValueError:
        raise CAWSError(f"--now: {text!r} is not an ISO 8601 time (e.g. 2026-11-30T00:00:00Z)") from None


def run(args) -> dict:
    """Read the inputs named by `args`, evaluate, write the verdict and summary; return the verdict."""
    apply_config(args, CONFIG_DEFAULTS)
    for flag in ("spec", "diff"):
        if getattr(args, flag) is None:
            raise CAWSError(f"--{flag} is required (or `{flag}:` in --config)")
    now = _now(args.now)
    spec = load_document(args.spec, "working_spec")
    policy = load_document(args.policy, "policy") if args.policy else DEFAULT_POLICY
    change = Change(
        files=load_diff(args.diff),
        tests=load_junit(args.junit) if args.junit else None,
        lint=load_lint(args.lint) if args.lint else None,
        coverage=load_coverage(args.coverage) if args.coverage else None)
    waivers = load_waivers(args.waivers) if args.waivers else []
    evidence = [{"id": flag, "kind": kind, "source": str(getattr(args, flag)),
                 "sha256": sha256_file(getattr(args, flag))}
                for flag, kind in EVIDENCE if getattr(args, flag)]
    if not args.policy:
        evidence.insert(1, {"id": "policy", "kind": "document", "source": "builtin:DEFAULT_POLICY",
                            "sha256": content_id(DEFAULT_POLICY).split(":")[1]})
    verdict = validate(evaluate(spec, policy, change, waivers, now, evidence), "verdict",
                       source="the verdict")
    summary = args.summary or str(args.out).removesuffix(".json") + ".md"
    write_json_atomic(args.out, verdict)
    write_text_atomic(summary, markdown(verdict))
    return verdict


def main(argv=None):
    try:
        verdict = run(build_parser().parse_args(argv))
    except (CAWSError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{verdict['decision']}: {verdict['spec_id']} (tier {verdict['risk_tier']}); "
          + ", ".join(f"{g['gate']} {'waived' if g['waived'] else g['status']}"
                      for g in verdict["gates"]) + f"; verdict {verdict['id'][:19]}")
    sys.exit(EXIT[verdict["decision"]])


if __name__ == "__main__":
    main()
