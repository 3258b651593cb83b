"""The KD pilot end to end: default teacher -> KD mix + natural text scored by the teacher ->
a student pruned from the teacher -> arms trained from that same init on the same tokens (a CE
control, offline top-k KD, dense in-process KD) -> held-out evaluation with bootstrap
intervals -> fp16/int8 CoreML packages of the best arm -> parity probes -> bench -> report.

    mlx_student.pilot --config configs/pilot.yaml [--quick] [--seed N] [--force STAGE ...]

The config is a student config (`model:`, the shape cut from the teacher, and
mlx_student.train's run settings, which every arm shares) with an optional `pilot:` block
(PILOT_DEFAULTS; `quick:` inside it overrides the rest under --quick). Every stage calls the
function its own CLI calls (mlx_student.kd_mix, mlx_student.score, mlx_student.prune,
mlx_student.train, mlx_student.export, mlx_student.probe, mlx_student.bench) and writes under
runs/<name>/ (data under data/). Stages are stamped (pilot/stage.py): a rerun skips every
stage whose settings and inputs are unchanged and whose outputs are there (and says so);
--force STAGE (or all) redoes one. The arms' data (pilot/targets.py) is natural text scored by
the teacher (never the eval's files) plus the teacher's completions. Every arm starts from the
pruned student (the prune report's lowest-KL cut) and sees the same records, steps, batches
and seed; only the loss differs: the control learns by CE on the text, `topk_kd` from the
stored top-k (tail bucket), `dense_kd` by forward KL to the teacher's full distribution
computed in process. The evaluation (pilot/heldout.py) uses text no stage saw. --seed reseeds
every stage and runs under runs/<name>_seed<N>/ (docs/pilot.md).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mlx_student.config import ConfigError, load_yaml
from mlx_student.data import DataError
from mlx_student.files import write_json_atomic
from mlx_student.teacher import default as default_teacher

from . import report
from .paths import kd_dir, package_dir, probe_dir, train_data_dir
from .stage import Pilot, StageError, flags, merge
from .targets import score_argv, stage_score, stage_train_data

ARMS = ("control", "topk_kd", "dense_kd")
STAGES = ("teacher", "kd_mix", "score", "train_data", "prune", *(f"train_{a}" for a in ARMS),
          "eval", "export", "probe", "bench", "tool_calls")
DENSE = ("forward_kl", "reverse_kl", "jsd")  # losses that need the teacher in process
DOCS = Path(f"/usr/share/doc/python3.{sys.version_info.minor}/html/_sources")
PILOT_DEFAULTS = {
    "name": "kd_pilot",  # runs/<name>/, data/kd_<name>/
    "seed": None,  # of kd_mix, score, training and the bootstrap; None: the config's `seed`
    "teacher": str(default_teacher.DEFAULT_TEACHER_DIR),
    # mlx_student.kd_mix: `config` plus flags (keys as its flags, with _) over it
    "kd_mix": {"config": "configs/kd_mix.yaml", "num_records": 1200, "max_tokens": 48,
               "batch_size": 16, "test_fraction": 0.1},
    # natural text scored by the teacher (pilot/targets.py): passages of each source up to its
    # token budget, never the eval's files; the rest are mlx_student.score flags
    "score": {"sources": [{"path": str(DOCS / "library"), "tokens": 20000},
                          {"path": str(DOCS / "reference"), "tokens": 10000},
                          {"path": str(DOCS / "howto"), "tokens": 10000},
                          {"path": str(DOCS / "whatsnew"), "tokens": 10000}],
              "valid_tokens": 2048, "passage_chars": 4000, "top_k": 32, "samples": 0,
              "max_seq_length": 256, "batch_size": 8},
    # mlx_student.prune flags: the student's shape is the config's `model:`
    "prune": {"calibration": "data/stdlib/train.jsonl", "calibration_tokens": 4096,
              "heldout": "data/stdlib/valid.jsonl", "heldout_tokens": 2048},
    # mlx_student.train flags over the config's run settings, for every arm
    "train": {"iters": 120, "batch_size": 8, "learning_rate": 1.0e-3, "steps_per_eval": 40},
    "arms": {"control": {"ce": 1.0}, "topk_kd": {"topk_kd": 1.0}, "dense_kd": {"forward_kl": 1.0}},
    # held-out evaluation (pilot/heldout.py): real text never used for prompts or training, and
    # next-line ranking on the stdlib corpus' test split
    "eval": {"heldout": [str(DOCS / "tutorial"), str(DOCS / "faq")], "heldout_fallback":
             "data/stdlib/test.jsonl", "seq_len": 256, "sequences": 32, "batch_size": 4,
             "next_line": {"file": "data/stdlib/test.jsonl", "items": 48, "context_tokens": 96,
                           "candidates": 4},
             "resamples": 2000},
    "export": {"config": "configs/export.yaml", "formats": ["fp16", "int8"], "contexts": [512],
               "prefill_lengths": [64, 128]},
    "probe": {"windows": 4, "decode_steps": 16},
    "bench": {"prompt_lengths": [32, 128], "decode_tokens": 64, "reps": 2},
    "tool_calls": {"n": 20, "max_tokens": 120, "temperature": 1.0},
    # --quick: a few minutes on 2 cores (the CI test runs it on configs/tiny.yaml)
    "quick": {"kd_mix": {"num_records": 32, "max_tokens": 12, "valid_fraction": 0.25,
                         "test_fraction": 0.25},
              "score": {"sources": [{"path": str(DOCS / "library"), "tokens": 1024},
                                    {"path": str(DOCS / "howto"), "tokens": 512}],
                        "valid_tokens": 256, "passage_chars": 1000, "top_k": 8,
                        "max_seq_length": 128},
              "prune": {"calibration_tokens": 256, "heldout_tokens": 256, "drop_kl_tokens": 128,
                        "seq_len": 64},
              "train": {"iters": 12, "batch_size": 4, "steps_per_eval": 6, "val_batches": 2,
                        "max_seq_length": 256},
              "eval": {"sequences": 8, "seq_len": 128,
                       "next_line": {"items": 8, "context_tokens": 32}, "resamples": 200},
              "probe": {"windows": 1, "decode_steps": 4},
              "bench": {"prompt_lengths": [16], "decode_tokens": 8, "reps": 1},
              "tool_calls": {"n": 4}},
}


# ---------------------------------------------------------------- settings
def settings_of(config_path, quick=False, name=None, seed=None) -> dict:
    """PILOT_DEFAULTS under the config's `pilot:` block (under its `quick:` with --quick).
    `seed` (--seed) over pilot.seed over the config's run setting `seed` (else 0) seeds
    kd_mix's prompt order, the score stage's passages and draws, every arm's training and
    the eval's bootstrap; a --seed other than that default runs under runs/<name>_seed<seed>/
    (unless --name), so a rerun on another seed is a whole new run."""
    data, lines = load_yaml(config_path)
    block = data.get("pilot") or {}
    unknown = [k for k in block if k not in PILOT_DEFAULTS]
    unknown += [f"arms.{k}" for k in block.get("arms") or {} if k not in ARMS]
    if unknown:
        raise ConfigError("\n".join(f"{config_path}:{lines.get(f'pilot.{k}', '?')}: pilot.{k}: "
                                    f"unknown pilot setting (arms: {', '.join(ARMS)})"
                                    for k in unknown))
    s = merge(PILOT_DEFAULTS, block)
    if quick:
        s = merge(s, s["quick"])
        s["name"] = f"{s['name']}_quick"
    s.pop("quick")
    base = s["seed"] if s["seed"] is not None else data.get("seed", 0)
    s["seed"] = base if seed is None else seed
    s["name"] = name or (s["name"] if s["seed"] == base else f"{s['name']}_seed{s['seed']}")
    for stage in ("kd_mix", "score", "train"):
        s[stage] = {**s[stage], "seed": s["seed"]}
    s["config"] = str(config_path)
    return s


# ---------------------------------------------------------------- stages
def stage_teacher(p: Pilot):
    teacher = Path(p.s["teacher"])
    inputs = [default_teacher.gguf_path()] if teacher == default_teacher.DEFAULT_TEACHER_DIR else []

    def run():
        if teacher == default_teacher.DEFAULT_TEACHER_DIR:
            default_teacher.prepare(teacher)
        if not default_teacher.is_prepared(teacher):
            raise StageError(f"teacher: {teacher} is not an mlx-lm model folder")
        return {"path": str(teacher), "files": sorted(f.name for f in teacher.iterdir())}

    return p.stage("teacher", {"teacher": str(teacher)}, inputs, [teacher / "config.json"], run)


def kd_mix_argv(s: dict) -> list:
    teacher = s["teacher"]
    opts = {k: v for k, v in s["kd_mix"].items() if k not in ("config", "out")}
    return ["--config", s["kd_mix"]["config"], "--teacher", "local", "--model", str(teacher),
            "--student-tokenizer", str(teacher), "--out", str(kd_dir(s)), *flags(opts)]


def train_argv(s: dict, arm: str, init) -> list:
    """mlx_student.train's command line of one arm: its loss over the shared run settings,
    from the pruned student `init`; an arm with a dense KD term runs the teacher in process."""
    loss = s["arms"][arm]
    argv = ["--config", s["config"], "--data", str(train_data_dir(s)), "--out",
            str(Path("runs") / s["name"] / arm), "--init-from", str(init),
            "--loss", ",".join(f"{k}={v}" for k, v in loss.items()), *flags(s["train"])]
    return argv + (["--teacher", s["teacher"]] if any(k in DENSE for k in loss) else [])


def check_settings(s: dict):
    """The kd_mix, score and every arm's run settings, checked before the first stage runs
    (each command's own checks: a mistake ends here, not after the teacher's hour). Raises
    ConfigError."""
    from mlx_student import train
    from mlx_student.teacher import kd_mix, score

    try:
        kd_mix.parse_args(kd_mix_argv(s))
    except ConfigError as e:
        raise ConfigError(f"{s['config']}: the kd_mix stage (its config, with pilot.kd_mix as "
                          f"flags):\n{e}") from None
    try:
        score.parse_args(score_argv(s))
    except (ConfigError, SystemExit) as e:  # argparse exits on an unknown flag
        raise ConfigError(f"{s['config']}: the score stage's mlx_student.score settings "
                          f"(pilot.score as flags): {e}") from None
    bad = [src for src in s["score"]["sources"] if not (
        isinstance(src, dict) and set(src) == {"path", "tokens"}
        and isinstance(src["tokens"], int) and src["tokens"] > 0)]
    if bad:
        raise ConfigError(f"{s['config']}: pilot.score.sources: expected entries {{path, tokens "
                          f"(an integer > 0)}}, got {bad[0]!r}")
    for arm in s["arms"]:  # from the teacher's folder: the pruned student is not cut yet
        try:
            train.check(train.parse_args(train_argv(s, arm, s["teacher"])))
        except ConfigError as e:
            raise ConfigError(f"{s['config']}: the {arm} arm's mlx_student.train settings "
                              f"(the file's, with pilot.train and pilot.arms.{arm} as flags):"
                              f"\n{e}") from None
    args = train.parse_args(train_argv(s, "control", s["teacher"]))
    if args.max_seq_length < s["score"]["max_seq_length"]:
        raise ConfigError(f"{s['config']}: pilot.score.max_seq_length "
                          f"{s['score']['max_seq_length']} is longer than the arms' "
                          f"max_seq_length {args.max_seq_length}: the scored windows would be cut")


def stage_kd_mix(p: Pilot):
    from mlx_student.teacher import kd_mix

    teacher, out = Path(p.s["teacher"]), kd_dir(p.s)
    argv = kd_mix_argv(p.s)

    def run():
        result = kd_mix.run(kd_mix.parse_args(argv))
        if result["status"] != "complete":
            raise StageError(f"kd_mix: {out}/manifest.json status {result['status']!r}")
        return {"records": result["records"], "kd": result["kd"]}

    settings = {"argv": argv, "kd_mix_config": Path(p.s["kd_mix"]["config"]).read_text()}
    return p.stage("kd_mix", settings, [teacher / "model.safetensors"],
                   [out / "manifest.json"], run)


def student_dir(p: Pilot, which: str) -> Path:
    """runs/<name>/<arm>/, or runs/<name>/pruned/ for the common init."""
    return p.dir / which


def shipped(p: Pilot) -> str:
    """The arm that is exported, probed and benched: the eval's best (lowest held-out KL)."""
    return json.loads((p.dir / "eval.json").read_text())["best"]


def stage_prune(p: Pilot):
    from mlx_student import prune

    out, teacher = student_dir(p, "pruned"), Path(p.s["teacher"])
    argv = ["--config", p.s["config"], "--teacher", str(teacher), "--out", str(out),
            *flags(p.s["prune"])]

    def run():
        r = prune.run(prune.parse_args(argv))
        return {"chosen": r["chosen"], "candidates": {c["name"]: {k: c[k] for k in (
            "kl", "ce", "top1_agree")} for c in r["candidates"]}}

    settings = {"argv": argv, "model": load_yaml(p.s["config"])[0].get("model")}
    inputs = [teacher / "model.safetensors", *(p.s["prune"].get(k) or prune.PRUNE_DEFAULTS[k]
                                                for k in ("calibration", "heldout"))]
    return p.stage("prune", settings, inputs, [out / "model.safetensors",
                                               out / "prune_report.json"], run)


def stage_train(p: Pilot, arm: str):
    from mlx_student import checkpoint, train

    out, data, init = student_dir(p, arm), train_data_dir(p.s), student_dir(p, "pruned")
    argv = train_argv(p.s, arm, init)
    files = [data / f"{sp}.jsonl" for sp in ("train", "valid")] + [init / "model.safetensors"]

    def run():
        resume = p.resuming and checkpoint.trainer_dir(out).exists()
        history = train.run(train.parse_args(argv + ["--resume"] * resume))
        last = history[-1] if history else {}
        return {"steps": last.get("step"), "valid": last.get("valid")}

    config = {k: v for k, v in load_yaml(p.s["config"])[0].items() if k != "pilot"}
    settings = {"argv": argv, "config": config}  # not the pilot: block, which is not training's
    return p.stage(f"train_{arm}", settings, files, [out / "model.safetensors"], run)


def heldout_file(p: Pilot) -> Path:
    """(path, what it is): real text that no prompt and no training step saw, the Python docs
    outside `library/` (the prompts' docs) as a text-format jsonl; else the fallback (the stdlib
    corpus' test split)."""
    e = p.s["eval"]
    dirs = [Path(d) for d in e["heldout"] if Path(d).is_dir()]
    if not dirs:
        return Path(e["heldout_fallback"]), "the fallback: not found " + ", ".join(e["heldout"])
    out = p.dir / "heldout" / "test.jsonl"
    lines = [json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")})
             for d in dirs for f in sorted(d.rglob("*.txt"))]
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(line + "\n" for line in lines)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    return out, "the .rst sources under " + ", ".join(map(str, dirs)) + ", which no prompt used"


def gates(ev: dict, arms) -> dict:
    """The pilot's goals, from the eval summary: the best KD arm (lowest KL) beats the control
    beyond the 95 % interval on KL and CE and by >= GOAL_POINTS of top-1 agreement; the best
    student (lowest CE) closes >= GOAL_GAP of the CE gap between the pruned init and the teacher."""
    m, diff = ev["models"], ev["minus_control"]
    kd = min((a for a in arms if a != "control"), key=lambda a: m[a]["kl"]["value"])
    d = diff[kd]
    best = min(arms, key=lambda a: m[a]["ce"]["value"])
    ce0, ce_t = m["pruned"]["ce"]["value"], m["teacher"]["ce"]["value"]
    closed = (ce0 - m[best]["ce"]["value"]) / (ce0 - ce_t) if ce0 > ce_t else float("nan")
    return {
        "best_kd_arm": kd, "best_student": best, "gap_closed": closed,
        "kd_beats_control_kl": d["kl"]["ci95"][1] < 0,
        "kd_beats_control_ce": d["ce"]["ci95"][1] < 0,
        "kd_top1_points": 100 * d["top1_agree"]["value"],
        "kd_beats_control_top1": 100 * d["top1_agree"]["value"] >= report.GOAL_POINTS,
        "gap_closed_ok": closed >= report.GOAL_GAP,
    }


def stage_eval(p: Pilot):
    """The pruned init, every arm and the teacher on held-out text (pilot/heldout.py)."""
    heldout, heldout_from = heldout_file(p)
    e = p.s["eval"]
    models = {w: student_dir(p, w) for w in ("pruned", *ARMS)}
    out = p.dir / "eval.json"

    def run():
        import mlx_lm
        from mlx_student.prune import text_batches

        from . import heldout as ho

        teacher, tok = mlx_lm.load(p.s["teacher"])
        loaded = {name: mlx_lm.load(str(path))[0] for name, path in models.items()}
        batches = text_batches(heldout, tok, e["sequences"] * e["seq_len"], e["seq_len"],
                               e["batch_size"])
        print(f"[pilot] eval: {len(models) + 1} models on {e['sequences']} x {e['seq_len']} "
              f"held-out tokens", flush=True)
        stats = ho.sequence_stats(loaded, teacher, batches)
        nl = e["next_line"]
        items = ho.next_line_items(nl["file"], tok, nl["items"], nl["context_tokens"],
                                   nl["candidates"])
        lines = {name: ho.next_line_correct(m, items)
                 for name, m in [*loaded.items(), ("teacher", teacher)]}
        summary = ho.summarize(stats, lines, "control", e["resamples"], seed=p.s["seed"])
        result = {"heldout": str(heldout), "heldout_from": heldout_from,
                  "next_line_file": nl["file"], "candidates": nl["candidates"], **summary,
                  "paths": {k: str(v) for k, v in models.items()}}
        result["gates"] = gates(result, ARMS)
        result["best"] = result["gates"]["best_kd_arm"]
        write_json_atomic(out, result)
        for name, row in result["models"].items():
            print(f"[pilot] eval {name}: " + ", ".join(
                f"{k} {v['value']:.4g} [{v['ci95'][0]:.4g}, {v['ci95'][1]:.4g}]"
                for k, v in row.items()), flush=True)
        return result["gates"]

    inputs = [heldout, e["next_line"]["file"], p.s["teacher"],
              *(d / "model.safetensors" for d in models.values())]
    return p.stage("eval", {**e, "seed": p.s["seed"]}, inputs, [out], run)


def stage_export(p: Pilot):
    from export import cli

    x, model = p.s["export"], student_dir(p, shipped(p))
    opts = {k: v for k, v in x.items() if k not in ("config", "formats") and v}

    def run():
        sizes = {}
        for fmt in x["formats"]:
            argv = ["--model", str(model), "--config", x["config"], "--out",
                    str(package_dir(p.dir, fmt)), "--weights", fmt, "--embedding", fmt, *flags(opts)]
            manifest = cli.run(cli.parse_args(argv))
            sizes[fmt] = manifest["package_bytes"]
        return {"package_bytes": sizes}

    settings = {**x, "export_config": Path(x["config"]).read_text()}
    outputs = [package_dir(p.dir, f) / "export_manifest.json" for f in x["formats"]]
    return p.stage("export", settings, [model / "model.safetensors", model / "config.json"],
                   outputs, run)


def stage_probe(p: Pilot):
    """The parity probe per package; its exit status (0 ok, 1 a gate failed, 2 could not run)
    is recorded as mlx_student.probe would exit."""
    from export import probe

    model = student_dir(p, shipped(p))
    pkgs = {f: package_dir(p.dir, f) for f in p.s["export"]["formats"]}

    def run():
        exits = {}
        for fmt, d in pkgs.items():
            argv = ["--model", str(model), "--package", str(d / "model.mlpackage"), "--out",
                    str(probe_dir(p.dir, fmt)), *flags(p.s["probe"])]
            try:
                report = probe.run(probe.parse_args(argv))
                exits[fmt] = {"exit": 0 if report["ok"] else 1,
                              "failed": [g["gate"] for g in report["gates"] if not g["ok"]]}
            except (ConfigError, probe.ProbeError, probe.tp.TapMappingError, FileNotFoundError,
                    ValueError, KeyError) as e:  # what mlx_student.probe exits 2 on
                exits[fmt] = {"exit": 2, "error": f"{type(e).__name__}: {e}"}
            write_json_atomic(probe_dir(p.dir, fmt) / "exit.json", exits[fmt])
        return exits

    outputs = [probe_dir(p.dir, f) / "exit.json" for f in pkgs]
    return p.stage("probe", p.s["probe"], [model, *pkgs.values()], outputs, run)


def stage_bench(p: Pilot):
    from runtime import bench

    model, out = student_dir(p, shipped(p)), p.dir / "bench"

    def run():
        r = bench.bench(["--model", str(model), "--out", str(out), *flags(p.s["bench"])])
        return {"decode_tps": r["decode_tps"], "achieved_pct": r["roofline"]["achieved_pct"]}

    return p.stage("bench", p.s["bench"], [model / "model.safetensors"], [out / "bench.json"], run)


def stage_tool_calls(p: Pilot):
    """Constrained tool calls from the shipped student: every output must parse and match the
    schema."""
    model, out = student_dir(p, shipped(p)), p.dir / "tool_calls.json"

    def run():
        import jsonschema
        from runtime.bench import TOOL
        from runtime.constrained import engine_vocab, json_schema_processor, tool_call_schema
        from runtime.generate import GenerationParams, MLXEngine, chat_prompt, generate

        t = p.s["tool_calls"]
        engine = MLXEngine.load(model)
        schema = tool_call_schema([TOOL])
        prompt = chat_prompt(engine.tokenizer, [{"role": "user", "content":
                                                 "What is the weather in Lyon for 3 days?"}], [TOOL])
        calls = []
        for seed in range(p.s["seed"] * t["n"], (p.s["seed"] + 1) * t["n"]):
            proc = json_schema_processor(engine.tokenizer, schema, engine_vocab(engine))
            r = generate(engine, prompt, GenerationParams(
                max_tokens=t["max_tokens"], temperature=t["temperature"], seed=seed),
                logits_processors=[proc])
            try:
                jsonschema.validate(json.loads(r.text), schema)
                error = None
            except (ValueError, jsonschema.ValidationError) as e:
                error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            calls.append({"seed": seed, "text": r.text, "finish_reason": r.finish_reason,
                          "tokens": len(r.tokens), "valid": error is None, "error": error})
        valid = sum(c["valid"] for c in calls)
        write_json_atomic(out, {"schema": schema, "prompt_tokens": len(prompt), "settings": t,
                         "valid": valid, "n": len(calls), "calls": calls})
        return {"valid": valid, "n": len(calls)}

    return p.stage("tool_calls", {**p.s["tool_calls"], "seed": p.s["seed"]},
                   [model / "model.safetensors"], [out], run)


def run(settings: dict, force=()) -> Pilot:

    check_settings(settings)
    p = Pilot(settings, STAGES, force)
    p.dir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    stage_teacher(p)
    stage_kd_mix(p)
    stage_score(p)
    stage_train_data(p)
    stage_prune(p)
    for arm in ARMS:
        stage_train(p, arm)
    stage_eval(p)
    stage_export(p)
    stage_probe(p)
    stage_bench(p)
    stage_tool_calls(p)
    write_json_atomic(p.dir / "pilot_log.json", {"stages": p.log, "settings": settings,
                                          "seconds": round(time.perf_counter() - tic, 1)})
    files = report.write(p.dir, settings)
    print(f"[pilot] report: {files['md']} and {files['html']}")
    return p


def build_parser():
    p = argparse.ArgumentParser(
        prog="mlx_student.pilot", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"stages: {', '.join(STAGES)}. pilot: defaults: {json.dumps(PILOT_DEFAULTS)}")
    p.add_argument("--config", required=True, help="student config with an optional pilot: block")
    p.add_argument("--quick", action="store_true", help="the pilot: block's quick: settings "
                   "(a few minutes); runs under runs/<name>_quick")
    p.add_argument("--name", help="run name: runs/<name>/ (default: the config's pilot.name)")
    p.add_argument("--seed", type=int, help="seed of kd_mix, score, training and the bootstrap "
                   "(default: pilot.seed, else the config's seed); another seed runs under "
                   "runs/<name>_seed<seed>/")
    p.add_argument("--force", nargs="+", default=[], choices=[*STAGES, "all"],
                   help="redo these stages even if their stamps are current")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run(settings_of(args.config, args.quick, args.name, args.seed), args.force)
    except (ConfigError, DataError, StageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
