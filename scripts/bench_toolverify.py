"""Verifier speed: mlx_student.tools.toolverify items/s against its floor, measured in one run.

    python scripts/bench_toolverify.py [--data data/tools] [--n 300]

(a) the verifier (`toolverify.verify`: every check, spans round trip over a batched
re-tokenization); (b) the floor it cannot beat: rendering the chat template and batch-tokenizing
the same records, nothing else; (c) the spans round trip alone, record by record (its own
re-tokenization). Prints items/s and the ratios (a)/(b) and (a)/(c). Without --data it
generates --n gold traces in memory first.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from mlx_student.tools import spans, toolgen, toolverify  # (mlx_student first: OpenBLAS)
from mlx_student.tools.traces import gold_trace


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a folder of trace jsonl files (default: generate --n items)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--tokenizer", default="models/smollm2-135m-instruct")
    args = p.parse_args()
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(Path(args.tokenizer))
    tmp = None
    if args.data:
        folder = Path(args.data)
    else:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
        records = []
        for i in range(args.n):
            r = gold_trace(toolgen.make_item(0, i))
            r["spans"] = spans.compute(tokenizer, r)
            records.append(r)
        (folder / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    records = [json.loads(x) for f in toolverify._inputs([folder]) for x in f.read_text().splitlines() if x.strip()]

    tic = time.perf_counter()
    report = toolverify.verify([folder], tokenizer)
    a = len(records) / (time.perf_counter() - tic)

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    tic = time.perf_counter()
    for b in range(0, len(records), 64):
        texts = [tokenizer.apply_chat_template(r["messages"], tools=r["tools"], tokenize=False)
                 for r in records[b:b + 64]]
        hf(texts, add_special_tokens=False)
    floor = len(records) / (time.perf_counter() - tic)

    tic = time.perf_counter()
    for r in records:
        spans.check(tokenizer, r)
    c = len(records) / (time.perf_counter() - tic)

    print(f"{len(records)} records ({'passed' if report['passed'] else 'FAILED'} its gates)")
    print(f"(a) toolverify.verify           {a:8.1f} items/s")
    print(f"(b) render + batch tokenize     {floor:8.1f} items/s   (a)/(b) = {a / floor:.2f}")
    print(f"(c) spans.check, one by one     {c:8.1f} items/s   (a)/(c) = {a / c:.2f}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
