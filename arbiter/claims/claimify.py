"""Extract verifiable claims from answers with Claimify, verify them against evidence, and
optionally write the teacher's stage outputs as KD records.

    mlx_student.claimify --answer answer.txt --question "..." --out runs/claims
    mlx_student.claimify --answer answer.txt --evidence evidence.json --out runs/claims   # + verify
    mlx_student.claimify --answers answers.jsonl --out runs/claims --emit-kd data/claims_kd
    mlx_student.claimify --endpoint http://127.0.0.1:8080/v1 --answer answer.txt --out ...  # any API
    mlx_student.claimify --package out/model.mlpackage --model runs/student --answer ...    # CoreML

Backends: an mlx-lm folder by MLX (`--model`, default the default teacher), an exported CoreML
package (`--package`), any OpenAI-compatible endpoint (`--endpoint`, e.g. `mlx_student.serve`).
Stage outputs are decoded under their JSON Schemas (`--constrained on`, the default).

Writes `<out>/extractions.jsonl` (one arbiter/schemas/claims_extraction.json object per answer:
every sentence kept with its claims or dropped with the stage and reason),
`<out>/verification.json` with `--evidence` (arbiter/schemas/claims_verification.json),
`<out>/report.md` and `<out>/run.json`, in one atomic swap: nothing half-written on failure.
`--emit-kd DIR` writes DIR/{train,valid}.jsonl KD records (mlx_student.train reads them) and
DIR/manifest.json, also atomically.
"""

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from arbiter.schemas import SchemaError, validate
from mlx_student.config import ConfigError, apply_config
from mlx_student.files import atomic_dir, write_json_atomic
from mlx_student.teacher.http import TeacherError

from .backends import BACKEND_DEFAULTS, add_backend_args, make_backend
from .extract import ClaimifyConfig, claimify
from .kd import KD_SPLITS, kd_records
from .split import AnswerError, read_text, split_answer
from .verify import EvidenceIndex, VerifyConfig, llm_judge, load_manifest, verify_claims

CONFIG_DEFAULTS = {
    **BACKEND_DEFAULTS,
    "answer": None, "answers": None, "question": None, "evidence": None, "out": None,
    "emit_kd": None, "kd_top_k": 32, "kd_valid_fraction": 0.1,
    **{f.name: f.default for f in dataclasses.fields(ClaimifyConfig)},
    **{f.name: f.default for f in dataclasses.fields(VerifyConfig)},
}
ERRORS = (AnswerError, SchemaError, ConfigError, TeacherError, ValueError, OSError)


def add_dataclass_args(add, cls):
    for f in dataclasses.fields(cls):
        add(f"--{f.name.replace('_', '-')}", type=type(f.default), help=f"(default {f.default})")


def dataclass_from(args, cls):
    try:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    except ValueError as e:
        raise ConfigError(f"{args.config or 'flags'}: {e}") from None


def build_parser():
    p = argparse.ArgumentParser(
        description="Claimify: extract verifiable claims from answers (Selection, Disambiguation, "
        "Decomposition under JSON-Schema constrained decoding, with voting), verify them against "
        "an evidence manifest, and emit the teacher's stage outputs as KD records. Flags override "
        "the --config file's keys.", epilog=f"defaults: {json.dumps(CONFIG_DEFAULTS)}")
    add = p.add_argument
    add("--config", help="YAML with any of the keys in the defaults below")
    add("--answer", help="a UTF-8 text file holding one answer")
    add("--question", help="the question the --answer answers (context for every stage)")
    add("--answers", help='jsonl of {"id", "question", "answer"} (id and question optional)')
    add("--evidence", help="evidence manifest (arbiter/schemas/evidence_manifest.json) to verify against")
    add("--out", help="output folder: extractions.jsonl, verification.json, report.md, run.json")
    add("--emit-kd", help="KD folder to write the stage prompts and schema-valid outputs to")
    add("--kd-top-k", type=int, help="engine backends: top-k of the teacher distribution per KD token (0: text only)")
    add("--kd-valid-fraction", type=float, help="share of KD records (by prompt hash) in valid.jsonl")
    add_backend_args(add)
    add_dataclass_args(add, ClaimifyConfig)
    add_dataclass_args(add, VerifyConfig)
    return p


def read_answers(args) -> list:
    """[{"id", "question", "answer", "where"}] from --answer or --answers."""
    if bool(args.answer) == bool(args.answers):
        raise ConfigError("give exactly one of --answer (a text file) and --answers (a jsonl file)")
    if args.answer:
        return [{"id": Path(args.answer).stem, "question": args.question,
                 "answer": read_text(args.answer), "where": str(args.answer)}]
    out = []
    for n, line in enumerate(read_text(args.answers, "answers").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{args.answers}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnswerError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
            raise AnswerError(f"{where}: field 'answer': expected a string")
        for key in ("id", "question"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise AnswerError(f"{where}: field {key!r}: expected a string")
        out.append({"id": record.get("id") or f"line{n}", "question": record.get("question"),
                    "answer": record["answer"], "where": f"{where}: field 'answer'"})
    if not out:
        raise AnswerError(f"{args.answers}: no answers")
    return out


def markdown(results, verification) -> str:
    lines = ["# Claimify", ""]
    for r in results:
        lines += [f"## {r['id']}", "", f"Question: {r['question'] or '(none)'}", "",
                  "| # | sentence | kept | stage / reason | claims |", "|---|---|---|---|---|"]
        claims = {c["id"]: c["text"] for c in r["claims"]}
        for s in r["sentences"]:
            why = "" if s["status"] == "kept" else f"{s['stage']}: {s['reason']}"
            text = "<br>".join(claims[c] for c in s["claims"])
            row = f"| {s['index']} | {s['text']} | {s['status'] == 'kept'} | {why} | {text} |"
            lines.append(row.replace("\n", " "))
        lines.append("")
    if verification:
        lines += ["## Verification", "", "| claim | status | outcome | support | contradict | coverage |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['text']} | {c['status']} | {c['outcome']} | {c['support']:.2f} | "
                  f"{c['contradict']:.2f} | {c['coverage']:.2f} |" for c in verification["claims"]]
        lines += ["", "outcomes: " + ", ".join(f"{k} {v}" for k, v in verification["histogram"].items()), ""]
    return "\n".join(lines)


def write_kd(path, pairs, backend, args, calls_total):
    """The KD folder: {split}.jsonl + manifest.json, swapped in atomically."""
    from mlx_student.teacher.kd_mix import vocab_hash

    tokenizer = getattr(getattr(backend, "engine", None), "tokenizer", None)
    with atomic_dir(path) as tmp:
        counts = {}
        for split in KD_SPLITS:
            rows = [r for s, r in pairs if s == split]
            if rows or split == "train":
                (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            counts[split] = dict(Counter(r["source"] for r in rows))
        write_json_atomic(tmp / "manifest.json", {
            "records": len(pairs), "counts": counts, "requests": calls_total,
            "records_with_topk": sum("topk" in r for _, r in pairs),
            "kd": "topk" if any("topk" in r for _, r in pairs) else "sequence",
            "teacher": {"model": backend.name, "endpoint": backend.endpoint},
            "tokenizer_vocab_hash": vocab_hash(tokenizer) if tokenizer is not None else None,
            "config": {k: v for k, v in vars(args).items()}})


def run(args):
    answers = read_answers(args)
    cfg, vcfg = dataclass_from(args, ClaimifyConfig), dataclass_from(args, VerifyConfig)
    # bad answers fail before any model is loaded
    sentences = sum(len(split_answer(a["answer"], max_sentence_chars=cfg.max_sentence_chars, where=a["where"]))
                    for a in answers)
    index = EvidenceIndex(load_manifest(args.evidence), str(args.evidence)) if args.evidence else None
    if not args.out:
        raise ConfigError("give --out (the output folder)")
    backend, described = make_backend(args, top_k=args.kd_top_k if args.emit_kd else 0)
    tic = time.perf_counter()
    results, calls, claims = [], [], []
    with tqdm(total=sentences, desc="claimify", unit="sent", dynamic_ncols=True) as bar:
        for a in answers:
            result, answer_calls = claimify(a["answer"], backend, cfg, a["question"], a["id"], a["where"], bar)
            validate(result, "claims_extraction", source=f"extraction of {a['where']}")
            results.append(result)
            calls += answer_calls
            claims += [{"id": f"{result['id']}:{c['id']}", "text": c["text"]} for c in result["claims"]]
        verification = None
        if index is not None:
            bar.reset(total=len(claims))
            bar.set_description("verify")
            bar.unit = "claim"
            judge = llm_judge(backend, vcfg.judge_votes, vcfg.judge_temperature, calls)
            verification = verify_claims(claims, index, judge, vcfg, backend.name, bar)
    valid = Counter()
    for c in calls:
        valid[c.stage, "valid"] += sum(p is not None for p in c.parsed)
        valid[c.stage, "total"] += len(c.parsed)
    summary = {"backend": described, "answers": len(results),
               "sentences": sum(r["stats"]["sentences"] for r in results),
               "kept": sum(r["stats"]["kept"] for r in results), "claims": len(claims),
               "schema_valid": {stage: {"valid": valid[stage, "valid"], "total": valid[stage, "total"]}
                                for stage in sorted({c.stage for c in calls})},
               "statuses": verification and verification["statuses"], "elapsed_s": round(time.perf_counter() - tic, 2),
               "config": vars(args)}
    with atomic_dir(args.out) as tmp:
        (tmp / "extractions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        if verification is not None:
            write_json_atomic(tmp / "verification.json", verification)
        (tmp / "report.md").write_text(markdown(results, verification))
        write_json_atomic(tmp / "run.json", summary)
    if args.emit_kd:
        pairs = kd_records(calls, backend, args.kd_valid_fraction)
        write_kd(args.emit_kd, pairs, backend, args, len(calls))
        summary["kd_records"] = len(pairs)
    print(markdown(results, verification))
    print(f"{args.out}: {summary['answers']} answers, {summary['sentences']} sentences, {summary['kept']} kept, "
          f"{summary['claims']} claims; schema-valid outputs "
          + ", ".join(f"{k} {v['valid']}/{v['total']}" for k, v in summary["schema_valid"].items())
          + (f"; {summary['kd_records']} KD records in {args.emit_kd}" if args.emit_kd else ""))
    if hasattr(backend, "close"):
        backend.close()
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        apply_config(args, CONFIG_DEFAULTS)
        run(args)
    except ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
