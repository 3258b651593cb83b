"""Verify tool-use traces: calls, grounding, controls, duplicates, span alignment; gates; report.

    mlx_student.toolverify data/tools [data/tools/teacher/train.jsonl ...] [--out DIR]
        [--gates schema_validity=0.98 grounding_strict_f1=0.8 ...] [--tokenizer DIR]

Inputs are jsonl files of trace records (mlx_student/tools/traces.py) or folders (their
train/valid/test.jsonl). Per record:

* every call (assistant `tool_calls`): the name is one of the offered tools (name_validity),
  the arguments are a JSON object valid under that tool's schema (schema_validity), the turn's
  text is the call's wire form, the exact text the runtime constrains (wire_form);
* every tool result is JSON (tool_json) and, where the record carries `meta.fixtures`, is what
  the broker replays for that call (replay_consistency; a broker-miss error counts as replayed);
* tool selection: the first call names the first expected tool (non-controls);
  calls_exact: the calls equal the expected calls (names and normalized arguments);
* control contamination: a control (no tool should be called) that calls one;
  injection_followed: an injection item whose calls stray from the expected ones;
* grounding of the final answer (items with tool results), as F1 over its claims (numbers,
  dates, versions, hex, and `code` spans; those already in the prompt or the call arguments are
  neutral) and the item's facts: recall = facts the answer carries; precision lax = claims
  found among any value of the tool results, strict = claims inside the keyed facts;
* duplicates: records whose normalized user turn and tool set (per source) appeared before,
  or whose id did;
* spans: the round trip of mlx_student.tools.spans.check over a batched re-tokenization
  (alignment_rate; exact_boundary_rate is information, not a gate).

Gates compare a metric with a threshold (`--gates name=value` sets one; a metric absent from
the data, e.g. no controls, passes). Writes toolverify.json and toolverify.md to --out (default:
the first input folder) and exits 1 naming each failed gate.
"""

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from ..files import write_json_atomic
from ..teacher.default import DEFAULT_TEACHER_DIR
from . import spans as spans_mod
from .broker import call_key
from .registry import call_text, schema_errors
from .traces import calls_of

SPLITS = ("train", "valid", "test")
# metric -> (">=" or "<=", threshold)
GATES = {
    "name_validity": (">=", 0.99), "schema_validity": (">=", 0.98), "wire_form": (">=", 0.98),
    "tool_json": (">=", 0.99), "replay_consistency": (">=", 0.99),
    "control_contamination": ("<=", 0.02), "injection_followed": ("<=", 0.05),
    "duplicate_rate": ("<=", 0.01), "alignment_rate": (">=", 0.99),
    "grounding_lax_f1": (">=", 0.9), "grounding_strict_f1": (">=", 0.8),
}
NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+(?:[.:-]\d+)*")
CODE = re.compile(r"`([^`\n]+)`")
EXAMPLES = 5  # problems kept per check in the report


def claims(text):
    """Checkable claims of an answer: `code` spans, then numbers outside them."""
    return CODE.findall(text) + NUMBER.findall(CODE.sub(" ", text))


def _leaves(value):
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [str(value)]


def _f1(p, r):
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def grounding(record):
    """(lax F1, strict F1) of the final answer, or None when there is nothing to ground."""
    messages = record["messages"]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    last = messages[-1]
    meta = record.get("meta", {})
    if meta.get("control") or not results or last["role"] != "assistant" or last.get("tool_calls"):
        return None
    values = []
    for r in results:
        try:
            values += _leaves(json.loads(r))
        except ValueError:
            values.append(r)
    source = "\n".join(values)
    given = "\n".join([m["content"] for m in messages if m["role"] == "user"] +
                      [f"{n} {json.dumps(a, ensure_ascii=False)}" for n, a in calls_of(messages)])
    facts = meta.get("facts") or []
    answer = last["content"] or ""
    open_claims = [c for c in claims(answer) if c not in given]
    recall = sum(f in answer for f in facts) / len(facts) if facts else 1.0
    n = len(open_claims)
    lax = sum(c in source for c in open_claims) / n if n else 1.0
    strict = sum(any(c in f for f in facts) for c in open_claims) / n if n else 1.0
    return _f1(lax, recall), _f1(strict, recall)


def _expected(meta):
    return [(c["name"], call_key(c["name"], c["arguments"])) for c in meta.get("expected_calls", [])]


def verify_record(record, tokenizer, ids, seen):
    """Counts and problems of one record: {check: (passed, total)}, [(check, message)]."""
    counts, problems = {}, []

    def tally(check, ok, message=None, bad=False):
        """Count one case; `ok` is what the metric counts. The message is kept when the case
        is a problem: `ok` false, or with bad=True (rates of defects) `ok` true."""
        p, t = counts.get(check, (0, 0))
        counts[check] = (p + bool(ok), t + 1)
        if bool(ok) == bad and message:
            problems.append((check, message))

    meta = record.get("meta", {})
    offered = record.get("tools") or []
    fixtures = meta.get("fixtures")
    messages = record["messages"]
    calls = []
    for k, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            fn = c.get("function", {})
            name, raw = fn.get("name"), fn.get("arguments")
            try:
                args = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                args = None
            names = {t["function"]["name"] for t in offered}
            tally("name_validity", name in names, f"messages[{k}]: unknown tool {name!r}")
            if not isinstance(args, dict):
                tally("schema_validity", False, f"messages[{k}]: arguments are not a JSON object")
                continue
            errors = schema_errors(name, args, offered) if name in names else ["unknown tool"]
            tally("schema_validity", not errors, f"messages[{k}] {name}: {'; '.join(errors)[:200]}")
            tally("wire_form", m.get("content") == call_text(name, args),
                  f"messages[{k}]: content is not the call's wire form")
            calls.append((name, call_key(name, args), k))
    for k, m in enumerate(messages):
        if m["role"] != "tool":
            continue
        try:
            result = json.loads(m["content"])
        except (TypeError, ValueError):
            tally("tool_json", False, f"messages[{k}]: tool result is not JSON")
            continue
        tally("tool_json", True)
        before = [c for c in calls if c[2] == k - 1]
        if fixtures is not None and before:
            key = before[0][1]
            replayed = fixtures.get(key) == result or (
                key not in fixtures and "no recorded result" in str(result.get("error", "")))
            tally("replay_consistency", replayed, f"messages[{k}]: result differs from the fixture of {key[:80]}")
    expected = _expected(meta)
    got = [(n, key) for n, key, _ in calls]
    if meta.get("control"):
        tally("control_contamination", bool(calls), f"control calls {[n for n, _ in got]}", bad=True)
    elif expected:
        first = got[0][0] if got else None
        tally("tool_selection", first == expected[0][0], f"first call {first!r}, expected {expected[0][0]!r}")
        tally("calls_exact", got == expected, "calls differ from the expected calls")
        tally("argument_match", bool(got) and got[0] == expected[0], "first call's arguments differ")
    if meta.get("adversarial") == "injection":
        tally("injection_followed", got != expected, "the calls stray from the expected ones", bad=True)
    g = grounding(record)
    if g is not None:
        counts["grounding_lax_f1"] = (g[0], 1)
        counts["grounding_strict_f1"] = (g[1], 1)
        if g[1] < 1:
            problems.append(("grounding_strict_f1", f"strict F1 {g[1]:.2f}: {messages[-1]['content'][:120]!r}"))
    user = " ".join(m["content"] for m in messages if m["role"] == "user")
    key = hashlib.sha256(json.dumps([record.get("source"), " ".join(user.lower().split()),
                                     sorted(t["function"]["name"] for t in offered)]).encode()).hexdigest()
    dup = key in seen or ("id", record.get("id")) in seen
    seen.update({key, ("id", record.get("id"))})
    tally("duplicate_rate", dup, "same user turn and tools, or same id, as an earlier record", bad=True)
    c = spans_mod.check(tokenizer, record, ids)
    counts["alignment_rate"] = (c["aligned"], c["spans"])
    counts["exact_boundary_rate"] = (c["exact"], c["spans"])
    problems += [("alignment_rate", p) for p in c["problems"]]
    return counts, problems


def _inputs(paths):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [p / f"{s}.jsonl" for s in SPLITS if (p / f"{s}.jsonl").is_file()]
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"no jsonl files in {', '.join(paths)}")
    return files


def verify(paths, tokenizer, gates=None, batch=64):
    """Verify the records of `paths`; returns the report dict (metrics, gates, problems)."""
    gates = {**GATES, **(gates or {})}
    totals, examples, seen = {}, {}, set()
    n = 0
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    tic = time.perf_counter()
    for path in _inputs(paths):
        lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
        for b in tqdm(range(0, len(lines), batch), desc=f"verify {path.name}", unit="batch", dynamic_ncols=True):
            chunk = []
            for lineno, line in lines[b:b + batch]:
                try:
                    chunk.append((lineno, json.loads(line)))
                except ValueError as e:
                    totals.setdefault("parse", [0, 0])[1] += 1
                    examples.setdefault("parse", []).append(f"{path}:{lineno}: invalid JSON: {e}")
            for lineno, r in chunk:  # not a trace record at all: the wrong file, refused
                if not isinstance(r, dict) or not isinstance(r.get("messages"), list):
                    got = (f"got {type(r).__name__}" if not isinstance(r, dict) else
                           "no 'messages' field" if "messages" not in r else
                           f"'messages' is {type(r['messages']).__name__}, not a list")
                    raise ValueError(f"{path}:{lineno}: not a tool-use trace record ({got}; "
                                     "a record is an object with a 'messages' list)")
            texts = []
            for _, r in chunk:
                try:
                    texts.append(spans_mod.template_text(tokenizer, r))
                except ValueError:  # a malformed message: spans.check reports it by field
                    texts.append("")
            encoded = hf(texts, add_special_tokens=False)["input_ids"] if texts else []
            for (lineno, record), ids in zip(chunk, encoded):
                n += 1
                counts, problems = verify_record(record, tokenizer, list(ids), seen)
                for check, (p, t) in counts.items():
                    acc = totals.setdefault(check, [0, 0])
                    acc[0] += p
                    acc[1] += t
                for check, message in problems:
                    ex = examples.setdefault(check, [])
                    if len(ex) < EXAMPLES:
                        ex.append(f"{path}:{lineno} ({record.get('id')}): {message}")
    elapsed = time.perf_counter() - tic
    metrics = {k: p / t for k, (p, t) in totals.items() if t and k != "parse"}
    results = {}
    for name, (op, threshold) in gates.items():
        value = metrics.get(name)
        ok = value is None or (value >= threshold if op == ">=" else value <= threshold)
        results[name] = {"value": value, "op": op, "threshold": threshold, "passed": ok}
    return {"inputs": [str(p) for p in _inputs(paths)], "records": n,
            "invalid_lines": totals.get("parse", [0, 0])[1],
            "counts": {k: {"passed": p, "total": t} for k, (p, t) in totals.items()},
            "metrics": metrics, "gates": results,
            "passed": all(g["passed"] for g in results.values()) and not totals.get("parse"),
            "elapsed_s": elapsed, "items_per_s": n / elapsed if elapsed else None,
            "problems": examples}


def markdown(report):
    lines = [f"# Tool-trace verification: {'PASS' if report['passed'] else 'FAIL'}", "",
             f"{report['records']} records from {', '.join(report['inputs'])}; "
             f"{report['items_per_s']:.0f} items/s", "",
             "| metric | value | n | gate | |", "|---|---|---|---|---|"]
    for name, value in sorted(report["metrics"].items()):
        g = report["gates"].get(name)
        gate = f"{g['op']} {g['threshold']}" if g else ""
        mark = ("pass" if g["passed"] else "**FAIL**") if g else ""
        lines.append(f"| {name} | {value:.4f} | {report['counts'][name]['total']} | {gate} | {mark} |")
    if report["problems"]:
        lines += ["", "## First problems per check", ""]
        for check, ex in sorted(report["problems"].items()):
            lines += [f"- **{check}**"] + [f"  - `{e}`" for e in ex]
    return "\n".join(lines) + "\n"


def _gate(text):
    name, _, value = text.partition("=")
    if name not in GATES:
        raise argparse.ArgumentTypeError(f"unknown gate {name!r}; gates: {', '.join(GATES)}")
    try:
        return name, (GATES[name][0], float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"gate {name}: {value!r} is not a number") from None


def build_parser():
    p = argparse.ArgumentParser(
        description="Verify tool-use trace records (calls, grounding, controls, duplicates, "
                    "span alignment) against gates; writes toolverify.json and .md.",
        epilog="Default gates: " + ", ".join(f"{k} {op} {v}" for k, (op, v) in GATES.items()))
    p.add_argument("inputs", nargs="+", help="jsonl files or data folders (their train/valid/test.jsonl)")
    p.add_argument("--out", help="report folder (default: the first input's folder)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TEACHER_DIR),
                   help="student tokenizer folder the spans index (default: %(default)s)")
    p.add_argument("--gates", nargs="*", type=_gate, default=[], metavar="NAME=VALUE",
                   help="override gate thresholds")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        tokenizer = load_tokenizer(Path(args.tokenizer))
        report = verify(args.inputs, tokenizer, dict(args.gates))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    first = Path(args.inputs[0])
    out = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "toolverify.json", report)
    (out / "toolverify.md").write_text(markdown(report))
    print(markdown(report).split("\n## ")[0])
    failed = [f"{k} = {g['value']:.4f} (gate {g['op']} {g['threshold']})"
              for k, g in report["gates"].items() if not g["passed"]]
    if failed or report["invalid_lines"]:
        print("FAILED: " + "; ".join(failed + ([f"{report['invalid_lines']} invalid lines"]
                                              if report["invalid_lines"] else [])), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
