"""Generate the tool-use data set: contextual prompts, gold traces with process targets.

    mlx_student.toolgen --n 1000 --out data/tools          # train/valid/test.jsonl of gold traces
    (python -m mlx_student.tools.toolgen ... before the console script is installed)
    mlx_student.toolgen --n 10000 --num-shards 4 --shard 2 --out data/t10k/shard-2   # one shard
    mlx_student.toolgen --merge data/t10k/shard-* --out data/t10k    # join them (gold traces)
    mlx_student.toolgen --n 200 --out data/tools_t --teacher-url http://127.0.0.1:8080/v1 \
        --teacher-model default --teacher-limit 50          # + teacher traces in <out>/teacher/

Item i is a pure function of (seed, i): its random draws come from `Random(f"{seed}:{i}")`,
its stratum from a seeded permutation of the strata taken block by block (every block of 72
consecutive items covers each scenario x complexity x structure cell once), its kind from
i mod 40 (4 controls where no tool should be called = 10%, 2 injections of instructions into
a tool result, 1 malformed tool output, 1 locale probe, 1 long-context item; the rest
ordinary), its split (80/10/10 train/valid/test) from a hash of its id. The tools offered are
the ones the item calls, a look-alike from the same group and, half the time, one from another
group (the schemas are long: about 150 tokens each in the prompt). So N=1k is the first
thousand items of N=10k, and any shard count gives the same items (`--merge` sorts by index).

Out: `{train,valid,test}.jsonl` (trace records: see mlx_student/tools/traces.py, with
`spans` from mlx_student/tools/spans.py over the student tokenizer), `fixtures.json`
({item id: {normalized call: result}}: every item is its own workspace, so its calls replay
with `Broker(fixtures[id])`, or `Broker(record["meta"]["fixtures"])`), `manifest.json`
(counts by stratum, tokens, span alignment, config). With a teacher, `teacher/` holds the
teacher's traces of the first `--teacher-limit` items in the same layout (`source` "teacher").
"""

import argparse
import asyncio
import hashlib
import itertools
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from .. import run_settings
from ..config import ConfigError, apply_config
from ..files import atomic_dir
from ..teacher.default import DEFAULT_TEACHER_DIR
from ..teacher.http import HTTPTeacher, HTTPTeacherArgs, TeacherError
from . import scenarios, spans
from .broker import Broker, call_key
from .registry import SCENARIOS, TOOLS
from .traces import gold_trace, teacher_trace

SPLITS = ("train", "valid", "test")
CYCLE = 40
KINDS = {0: "control", 10: "control", 20: "control", 30: "control", 5: "injection",
         25: "injection", 15: "malformed", 35: "locale", 38: "long"}
CELLS = list(itertools.product(SCENARIOS, scenarios.COMPLEXITIES, scenarios.STRUCTURES))
CONFIG_DEFAULTS = {
    "n": 1000,
    "seed": 0,
    "out": "data/tools",
    "tokenizer": str(DEFAULT_TEACHER_DIR),
    "shard": 0,
    "num_shards": 1,
    "teacher_url": None,
    "teacher_model": "default",
    "teacher_limit": 0,
    "teacher_max_tokens": 256,
    "api_key_env": None,
    "concurrency": 4,
}


def cell(seed, i):
    block, pos = divmod(i, len(CELLS))
    return random.Random(f"{seed}:cells:{block}").sample(CELLS, len(CELLS))[pos]


def split_of(item_id):
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") % 100
    return "train" if h < 80 else "valid" if h < 90 else "test"


def make_item(seed, i):
    """The plan of item i: id, user prompt, steps [(name, arguments, result)], answer, offered
    tool names and meta (stratum, kind, expected calls, facts, fixtures)."""
    rng = random.Random(f"{seed}:{i}")
    scenario, complexity, structure = cell(seed, i)
    kind = KINDS.get(i % CYCLE, "ordinary")
    locale = None
    if kind == "control":
        plan, complexity, structure = scenarios.control(rng), "none", "none"
    elif kind == "locale":
        (plan, locale), scenario, complexity, structure = scenarios.locale_plan(rng), "files", "single", "flat"
    elif kind == "long":
        plan, scenario, complexity, structure = scenarios.long_plan(rng), "files", "single", "flat"
    else:
        plan = scenarios.build(rng, scenario, complexity, structure)
        if kind == "injection":
            scenarios.inject(rng, plan)
        elif kind == "malformed":
            scenarios.malform(rng, plan)
    offered = set(plan.tools)
    siblings = sorted(set(SCENARIOS[scenario]) - offered)
    if siblings:  # a look-alike from the same group
        offered.add(rng.choice(siblings))
    if rng.random() < 0.5:  # and, half the time, one from another group
        offered.add(rng.choice(sorted(set(TOOLS) - offered)))
    tools = rng.sample(sorted(offered), len(offered))
    item_id = f"tools-s{seed}-{i:06d}"
    meta = {
        "scenario": scenario, "complexity": complexity, "structure": structure,
        "control": kind == "control", "adversarial": plan.adversarial,
        "expected_calls": [{"name": n, "arguments": a} for n, a, _ in plan.steps],
        "facts": plan.facts, "locale": locale, "long_context": kind == "long",
        "index": i, "split": split_of(item_id),
        "fixtures": {call_key(n, a): r for n, a, r in plan.steps},
    }
    return {"id": item_id, "user": plan.user, "steps": plan.steps, "answer": plan.answer,
            "tools": tools, "meta": meta}


def build_parser():
    p = argparse.ArgumentParser(
        description="Generate tool-use traces (gold, optionally teacher) with process-target spans.",
        epilog="Item i depends only on (seed, i): shards and smaller N give the same items.")

    def add(flag, help, **kw):
        key = flag[2:].replace("-", "_")
        p.add_argument(flag, help=f"{help} (default: {CONFIG_DEFAULTS[key]})", **kw)

    p.add_argument("--config", help="YAML config (keys as the flags, with _); flags override it")
    add("--n", "items in the whole set (all shards)", type=int)
    add("--seed", "generation seed", type=int)
    add("--out", "output folder")
    add("--tokenizer", "student tokenizer folder the spans index")
    add("--shard", "which shard to make, 0-based", type=int)
    add("--num-shards", "shards the set is cut into (item i goes to shard i mod num_shards)", type=int)
    add("--teacher-url", "OpenAI-compatible base URL (ending in /v1) for teacher traces")
    add("--teacher-model", "the model name sent to the teacher")
    add("--teacher-limit", "teacher traces of this shard's first items", type=int)
    add("--teacher-max-tokens", "max tokens per teacher reply", type=int)
    add("--api-key-env", "environment variable holding the teacher's API key")
    add("--concurrency", "teacher requests in flight", type=int)
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="merge shard folders into --out instead of generating")
    return p


def _write(folder, by_split):
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:  # a split with no records gets no file (the data loader refuses empty ones)
        records = sorted(by_split.get(split, []), key=lambda r: r["meta"]["index"])
        if records:
            (folder / f"{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def summarize(records, tokenizer_path=None, alignment=None):
    """Counts by split and stratum, token lengths and span totals of trace records."""
    count = lambda key: dict(sorted(Counter(str(key(r)) for r in records).items()))
    m = [r["meta"] for r in records]
    out = {
        "records": len(records),
        "splits": count(lambda r: r["meta"]["split"]),
        "sources": count(lambda r: r["source"]),
        "scenario": dict(Counter(x["scenario"] for x in m)),
        "complexity": dict(Counter(x["complexity"] for x in m)),
        "structure": dict(Counter(x["structure"] for x in m)),
        "controls": sum(x["control"] for x in m),
        "adversarial": dict(Counter(x["adversarial"] for x in m if x["adversarial"])),
        "locale": dict(Counter(x["locale"] for x in m if x["locale"])),
        "long_context": sum(x["long_context"] for x in m),
        "spans": dict(Counter(s["type"] for r in records for s in r.get("spans", []))),
    }
    if tokenizer_path:
        out["tokenizer"] = tokenizer_path
    if alignment is not None:
        out["alignment"] = alignment
    return out


def _with_spans(tokenizer, record, tally):
    _, ids, record["spans"] = spans.analyze(tokenizer, record)
    c = spans.check(tokenizer, record)
    tally["spans"] += c["spans"]
    tally["aligned"] += c["aligned"]
    tally["exact"] += c["exact"]
    tally["tokens"].append(len(ids))
    return record


def _alignment(tally):
    t = tally["tokens"]
    return {"spans": tally["spans"], "aligned": tally["aligned"],
            "alignment_rate": tally["aligned"] / max(tally["spans"], 1),
            "exact_boundary_rate": tally["exact"] / max(tally["spans"], 1),
            "tokens_mean": sum(t) / max(len(t), 1), "tokens_max": max(t, default=0)}


async def _teacher_traces(args, golds, tokenizer, tally):
    teacher = HTTPTeacher(HTTPTeacherArgs(
        base_url=args.teacher_url, model=args.teacher_model, api_key_env=args.api_key_env,
        max_tokens=args.teacher_max_tokens, concurrency=args.concurrency))
    bar = tqdm(total=len(golds), desc="teacher traces", unit="trace", dynamic_ncols=True)

    async def one(gold):
        record = await teacher_trace(teacher, gold, Broker(gold["meta"]["fixtures"]))
        bar.update()
        return _with_spans(tokenizer, record, tally)

    try:
        return await asyncio.gather(*(one(g) for g in golds))
    finally:
        bar.close()
        await teacher.aclose()


def generate(args):
    tokenizer = load_tokenizer(Path(args.tokenizer))
    indices = range(args.shard, args.n, args.num_shards)
    tally = {"spans": 0, "aligned": 0, "exact": 0, "tokens": []}
    tic = time.perf_counter()
    golds = []
    for i in tqdm(indices, desc="toolgen", unit="item", dynamic_ncols=True):
        golds.append(_with_spans(tokenizer, gold_trace(make_item(args.seed, i)), tally))
    elapsed = time.perf_counter() - tic
    teacher, t_tally = [], {"spans": 0, "aligned": 0, "exact": 0, "tokens": []}
    if args.teacher_url and args.teacher_limit:
        teacher = asyncio.run(_teacher_traces(args, golds[: args.teacher_limit], tokenizer, t_tally))
    with atomic_dir(args.out) as tmp:
        by_split = {}
        for r in golds:
            by_split.setdefault(r["meta"]["split"], []).append(r)
        _write(tmp, by_split)
        (tmp / "fixtures.json").write_text(json.dumps(
            {r["id"]: r["meta"]["fixtures"] for r in golds}, ensure_ascii=False, indent=0))
        manifest = {"gold": summarize(golds, args.tokenizer, _alignment(tally)),
                    "items_per_s": len(golds) / elapsed, "config": vars(args)}
        if teacher:
            t_split = {}
            for r in teacher:
                t_split.setdefault(r["meta"]["split"], []).append(r)
            _write(tmp / "teacher", t_split)
            stats = Counter()
            for r in teacher:
                stats.update(r["meta"]["teacher"])
            manifest["teacher"] = {**summarize(teacher, args.tokenizer, _alignment(t_tally)),
                                   "calls": stats["calls"], "broker_misses": stats["misses"],
                                   "invalid_arguments": stats["invalid"]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def merge(args):
    """Join shard folders into args.out (records sorted by index, fixtures united)."""
    by_split, fixtures, manifests = {}, {}, []
    for d in map(Path, args.merge):
        for split in SPLITS:
            path = d / f"{split}.jsonl"
            if path.is_file():
                by_split.setdefault(split, []).extend(
                    json.loads(line) for line in path.read_text().splitlines() if line.strip())
        fixtures.update(json.loads((d / "fixtures.json").read_text()))
        manifests.append(json.loads((d / "manifest.json").read_text()))
    records = [r for rs in by_split.values() for r in rs]
    ids = Counter(r["id"] for r in records)
    twice = [i for i, n in ids.items() if n > 1]
    if twice:
        raise ConfigError(f"--merge: {len(twice)} items appear in more than one shard, e.g. {twice[0]}")
    tally = {k: sum(m["gold"]["alignment"][k] for m in manifests) for k in ("spans", "aligned")}
    with atomic_dir(args.out) as tmp:
        _write(tmp, by_split)
        (tmp / "fixtures.json").write_text(json.dumps(
            {i: fixtures[i] for i in sorted(fixtures)}, ensure_ascii=False, indent=0))
        manifest = {"gold": summarize(records, manifests[0]["gold"].get("tokenizer"), {
            **tally, "alignment_rate": tally["aligned"] / max(tally["spans"], 1)}),
            "merged": [str(d) for d in args.merge]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


RULES = {**{k: run_settings.integer(1) for k in ("n", "num_shards", "teacher_max_tokens",
                                                  "concurrency")},
         **{k: run_settings.integer(0) for k in ("seed", "teacher_limit")}}


def parse_args(argv=None):
    """Flags over the config file over CONFIG_DEFAULTS, each checked (ConfigError listing every
    bad setting where it was set: --flag or FILE:LINE)."""
    args = build_parser().parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    _, lines = apply_config(args, CONFIG_DEFAULTS)
    run_settings.raise_problems(run_settings.problems(args, RULES), args.config, lines, given)
    if not 0 <= args.shard < args.num_shards:
        raise ConfigError(f"--shard {args.shard} must be in [0, {args.num_shards})")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        manifest = merge(args) if args.merge else generate(args)
    except (ConfigError, OSError, ValueError, TeacherError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    g = manifest["gold"]
    a = g.get("alignment", {})
    print(f"{args.out}: {g['records']} gold traces {g['splits']}; spans {g['spans']}; "
          f"alignment {a.get('alignment_rate', 0):.4f}"
          + (f"; {manifest['items_per_s']:.1f} items/s" if "items_per_s" in manifest else ""))
    if "teacher" in manifest:
        t = manifest["teacher"]
        print(f"teacher: {t['records']} traces, {t['calls']} calls, {t['broker_misses']} broker "
              f"misses, {t['invalid_arguments']} invalid arguments")


if __name__ == "__main__":
    main()
