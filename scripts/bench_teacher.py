"""Local teacher throughput: one prompt at a time vs batched (mlx-lm BatchGenerator), same run.

    python scripts/bench_teacher.py [--records 16] [--max-tokens 48] [--batch-sizes 8 16 32]

The prompts are the pilot mix's (configs/kd_mix.yaml sources, seed 0). Every setting decodes
the same prompts greedily with exact top-k per token; the script prints records/s, tokens/s and
the ratio to one-at-a-time, and checks that the batched tokens equal the unbatched ones (a
difference is reported with the unbatched top-2 gap where it starts: an fp32 tie, or a bug).
"""

import argparse
import time
from pathlib import Path

import mlx_student  # noqa: F401  (OpenBLAS before mlx)
import yaml
from mlx_student.teacher import default as default_teacher, prompts
from mlx_student.teacher.local import LocalTeacher, LocalTeacherArgs

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    args = p.parse_args()
    cfg = yaml.safe_load((ROOT / "configs/kd_mix.yaml").read_text())
    teacher = LocalTeacher(LocalTeacherArgs(str(default_teacher.prepare()), top_k=args.top_k,
                                            max_tokens=args.max_tokens))
    jobs, _ = prompts.plan(cfg["sources"], args.records, 0, 0.0, 0.0, teacher.args.sampling())
    convs = [j.messages for j in jobs]
    teacher.generate(convs[0])  # warm-up
    rows, ref = [], None
    for bs in [1, *args.batch_sizes]:
        teacher.args.batch_size = bs
        tic = time.perf_counter()
        got = dict(teacher.generate_many(convs))
        dt = time.perf_counter() - tic
        out = [got[i] for i in range(len(convs))]
        tokens = sum(c.usage["completion_tokens"] for c in out)
        same = "" if ref is None else (
            f"{sum(a.completion_ids == b.completion_ids for a, b in zip(ref, out))}/{len(out)} "
            "same tokens")
        if ref is None:
            ref = out
        rows.append((bs, len(out) / dt, tokens / dt, same))
    base = rows[0][1]
    print("| batch | records/s | tokens/s | vs one at a time | greedy tokens |\n"
          "|---|---|---|---|---|")
    for bs, rps, tps, same in rows:
        print(f"| {bs} | {rps:.3f} | {tps:.1f} | {rps / base:.2f}x | {same or 'reference'} |")


if __name__ == "__main__":
    main()
