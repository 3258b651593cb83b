"""Learning-rate sweep of the pilot's arms: a recipe check before a long run.

Trains each requested arm of a finished (or partly finished) `mlx_student.pilot` run at every
learning rate, from the run's own pruned init, on its own data, batches and seed (only the
rate differs), then scores all of them with the pilot's held-out evaluation (pilot/heldout.py:
full-vocabulary KL to the teacher, CE and teacher top-1 agreement on text no stage saw, with
bootstrap 95 % intervals). The pilot's own arms are not touched: sweep runs go under
runs/<name>/sweep/<arm>_lr<rate>/ (reused when already trained with the same settings, init
and data); the pilot's arms, when trained, join the table at the config's rate. Each KD run
is also compared with the control at the same rate and flags (paired intervals).

    python scripts/sweep_pilot.py --config configs/pilot.yaml --arms control topk_kd \
        --lr 1e-4 3e-4 1e-3 [--seed N] [--iters 20] [--train-args '--no-group-by-length' --tag mixed]

Prints one row per (arm, rate) and writes runs/<name>/sweep/sweep.json. The pilot's data
(kd_mix, score, train_data) and pruned init must exist: run the pilot (or its stages up to
`prune`) first.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_student.files import write_json_atomic
from pilot import run as pr
from pilot.paths import train_data_dir
from pilot.stage import Pilot, cpu_seconds, tree_hash


def train_one(s, arm, lr, iters, extra, out):
    """One arm at one rate (skipped when out/ holds a model trained with the same argv)."""
    from mlx_student import train

    argv = pr.train_argv(s, arm, Path("runs") / s["name"] / "pruned")
    argv += ["--out", str(out), "--learning-rate", str(lr), *extra]
    argv += ["--iters", str(iters)] if iters else []
    key = {"argv": argv, "init": tree_hash(Path("runs") / s["name"] / "pruned" / "model.safetensors"),
           "data": tree_hash(train_data_dir(s))}
    stamp = out / "sweep_stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()) == key and (out / "model.safetensors").exists():
        print(f"[sweep] {out}: up to date", flush=True)
        return {}
    tic, cpu = time.perf_counter(), cpu_seconds()
    train.run(train.parse_args(argv))
    write_json_atomic(stamp, key)
    return {"seconds": round(time.perf_counter() - tic, 1), "cpu_seconds": round(cpu_seconds() - cpu, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--arms", nargs="+", default=["control", "topk_kd"], choices=pr.ARMS)
    ap.add_argument("--lr", nargs="+", type=float, required=True, help="learning rates")
    ap.add_argument("--iters", type=int, help="steps (default: the pilot's)")
    ap.add_argument("--train-args", default="", help="more mlx_student.train flags for every "
                    "run, e.g. '--no-group-by-length'")
    ap.add_argument("--tag", default="", help="suffix of the runs' folder names")
    args = ap.parse_args(argv)

    s = pr.settings_of(args.config, seed=args.seed)
    p = Pilot(s, pr.STAGES, ())
    for need in (p.dir / "pruned" / "model.safetensors", train_data_dir(s) / "train.jsonl"):
        if not need.exists():
            print(f"error: {need} is missing: run mlx_student.pilot --config {args.config}"
                  f"{f' --seed {args.seed}' if args.seed is not None else ''} first", file=sys.stderr)
            sys.exit(2)
    runs = {}
    for arm in args.arms:
        for lr in args.lr:
            name = f"{arm}_lr{lr:g}{'_' + args.tag if args.tag else ''}"
            out = p.dir / "sweep" / name
            cost = train_one(s, arm, lr, args.iters, shlex.split(args.train_args), out)
            runs[name] = {"arm": arm, "lr": lr, "train_args": args.train_args, "path": str(out),
                          **cost}

    import mlx_lm

    from mlx_student.prune import text_batches
    from pilot import heldout as ho

    e = s["eval"]
    heldout, _ = pr.heldout_file(p)
    teacher, tok = mlx_lm.load(s["teacher"])
    batches = text_batches(heldout, tok, e["sequences"] * e["seq_len"], e["seq_len"], e["batch_size"])
    lr = s["train"]["learning_rate"]
    for arm in args.arms:  # the pilot's own arms, at the config's rate, when trained
        if (p.dir / arm / "model.safetensors").exists() and f"{arm}_lr{lr:g}" not in runs:
            runs[f"{arm}_lr{lr:g}"] = {"arm": arm, "lr": lr, "train_args": "", "path": str(p.dir / arm)}
    models = {"pruned": mlx_lm.load(str(p.dir / "pruned"))[0]}
    models.update({k: mlx_lm.load(r["path"])[0] for k, r in runs.items()})
    stats = ho.sequence_stats(models, teacher, batches)
    summary = ho.summarize(stats, {}, "pruned", e["resamples"], seed=s["seed"])
    ce0, ce_t = (summary["models"][k]["ce"]["value"] for k in ("pruned", "teacher"))
    print(f"{'run':<22} {'KL':>24} {'CE':>24} {'top-1 %':>22} {'gap closed':>10}")
    for name, row in summary["models"].items():
        kl, ce, t1 = (row[k] for k in ("kl", "ce", "top1_agree"))
        gap = (ce0 - ce["value"]) / (ce0 - ce_t)
        print(f"{name:<22} {kl['value']:8.4f} [{kl['ci95'][0]:.3f}, {kl['ci95'][1]:.3f}] "
              f"{ce['value']:8.4f} [{ce['ci95'][0]:.3f}, {ce['ci95'][1]:.3f}] "
              f"{100 * t1['value']:6.2f} [{100 * t1['ci95'][0]:.1f}, {100 * t1['ci95'][1]:.1f}] "
              f"{100 * gap:9.1f}%")
        if name in runs:
            runs[name]["gap_closed"] = gap
    print("paired differences from the control at the same rate and flags (negative KL, CE "
          "better; top-1 in points):")
    for name, r in runs.items():
        control = name.replace(r["arm"], "control", 1)
        if r["arm"] == "control" or control not in runs:
            continue
        d = ho.summarize({k: stats[k] for k in (control, name)}, {}, control, e["resamples"],
                         seed=s["seed"])["minus_control"][name]
        r["minus_control"] = d
        print(f"  {name} - {control}: " + ", ".join(
            f"{k} {f * v['value']:+.3f} [{f * v['ci95'][0]:+.3f}, {f * v['ci95'][1]:+.3f}]"
            for k, f, v in ((k, 100 if k == "top1_agree" else 1, d[k]) for k in ho.STATS)))
    write_json_atomic(p.dir / "sweep" / "sweep.json", {"runs": runs, "eval": summary})
    print(f"[sweep] {p.dir / 'sweep' / 'sweep.json'}")


if __name__ == "__main__":
    main()
