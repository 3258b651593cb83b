"""Make the judge's pair data: CAWS adjudication pairs, KD corruption pairs, imported rows.

    mlx_student.judge_data --out data/judge --num-pairs 1200 [--kd data/kd] [--import seed.jsonl]

Generated pairs (`source: generated`): the six scenario kinds of arbiter.judge.scenarios
(budget_violation, scope_violation, evidence_completeness, waiver_justification, provenance,
constitutional_bypass) in turn, each over a real diff of real standard-library files, with the
right and wrong verdicts and their clause labels from the CAWS gate engine; the right one is
in position a or b alternately; `--tie-fraction` of them are ties (the right verdict twice,
written two ways). KD corruption pairs (`source: kd_corruption`, scenario kd_<kind>): a KD
record's completion beats itself truncated, with its numbers perturbed, negated, or another
record's completion (swapped); the corrupted side loses EVIDENCE_COMPLETENESS (truncated,
swapped) or PROVENANCE_CLARITY (perturbed, negated, swapped). Imported rows (`--import`, the
seed's {id, prompt, a: {text, clauses}, b, winner}; clauses as a dict of 0/1 or a list of the
clauses honoured) are checked and kept (`source: imported`).

Output: `<out>/{train,valid,test}.jsonl` (schema `judge_pair`), `<out>/trl_<split>.jsonl`
(TRL preference columns prompt / chosen / rejected / margin; ties left out) and
`<out>/manifest.json` (counts, token-length distribution under `--tokenizer`, inputs), written
together atomically. A row's split follows from the sha256 of its prompt alone, so a prompt is
never in two splits. The same inputs give byte-identical files. Rows whose longer candidate, as
the judge reads it (`judge_tokens`), exceeds `--max-tokens` are dropped and counted.
"""

import argparse
import hashlib
import json
import platform
import random
import re
import sys
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from mlx_student import run_settings
from mlx_student.config import ConfigError, apply_config
from mlx_student.files import atomic_dir, jsonl_records
from mlx_student.teacher.default import DEFAULT_TEACHER_DIR
from mlx_student.teacher.prompts import split_of

from ..caws import CLAUSES
from ..schemas import SchemaError, validate
from . import edits, scenarios
from .model import SEPARATOR

SPLITS = ("train", "valid", "test")
KD_KINDS = ("truncated", "numbers_perturbed", "negated", "swapped")
KD_LOSES = {"truncated": ("EVIDENCE_COMPLETENESS",), "numbers_perturbed": ("PROVENANCE_CLARITY",),
            "negated": ("PROVENANCE_CLARITY",), "swapped": ("EVIDENCE_COMPLETENESS", "PROVENANCE_CLARITY")}
CONFIG_DEFAULTS = {
    "out": "data/judge", "num_pairs": 1200, "seed": 0, "source": None, "kd": [], "kd_pairs": 400,
    "imports": [], "tie_fraction": 0.05, "valid_fraction": 0.1, "test_fraction": 0.1,
    "tokenizer": str(DEFAULT_TEACHER_DIR), "max_tokens": 512,
}
NEGATABLE = re.compile(r"\b(is|are|was|were|can|will|does|do|should|must|has|have)\b( not\b)?")


def judge_tokens(tok: Tokenizer, prompt: str, candidate: str) -> int:
    """Tokens the judge reads for one candidate before any cut (`arbiter.judge.model.encode`):
    the prompt, the separator + candidate, and eos."""
    return (len(tok.encode(prompt, add_special_tokens=False).ids)
            + len(tok.encode(SEPARATOR + candidate, add_special_tokens=False).ids) + 1)


class DataError(ValueError):
    """A bad input to the pair generator; the message names file, line and field."""


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.judge_data",
        description="Make judge pairs: CAWS adjudication pairs over real stdlib diffs (labelled "
        "by the gate engine), corruption pairs from KD records, imported seed rows.",
        epilog="Rows: {id, scenario, prompt, a: {text, clauses}, b, winner, margin, source}; "
        "splits by prompt hash. scenario kinds: " + ", ".join(scenarios.KINDS))
    d = CONFIG_DEFAULTS

    def add(flag, help, dest=None, **kw):
        key = dest or flag[2:].replace("-", "_")
        p.add_argument(flag, dest=key, help=f"{help} (default: {d[key]})", **kw)

    p.add_argument("--config", help="YAML run config (keys as the flags, with _); flags override it")
    add("--out", "output folder")
    add("--num-pairs", "generated CAWS pairs (the six kinds in turn)", type=int)
    add("--seed", "seed of every random choice", type=int)
    add("--source", "folder of .py files to edit; none: the installed standard library")
    add("--kd", "KD record files or folders ({train,valid,test}.jsonl with messages and "
        "completion); repeat for more", action="append")
    add("--kd-pairs", "corruption pairs at most, from the KD records", type=int)
    add("--import", "seed pair rows (jsonl) {id, prompt, a, b, winner: a|b|tie}, a and b each "
        "{text, clauses}: clauses the list of CAWS clause names the candidate honours (or "
        "{name: 0|1} for all five); repeat for more",
        dest="imports", action="append")
    add("--tie-fraction", "share of generated pairs that are ties", type=float)
    add("--valid-fraction", "share of prompts in valid.jsonl (by prompt hash)", type=float)
    add("--test-fraction", "share of prompts in test.jsonl (by prompt hash)", type=float)
    add("--tokenizer", "folder with tokenizer.json whose token counts the manifest reports "
        "and --max-tokens applies; '' for none")
    add("--max-tokens", "drop rows whose longer candidate, as the judge reads it (prompt + "
        "separator + candidate + eos), exceeds this many tokens: the judge's max_length", type=int)
    return p


def _row(scenario, source, prompt, right, wrong, right_l, wrong_l, winner, margin):
    """A pair row with the right side at `winner` ('a' or 'b'; 'tie': right is a)."""
    a, b = ((right, right_l), (wrong, wrong_l)) if winner != "b" else ((wrong, wrong_l), (right, right_l))
    body = {"scenario": scenario, "prompt": prompt, "a": {"text": a[0], "clauses": a[1]},
            "b": {"text": b[0], "clauses": b[1]}, "winner": winner, "margin": margin, "source": source}
    key = json.dumps([prompt, a[0], b[0]], ensure_ascii=False)
    return {"id": f"{source[:3]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}", **body}


def generated_pairs(n, seed, tie_fraction, source=None):
    """n CAWS adjudication pair rows, kinds in turn, winner positions alternating per kind."""
    try:
        corpus = edits.Corpus(source)
    except ValueError as e:  # too few usable files
        raise DataError(f"--source: {e}") from None
    rows = []
    for i in tqdm(range(n), desc="CAWS pairs", unit="pair", disable=n < 50):
        kind = scenarios.KINDS[i % len(scenarios.KINDS)]
        rng = random.Random(f"{seed}:caws:{i}")
        tie = rng.random() < tie_fraction
        p = scenarios.pair_of(rng, scenarios.make_case(rng, corpus, kind), tie)
        winner = "tie" if tie else "ab"[(i // len(scenarios.KINDS)) % 2]
        rows.append(_row(kind, "generated", p["prompt"], p["right"], p["wrong"], p["right_clauses"],
                         p["wrong_clauses"], winner, 0.0 if tie else p["margin"]))
    return rows


def _kd_files(paths):
    files = []
    for p in map(Path, paths):
        files += [p / f"{s}.jsonl" for s in SPLITS if (p / f"{s}.jsonl").exists()] if p.is_dir() else [p]
    return files


def read_kd(paths) -> list:
    """(prompt text, completion) of every KD record in `paths`, in file order."""
    out = []
    for path in _kd_files(paths):
        for n, rec in jsonl_records(path, DataError):
            msgs, completion = rec.get("messages"), rec.get("completion")
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
                raise DataError(f"{path}:{n}: messages: expected a list of {{role, content}}")
            if not isinstance(completion, str) or not completion.strip():
                raise DataError(f"{path}:{n}: completion: expected a non-empty string")
            prompt = "\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in msgs)
            out.append((prompt, completion.strip()))
    return out


def corrupt(rng, kind, text, other):
    """`text` corrupted in way `kind` (KD_KINDS), or None where it does not apply."""
    if kind == "truncated":
        words = text.split(" ")
        return " ".join(words[:max(1, int(len(words) * rng.uniform(0.3, 0.6)))]) if len(words) >= 8 else None
    if kind == "numbers_perturbed":
        if not re.search(r"\d", text):
            return None
        return re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randrange(1, 10)), text)
    if kind == "negated":
        m = NEGATABLE.search(text)
        if not m:
            return None
        flipped = m.group(1) if m.group(2) else m.group(1) + " not"
        return text[:m.start()] + flipped + text[m.end():]
    return other if other != text else None


def kd_pairs(records, limit, seed):
    """Corruption pair rows from KD records: kinds in turn, winner positions alternating."""
    rows = []
    for i, (prompt, completion) in enumerate(records):
        if len(rows) >= limit:
            break
        rng = random.Random(f"{seed}:kd:{i}")
        kind = KD_KINDS[i % len(KD_KINDS)]
        other = records[(i + 1 + rng.randrange(max(1, len(records) - 1))) % len(records)][1]
        bad = corrupt(rng, kind, completion, other)
        if bad is None or bad == completion:
            continue
        lost = {c: int(c not in KD_LOSES[kind]) for c in CLAUSES}
        rows.append(_row(f"kd_{kind}", "kd_corruption", prompt, completion, bad, dict.fromkeys(CLAUSES, 1),
                         lost, "ab"[len(rows) // len(KD_KINDS) % 2], float(len(KD_LOSES[kind]))))
    return rows


def import_rows(paths) -> list:
    """Seed rows {id, prompt, a: {text, clauses}, b, winner}, checked against `judge_pair`."""
    rows = []
    for path in map(Path, paths):
        for n, row in jsonl_records(path, DataError):
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: $: expected an object")
            row = {**row, "scenario": row.get("scenario", "imported"), "source": "imported"}
            for side in ("a", "b"):
                c = row.get(side, {}).get("clauses") if isinstance(row.get(side), dict) else None
                if isinstance(c, list):
                    row[side] = {**row[side], "clauses": {k: int(k in c) for k in CLAUSES}}
                elif isinstance(c, dict):
                    row[side] = {**row[side], "clauses": {k: int(v) if isinstance(v, bool) else v
                                                          for k, v in c.items()}}
            try:
                rows.append(validate(row, "judge_pair", source=f"{path}:{n}"))
            except SchemaError as e:
                raise DataError(str(e)) from None
    return rows


def _stats(values):
    v = sorted(values)
    if not v:
        return {}
    q = lambda f: v[min(len(v) - 1, int(f * len(v)))]
    return {"min": v[0], "p50": q(0.5), "p95": q(0.95), "max": v[-1], "mean": round(sum(v) / len(v), 1)}


RULES = {**{k: run_settings.integer(0) for k in ("num_pairs", "kd_pairs", "seed")},
         "max_tokens": run_settings.integer(1),
         "tie_fraction": run_settings.number(lambda x: 0 <= x <= 1, "a number in [0, 1]"),
         **{k: run_settings.number(lambda x: 0 <= x < 1, "a number in [0, 1)")
            for k in ("valid_fraction", "test_fraction")}}


def check(args, lines: dict, given: set):
    """Raise ConfigError listing every bad setting where it was set (flag or FILE:LINE)."""
    found = run_settings.problems(args, RULES)
    if not found and args.valid_fraction + args.test_fraction >= 1:
        found.append(("test_fraction", f"{args.test_fraction} with valid_fraction "
                      f"{args.valid_fraction} leaves no prompt for train.jsonl (their sum must "
                      "be < 1)"))
    run_settings.raise_problems(found, args.config, lines, given)


def run(args) -> dict:
    given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    _, lines = apply_config(args, CONFIG_DEFAULTS)
    check(args, lines, given)
    args.kd, args.imports = ([x] if isinstance(x, str) else x for x in (args.kd, args.imports))
    tok = None
    if args.tokenizer:
        path = Path(args.tokenizer) / "tokenizer.json"
        if not path.exists():
            raise DataError(f"--tokenizer: {path} not found (give a folder with tokenizer.json, or '')")
        tok = Tokenizer.from_file(str(path))
    rows = generated_pairs(args.num_pairs, args.seed, args.tie_fraction, args.source)
    kd = read_kd(args.kd) if args.kd else []
    rows += kd_pairs(kd, args.kd_pairs, args.seed)
    rows += import_rows(args.imports) if args.imports else []
    seen, kept, lengths, dropped, duplicates = set(), {s: [] for s in SPLITS}, [], 0, 0
    for row in rows:
        if row["id"] in seen:
            duplicates += 1
            continue
        seen.add(row["id"])
        if tok is not None:
            n = max(judge_tokens(tok, row["prompt"], row[s]["text"]) for s in "ab")
            if n > args.max_tokens:
                dropped += 1
                continue
            lengths.append(n)
        phash = hashlib.sha256(row["prompt"].encode()).hexdigest()
        kept[split_of(phash, args.valid_fraction, args.test_fraction)].append(row)
    all_rows = [r for s in SPLITS for r in kept[s]]
    if not all_rows:
        raise DataError(f"no pair rows to write: --num-pairs {args.num_pairs}, and --kd / "
                        f"--import gave {len(rows) - args.num_pairs}"
                        + (f"; {dropped} dropped over --max-tokens {args.max_tokens}" if dropped else ""))
    count = lambda key: {k: sum(r[key] == k for r in all_rows) for k in sorted({r[key] for r in all_rows})}
    manifest = {
        "rows": {s: len(kept[s]) for s in SPLITS}, "duplicate_ids_dropped": duplicates,
        "source": count("source"), "scenario": count("scenario"), "winner": count("winner"),
        "tokens": {"tokenizer": args.tokenizer or None, "max_tokens": args.max_tokens if tok else None,
                   "dropped_over_max": dropped, "prompt_plus_longer_candidate": _stats(lengths)},
        "inputs": {"source": str(args.source or edits.stdlib_root()),
                   "python": platform.python_version(), "kd": [str(p) for p in _kd_files(args.kd)],
                   "kd_records": len(kd), "imports": list(map(str, args.imports))},
        "config": {k: getattr(args, k) for k in CONFIG_DEFAULTS if k != "out"},
    }
    with atomic_dir(args.out) as tmp:
        for s in SPLITS:
            with open(tmp / f"{s}.jsonl", "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept[s])
            with open(tmp / f"trl_{s}.jsonl", "w") as f:
                for r in kept[s]:
                    if r["winner"] == "tie":
                        continue
                    win, lose = (r["a"], r["b"]) if r["winner"] == "a" else (r["b"], r["a"])
                    f.write(json.dumps({"prompt": r["prompt"], "chosen": win["text"], "rejected": lose["text"],
                                        "margin": r.get("margin", 0.0)}, ensure_ascii=False) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None):
    try:
        m = run(build_parser().parse_args(argv))
    except (DataError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"rows": m["rows"], "source": m["source"], "tokens": m["tokens"]}))


if __name__ == "__main__":
    main()
