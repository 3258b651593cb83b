"""Score Claimify extraction and claim verification on a gold set (by default the shipped one).

    mlx_student.claims_eval --oracle --out runs/claims_eval/oracle          # plumbing: must be 100 %
    mlx_student.claims_eval --out runs/claims_eval/teacher                  # the default teacher, MLX
    mlx_student.claims_eval --model runs/student --compare-unconstrained --out ...
    mlx_student.claims_eval --endpoint http://127.0.0.1:8080/v1 --out ...

Per gold answer: Claimify over the answer (extraction precision / recall / F1 by fuzzy token-F1
matching, sentence- and element-level coverage, and the entailment rate: each extracted claim
judged against its own sentence by the same backend); then verification of the GOLD claims
against the gold evidence manifest (so verification is scored apart from extraction):
VERIFIED precision / recall / F1 against the seed's gates (>= 0.9 / >= 0.85), status and
outcome accuracy, and the outcome histogram. `--compare-unconstrained` reruns extraction with
constrained decoding off and reports both schema-valid rates. `--oracle` answers every request
from the gold labels (arbiter.claims.gold): the pipeline's plumbing must then score 100 %.

Writes <out>/report.json, report.md, extractions.jsonl and verification.json in one atomic swap.
"""

import argparse
import json
import sys
import time

from tqdm import tqdm

from mlx_student.config import ConfigError, apply_config
from mlx_student.files import atomic_dir, write_json_atomic

from .backends import BACKEND_DEFAULTS, add_backend_args, make_backend
from .claimify import ERRORS, add_dataclass_args, dataclass_from
from .extract import ClaimifyConfig, claimify
from .gold import ANSWERS, EVIDENCE, load_gold, oracle_backend
from .metrics import entailment_rate, extraction_scores, verification_scores
from .split import AnswerError, split_answer
from .verify import EvidenceIndex, VerifyConfig, llm_judge, load_manifest, verify_claims

GATES = {"precision": 0.9, "recall": 0.85}  # the seed system's verification gates
CONFIG_DEFAULTS = {
    **BACKEND_DEFAULTS, "gold": str(ANSWERS), "evidence": str(EVIDENCE), "out": None, "oracle": False,
    "compare_unconstrained": False, "limit": None, "match_threshold": 0.5,
    **{k: v for k, v in vars(ClaimifyConfig()).items()}, **{k: v for k, v in vars(VerifyConfig()).items()},
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Claim metrics on a gold set: extraction P/R/F1 (fuzzy token-F1 matching), "
        "sentence/element coverage, entailment rate, verification P/R/F1 against the seed's gates, "
        "outcome histogram; schema-valid rates with and without constrained decoding. Flags "
        "override the --config file's keys.", epilog=f"defaults: {json.dumps(CONFIG_DEFAULTS)}")
    add = p.add_argument
    add("--config", help="YAML with any of the keys in the defaults below")
    add("--gold", help="gold answers jsonl (arbiter/schemas/claims_gold.json per line)")
    add("--evidence", help="the gold evidence manifest")
    add("--out", help="report folder")
    add("--oracle", action="store_true", default=None, help="answer from the gold labels (plumbing check)")
    add("--compare-unconstrained", action="store_true", default=None,
        help="also extract with constrained decoding off and report both schema-valid rates")
    add("--limit", type=int, help="only the first N gold answers")
    add("--match-threshold", type=float, help="token F1 at which a predicted claim matches a gold one")
    add_backend_args(add)
    add_dataclass_args(add, ClaimifyConfig)
    add_dataclass_args(add, VerifyConfig)
    return p


def check_gold(gold, cfg, path):
    """The gold sentences must be the splitter's sentences of each answer."""
    for n, a in enumerate(gold, 1):
        got = [s.text for s in split_answer(a["answer"], max_sentence_chars=cfg.max_sentence_chars,
                                            where=f"{path}:{n}: field 'answer'")]
        want = [s["text"] for s in a["sentences"]]
        if got != want:
            raise AnswerError(f"{path}:{n}: field 'sentences': the answer splits into {len(got)} sentences "
                              f"{json.dumps(got)[:300]}, not the {len(want)} listed")


def extract_all(gold, backend, cfg, bar):
    results, valid, total = [], 0, 0
    for a in gold:
        result, calls = claimify(a["answer"], backend, cfg, a["question"], a["id"], progress=bar)
        results.append(result)
        valid += sum(p is not None for c in calls for p in c.parsed)
        total += sum(len(c.parsed) for c in calls)
    return results, {"valid": valid, "total": total, "rate": valid / total if total else 0.0}


def score_extraction(results, gold, threshold):
    pairs = []
    for r, a in zip(results, gold):
        texts = {c["id"]: c["text"] for c in r["claims"]}
        pairs.append(([{**s, "claim_texts": [texts[i] for i in s["claims"]]} for s in r["sentences"]], a["sentences"]))
    return extraction_scores(pairs, threshold)


def markdown(report) -> str:
    e, v, en = report["extraction"], report["verification"], report["entailment"]
    met = {k: "met" if ok else "NOT met" for k, ok in report["gates"].items()}
    rows = [("schema-valid stage outputs (constrained)", f"{report['schema_valid']['on']['rate']:.1%}"
             if "on" in report["schema_valid"] else "-"),
            ("schema-valid stage outputs (unconstrained)", f"{report['schema_valid']['off']['rate']:.1%}"
             if "off" in report["schema_valid"] else "-"),
            ("extraction precision / recall / F1", f"{e['precision']:.3f} / {e['recall']:.3f} / {e['f1']:.3f}"),
            ("sentence-level coverage", f"{e['sentence_coverage']:.3f}"),
            ("element-level coverage (macro F1)", f"{e['element_coverage']:.3f}"),
            ("entailment rate", f"{en['rate']:.3f} ({en['entailed']}/{en['claims']})"),
            ("verification precision (gate 0.9)", f"{v['precision']:.3f} {met['precision']}"),
            ("verification recall (gate 0.85)", f"{v['recall']:.3f} {met['recall']}"),
            ("verification F1", f"{v['f1']:.3f}"),
            ("status / outcome accuracy", f"{v['status_accuracy']:.3f} / {v['outcome_accuracy']:.3f}")]
    lines = [f"# Claims eval: {report['backend']}", "",
             f"{report['answers']} answers, {e['sentences']} sentences, {e['gold']} gold claims, "
             f"{e['predicted']} extracted; {report['elapsed_s']:.0f} s", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {val} |" for k, val in rows]
    lines += ["", "| outcome | predicted | gold |", "|---|---|---|"]
    lines += [f"| {o} | {n} | {v['gold_histogram'][o]} |" for o, n in v["histogram"].items()]
    return "\n".join(lines) + "\n"


def run(args):
    cfg, vcfg = dataclass_from(args, ClaimifyConfig), dataclass_from(args, VerifyConfig)
    if not args.out:
        raise ConfigError("give --out (the report folder)")
    gold = load_gold(args.gold)[: args.limit]
    check_gold(gold, cfg, args.gold)
    index = EvidenceIndex(load_manifest(args.evidence), str(args.evidence))
    if args.oracle:
        backend, described = oracle_backend(gold), "oracle (gold labels)"
    else:
        backend, described = make_backend(args)
    tic = time.perf_counter()
    sentences = sum(len(a["sentences"]) for a in gold)
    gold_claims = [c for a in gold for s in a["sentences"] for c in s["claims"]]
    schema_valid = {}
    with tqdm(total=sentences, desc="extract", unit="sent", dynamic_ncols=True) as bar:
        if args.compare_unconstrained and hasattr(backend, "constrained"):
            backend.constrained = False
            bar.set_description("extract (unconstrained)")
            _, schema_valid["off"] = extract_all(gold, backend, cfg, bar)
            backend.constrained = True
            bar.reset(total=sentences)
            bar.set_description("extract")
        results, schema_valid["on" if getattr(backend, "constrained", True) else "off"] = extract_all(
            gold, backend, cfg, bar)
        extraction = score_extraction(results, gold, args.match_threshold)
        judge = llm_judge(backend, vcfg.judge_votes, vcfg.judge_temperature)
        extracted = [(c, r["sentences"][c["sentence"]]["text"]) for r in results for c in r["claims"]]
        bar.reset(total=len(extracted) + len(gold_claims))
        bar.set_description("judge")
        bar.unit = "claim"
        judged = []
        for c, sentence in extracted:
            judged.append(judge(c["text"], {"id": f"sentence:{c['id']}", "text": sentence}))
            bar.update()
        entailment = entailment_rate(judged, vcfg.support)
        claims = [{"id": f"g{i}", "text": c["text"]} for i, c in enumerate(gold_claims)]
        verification = verify_claims(claims, index, judge, vcfg, backend.name, bar)
    vscores = verification_scores(verification["claims"], gold_claims)
    report = {"backend": described, "gold": str(args.gold), "answers": len(gold), "schema_valid": schema_valid,
              "extraction": extraction, "entailment": entailment, "verification": vscores,
              "gates": {k: vscores[k] >= g for k, g in GATES.items()}, "gate_thresholds": GATES,
              "elapsed_s": round(time.perf_counter() - tic, 2), "config": vars(args)}
    with atomic_dir(args.out) as tmp:
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(markdown(report))
        (tmp / "extractions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        write_json_atomic(tmp / "verification.json", verification)
    print(markdown(report))
    if hasattr(backend, "close"):
        backend.close()
    return report


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
