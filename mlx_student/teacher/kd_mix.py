"""Make a KD data folder: prompts from a mix of sources, completions from a teacher.

    mlx_student.kd_mix --config configs/kd_mix.yaml [--num-records 200] [--teacher server]

Sources (`sources:` in the config) are built-in prompt builders over local corpora
(mlx_student.teacher.prompts.BUILDERS) or jsonl prompt files, each with a weight: the job takes
`num_records` prompts, split between sources by weight, each source's prompts in a seeded
hash order, duplicates (same messages) dropped. A prompt's split (train/valid/test) follows
from its hash alone, so it never moves between splits.

Teachers: `local` (any mlx-lm model in this process; exact top-k of the full distribution;
greedy prompts decoded `batch_size` at a time, scripts/bench_teacher.py gives the speed-up),
`server` (mlx_lm.server started on loopback for `model`, used over HTTP, stopped at the end),
`http` (any OpenAI-compatible endpoint at `base_url`). When the teacher's tokenizer is the
student's, records carry `completion_ids` and per-token `topk` (top-k KD); otherwise only the
text (sequence-level KD), and the manifest says so. For a student with another tokenizer, set
`student_tokenizer` to the teacher's own: the records keep its ids and top-k, and
mlx_student.train maps them onto the real student's tokens (mlx_student.xtok).

Output: `<out>/{train,valid,test}.jsonl` (KD records, mlx_student.data reads them) and
`<out>/manifest.json` (written atomically). Rerunning the same command resumes: records already
written are skipped; each record is appended whole in one write, and a torn last line left by a
crash is cut off (and reported) before appending.
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from ..config import ConfigError, apply_config
from ..files import write_json_atomic
from ..run_settings import choice, integer, number, problems, raise_problems
from . import default as default_teacher
from . import prompts
from . import server as teacher_server
from .http import AlignmentError, HTTPTeacher, HTTPTeacherArgs, TeacherError, align
from .local import LocalTeacher, LocalTeacherArgs

SPLITS = ("train", "valid", "test")
TEACHERS = ("local", "server", "http")
SERVER_MAX_TOP_LOGPROBS = 11  # mlx_lm.server rejects more
CONFIG_DEFAULTS = {
    "teacher": "local",
    "model": str(default_teacher.DEFAULT_TEACHER_DIR),
    "base_url": None,
    "api_key_env": None,
    "teacher_tokenizer": None,
    "student_tokenizer": str(default_teacher.DEFAULT_TEACHER_DIR),
    "out": "data/kd",
    "num_records": 64,
    "seed": 0,
    "valid_fraction": 0.05,
    "test_fraction": 0.05,
    "temperature": 0.0,
    "top_p": 1.0,
    "max_tokens": 128,
    "top_k": 32,
    "batch_size": 16,
    "concurrency": 4,
    "timeout": 120.0,
    "max_retries": 6,
    "rpm": 0.0,
    "sources": [{"name": "stdlib_explain", "weight": 1.0}],
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Make KD records from a teacher over a mix of prompt sources (resumable).",
        epilog="Prompt sources are set in the config's `sources:` list, e.g. "
        "[{name: stdlib_fix, weight: 2}, {name: mine, jsonl: prompts.jsonl, weight: 1}]; "
        f"built-in builders: {', '.join(prompts.BUILDERS)}. Default sources: "
        f"{CONFIG_DEFAULTS['sources']}.",
    )

    def add(flag, help, **kw):
        key = flag[2:].replace("-", "_")
        p.add_argument(flag, help=f"{help} (default: {CONFIG_DEFAULTS[key]})", **kw)

    p.add_argument("--config", help="YAML run config (keys as the flags, with _); flags override it")
    add("--teacher", "local: an mlx-lm model in process; server: mlx_lm.server started on "
        "loopback for --model; http: any OpenAI-compatible API at --base-url", choices=TEACHERS)
    add("--model", "local/server: an mlx-lm model folder; http: the API's model name")
    add("--base-url", "http: the API's base URL, ending in /v1")
    add("--api-key-env", "http: the environment variable that holds the API key")
    add("--teacher-tokenizer", "http: the teacher's tokenizer folder, if known; top-k KD needs "
        "it to be the student's, else records hold text only (sequence-level KD)")
    add("--student-tokenizer", "the student's tokenizer folder")
    add("--out", "output folder: {train,valid,test}.jsonl and manifest.json")
    add("--num-records", "records the folder should hold in the end", type=int)
    add("--seed", "seed of the prompt order (and of sampling, local teacher)", type=int)
    add("--valid-fraction", "share of prompts for valid.jsonl (by prompt hash)", type=float)
    add("--test-fraction", "share of prompts for test.jsonl (by prompt hash)", type=float)
    add("--temperature", "sampling temperature; 0 is greedy", type=float)
    add("--top-p", "nucleus sampling; 1 is off", type=float)
    add("--max-tokens", "completion tokens at most", type=int)
    add("--top-k", "local: top-k stored per token; server/http: top_logprobs asked for "
        f"(mlx_lm.server gives at most {SERVER_MAX_TOP_LOGPROBS}); 0: none", type=int)
    add("--batch-size", "local, greedy: prompts decoded together (mlx-lm BatchGenerator); "
        "1 is one at a time. scripts/bench_teacher.py measures the speed-up", type=int)
    add("--concurrency", "server/http: requests in flight at most", type=int)
    add("--timeout", "server/http: seconds per request attempt", type=float)
    add("--max-retries", "server/http: retries of a request on 429, 5xx, timeouts and "
        "dropped connections (exponential backoff with jitter, Retry-After honoured)", type=int)
    add("--rpm", "server/http: requests per minute at most; 0 is no limit", type=float)
    p.add_argument("--prompts", help="a jsonl prompt file ({'prompt': ...} or {'messages': "
                   "[...]} a line) as the only source, replacing `sources`")
    return p


def _check_sources(sources, where):
    if not isinstance(sources, list) or not sources:
        raise ConfigError(f"{where}: sources: expected a non-empty list")
    for i, s in enumerate(sources):
        field = f"{where}: sources[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            raise ConfigError(f"{field}: expected a mapping with a `name`")
        unknown = set(s) - {"name", "weight", "builder", "jsonl"}
        if unknown:
            raise ConfigError(f"{field}: unknown key(s) {sorted(unknown)}")
        if not isinstance(s.get("weight", 1.0), (int, float)) or s.get("weight", 1.0) <= 0:
            raise ConfigError(f"{field}.weight: expected a positive number")
        builder = s.get("builder", None if "jsonl" in s else s["name"])
        if "jsonl" not in s and builder not in prompts.BUILDERS:
            raise ConfigError(f"{field}: builder {builder!r} unknown; built-in: "
                              f"{', '.join(prompts.BUILDERS)}; or give `jsonl: FILE`")


FRACTION = number(lambda x: 0 <= x < 1, "a number in [0, 1)")
RULES = {"num_records": integer(1), "seed": integer(0), "valid_fraction": FRACTION,
         "test_fraction": FRACTION, "temperature": number(lambda x: x >= 0, "a number >= 0"),
         "top_p": number(lambda x: 0 < x <= 1, "a number in (0, 1]"), "max_tokens": integer(1),
         "top_k": integer(0), "batch_size": integer(1), "concurrency": integer(1),
         "timeout": number(lambda x: x > 0, "a number > 0 (seconds)"), "max_retries": integer(0),
         "rpm": number(lambda x: x >= 0, "a number >= 0"), "teacher": choice(TEACHERS)}


def parse_args(argv=None):
    """Command line over the config file over CONFIG_DEFAULTS; settings checked."""
    args = build_parser().parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None and k != "config"}
    settings, lines = apply_config(args, CONFIG_DEFAULTS)
    raise_problems(problems(args, RULES), args.config, lines, given)
    if args.prompts:
        args.sources = [{"name": Path(args.prompts).stem, "jsonl": args.prompts, "weight": 1.0}]
    _check_sources(args.sources, f"{args.config}:{lines.get('sources', 1)}" if "sources" in settings
                   else "--prompts" if args.prompts else "defaults")
    if args.teacher == "http" and not args.base_url:
        raise ConfigError("teacher http needs base_url (--base-url)")
    if args.teacher == "server" and args.top_k > SERVER_MAX_TOP_LOGPROBS:
        raise ConfigError(f"top_k {args.top_k}: mlx_lm.server returns at most "
                          f"{SERVER_MAX_TOP_LOGPROBS} top logprobs")
    if not 0 <= args.valid_fraction + args.test_fraction < 1:
        raise ConfigError("valid_fraction + test_fraction must be in [0, 1)")
    return args


def scan(path):
    """Records already in `path`: {id: (source, has top-k)}, and the bytes
    of a torn last line cut off (a line without its newline: a crash mid-write)."""
    done, torn = {}, 0
    if not path.exists():
        return done, torn
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        torn = len(data) - end
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            done[r["id"]] = (r.get("source"), "topk" in r)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}:{lineno}: not a KD record ({type(e).__name__}: {e}); "
                              "fix or remove the line, then rerun") from None
    return done, torn


def append(fd, record):
    """Append one record as one whole line (one write on an O_APPEND descriptor)."""
    data = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def vocab_hash(tokenizer):
    """sha256 of the token -> id vocabulary: equal hashes mean top-k ids mean the same tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def make_teacher(args, stack):
    """(teacher, teacher tokenizer or None); a `server` teacher's process joins `stack`."""
    if args.teacher in ("local", "server") and Path(args.model) == default_teacher.DEFAULT_TEACHER_DIR:
        default_teacher.prepare()
    if args.teacher == "local":
        teacher = LocalTeacher(LocalTeacherArgs(args.model, args.top_k, args.temperature,
                                                args.top_p, args.max_tokens, args.batch_size))
        return teacher, teacher.tokenizer
    http = HTTPTeacherArgs(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
        top_logprobs=args.top_k, concurrency=args.concurrency, timeout=args.timeout,
        max_retries=args.max_retries, rpm=args.rpm,
    )
    tokenizer_dir = args.teacher_tokenizer
    if args.teacher == "server":
        server = stack.enter_context(teacher_server.serve(
            args.model, Path(args.out) / "teacher_server.log", max_tokens=args.max_tokens))
        http.base_url, http.model, tokenizer_dir = server.url + "/v1", "default_model", args.model
    return HTTPTeacher(http), tokenizer_dir and load_tokenizer(Path(tokenizer_dir))


def _run_local(teacher, jobs, handle):
    """Complete every job with the in-process teacher, batched; each is handled as it ends."""
    for i, completion in teacher.generate_many([job.messages for job in jobs]):
        handle(jobs[i], completion, None)


async def _run_jobs(teacher, jobs, concurrency, handle):
    """Complete every job with at most `concurrency` in flight; `handle(job, completion,
    error)` runs on the event loop's thread, so writes never interleave."""
    todo = iter(jobs)

    async def worker():
        for job in todo:  # a shared iterator: each job is taken once
            try:
                completion = await teacher.complete(job.messages)
            except TeacherError as e:
                handle(job, None, e)
            else:
                handle(job, completion, None)

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await teacher.aclose()


def kd_mode(teacher_tokenizer, student_hash, top_k):
    """("topk" or "sequence", why): top-k KD needs the student's vocabulary and a top-k."""
    if teacher_tokenizer is None:
        return "sequence", "the teacher's tokenizer is unknown (set teacher_tokenizer)"
    if vocab_hash(teacher_tokenizer) != student_hash:
        return "sequence", "the teacher's tokenizer differs from the student's"
    if not top_k:
        return "sequence", "top_k is 0: no teacher distribution asked for"
    return "topk", "the teacher shares the student's tokenizer"


def make_record(job, completion, teacher_block, kd, student, stats):
    """The KD record of one completion; API top-k is aligned to the student's tokens, and
    a record that does not align keeps its text only (counted in `stats`)."""
    record = {"id": job.id, "messages": job.messages, "completion": completion.text,
              "reasoning": completion.reasoning, "teacher": teacher_block,
              "finish_reason": completion.finish_reason, "usage": completion.usage,
              "source": job.source}
    if kd != "topk":
        return record
    ids, topk = completion.completion_ids, completion.topk
    if ids is None and completion.logprobs is None:
        stats["no_logprobs"] += 1
    elif ids is None:
        try:
            ids, topk = align(student, completion.text, completion.finish_reason,
                              completion.logprobs, len(student.get_vocab()))
            stats["aligned"] += 1
        except AlignmentError as e:
            stats["mismatched"] += 1
            stats["first_mismatches"] = stats["first_mismatches"][:4] + [f"{job.origin}: {e}"]
    if ids is not None:
        record.update(completion_ids=ids, topk=topk)
    return record


def run(args):
    """Make (or complete) the KD folder at `args.out`; returns the manifest."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    student = load_tokenizer(Path(args.student_tokenizer))
    student_hash = vocab_hash(student)
    with contextlib.ExitStack() as stack:
        teacher, teacher_tokenizer = make_teacher(args, stack)
        sampling = teacher.args.sampling()
        teacher_info = {"kind": args.teacher, "model": args.model, "sampling": sampling}
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text()).get("teacher", {})
            if {k: old.get(k) for k in teacher_info} != teacher_info:
                raise ConfigError(
                    f"{out} holds records of another teacher setup ({manifest_path}: "
                    f"{json.dumps({k: old.get(k) for k in teacher_info})}); use another --out")
        kd, note = kd_mode(teacher_tokenizer, student_hash, args.top_k)
        teacher_block = {"model": args.model, "endpoint": teacher.endpoint, "sampling": sampling}

        jobs, shortfall = prompts.plan(
            args.sources, args.num_records, args.seed, args.valid_fraction, args.test_fraction,
            sampling)
        done, repaired = {}, {}
        for split in SPLITS:
            found, torn = scan(out / f"{split}.jsonl")
            done.update(found)
            if torn:
                repaired[split] = torn
                print(f"[WARNING] {out / split}.jsonl: cut off a torn last line ({torn} bytes)",
                      file=sys.stderr)
        todo = [j for j in jobs if j.id not in done]
        print(f"{len(jobs)} planned, {len(jobs) - len(todo)} already in {out}, {len(todo)} to make "
              f"({kd} KD: {note})")
        stats = {"written": 0, "tokens": 0, "failures": 0, "failure_kinds": {}, "first_failures": [],
                 "aligned": 0, "mismatched": 0, "first_mismatches": [], "no_logprobs": 0}
        fds = {s: os.open(out / f"{s}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
               for s in SPLITS}
        stack.callback(lambda: [os.close(fd) for fd in fds.values()])
        bar = stack.enter_context(
            tqdm(total=len(todo), desc=f"kd_mix {args.teacher}", unit="rec", dynamic_ncols=True))

        def manifest(status):
            elapsed = time.perf_counter() - tic
            counts = {s: {} for s in SPLITS}
            for job in jobs:
                if job.id in done:
                    counts[job.split][job.source] = counts[job.split].get(job.source, 0) + 1
            return {
                "status": status, "records": len(done), "planned": len(jobs), "counts": counts,
                "records_with_topk": sum(1 for _, has_topk in done.values() if has_topk),
                "shortfall": shortfall, "kd": kd, "kd_note": note,
                "student_tokenizer": {"path": args.student_tokenizer, "vocab_hash": student_hash},
                "teacher": {**teacher_info, "endpoint": teacher.endpoint,
                            "tokenizer_vocab_hash": teacher_tokenizer and vocab_hash(teacher_tokenizer)},
                "last_run": {**stats, "elapsed_s": round(elapsed, 2), "retries": teacher.retries,
                             "records_per_s": stats["written"] / elapsed,
                             "tokens_per_s": stats["tokens"] / elapsed,
                             "repaired_torn_lines": repaired},
                "config": vars(args),
            }

        def handle(job, completion, error):
            if error is not None:
                stats["failures"] += 1
                kinds = stats["failure_kinds"]
                kinds[error.kind] = kinds.get(error.kind, 0) + 1
                stats["first_failures"] = stats["first_failures"][:4] + [f"{job.origin}: {error}"]
            else:
                record = make_record(job, completion, teacher_block, kd, student, stats)
                append(fds[job.split], record)
                done[job.id] = (job.source, "topk" in record)
                stats["written"] += 1
                stats["tokens"] += completion.usage.get("completion_tokens", 0)
                bar.update()
            bar.set_postfix_str(
                f"tok/s={stats['tokens'] / (time.perf_counter() - tic):.1f} "
                f"fail={stats['failures']} retry={teacher.retries} mismatch={stats['mismatched']}")

        tic = time.perf_counter()  # rates count the teacher's work only, not loading or planning
        write_json_atomic(manifest_path, manifest("running"))
        status = "interrupted"
        try:
            if args.teacher == "local":
                _run_local(teacher, todo, handle)
            else:
                asyncio.run(_run_jobs(teacher, todo, args.concurrency, handle))
            missing = sum(j.id not in done for j in jobs)
            status = f"incomplete: {missing} missing, rerun to retry" if missing else "complete"
        finally:
            result = manifest(status)
            write_json_atomic(manifest_path, result)
    last = result["last_run"]
    print(f"{out}: {result['records']}/{len(jobs)} records ({status}); this run {last['written']} "
          f"records, {last['records_per_s']:.3f} records/s, {last['tokens_per_s']:.1f} tokens/s, "
          f"{last['failures']} failures, {last['retries']} retries, "
          f"{last['mismatched']} alignment mismatches")
    if last["failures"]:
        print("failures by kind: " + ", ".join(f"{k} x{n}" for k, n in last["failure_kinds"].items())
              + f"; the first: {last['first_failures'][0]} (more in {manifest_path})", file=sys.stderr)
    return result


def main(argv=None):
    try:
        result = run(parse_args(argv))
    except (ConfigError, prompts.PromptError, TeacherError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: records written so far are whole; rerun the command to resume",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(0 if result["status"] == "complete" else 1)


if __name__ == "__main__":
    main()
