"""Score existing text with a teacher (teacher forcing): KD targets at one forward pass a window.

    mlx_student.score --data data/stdlib --out data/scored --top-k 32 --samples 64
    mlx_student.score --config configs/score.yaml --max-tokens 20000
    (python -m mlx_student.teacher.score ... before the console script is installed)

Generating a completion costs the teacher one decode step per token; scoring text that
already exists costs one batched forward pass per window, so most KD tokens can come from
here and only a few from generated completions (mlx_student.kd_mix). The text folder's
`{"text": ...}` records are tokenized and packed exactly as mlx_student.data packs text for
training (windows of max_seq_length + 1 tokens sharing one token), each split's windows
taken in a seeded order up to `max_tokens` target tokens. Every window becomes one
scored-text KD record (see mlx_student.data):

    {"text": <the window decoded>, "ids": [t0, ..., tn],
     "topk": [[[id, logprob], ...] x n], "sampled": [[[id, count], ...] x n]}

`topk` is the teacher's exact top-k (the trainer's `topk_kd` adds the tail as one bucket);
`sampled` holds `samples` = N draws from its full distribution per position as distinct ids
with counts (`sampled_kd`, unbiased; arXiv 2503.16870), keyed by (seed, window) so a rerun
or another batch size draws the same. Either can be switched off (0). Such records may share
a train.jsonl with kd_mix's completions (concatenate the files).

Out: `<out>/{train,valid,test}.jsonl` and `<out>/manifest.json` (teacher, tokenizer hash, k,
N, seed, and per split the records, target tokens and JSON bytes per token of each target
kind, read back from the written files), all written atomically (a folder rename).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import ConfigError, apply_config
from ..data import SPLITS, DataError, load_jsonl
from ..files import atomic_dir, write_json_atomic
from . import default as default_teacher
from .kd_mix import vocab_hash
from .local import LocalTeacher, LocalTeacherArgs

CONFIG_DEFAULTS = {
    "model": str(default_teacher.DEFAULT_TEACHER_DIR),
    "data": "data/stdlib",
    "out": "data/scored",
    "top_k": 32,
    "samples": 64,
    "max_seq_length": 256,
    "max_tokens": None,  # per split; None: every window
    "seed": 0,
    "batch_size": 8,
}


def build_parser():
    p = argparse.ArgumentParser(
        description="Score a text data folder with a teacher (teacher forcing, no generation) "
        "into scored-text KD records: exact top-k and/or N sampled ids per token.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"defaults: {json.dumps(CONFIG_DEFAULTS)}",
    )
    add = p.add_argument
    add("--config", help="YAML with these settings (flags override it)")
    add("--model", help="the teacher: an mlx-lm model folder (default: the embedded SmolLM2)")
    add("--data", help="folder of {\"text\": ...} jsonl files (train.jsonl, valid.jsonl, test.jsonl)")
    add("--out", help="output folder (replaced atomically)")
    add("--top-k", type=int, help="exact top-k entries per token (0: none)")
    add("--samples", type=int, help="N ids drawn from the full distribution per token (0: none)")
    add("--max-seq-length", type=int, help="tokens a window predicts (windows of this + 1)")
    add("--max-tokens", type=int, help="target tokens per split at most (default: all)")
    add("--seed", type=int, help="window order and sampling seed")
    add("--batch-size", type=int, help="windows per forward pass")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    apply_config(args, CONFIG_DEFAULTS)
    if args.top_k < 0 or args.samples < 0 or not (args.top_k or args.samples):
        raise ConfigError(f"top_k {args.top_k}, samples {args.samples}: one must be > 0, "
                          "neither negative")
    if args.max_seq_length < 1 or args.batch_size < 1:
        raise ConfigError("max_seq_length and batch_size must be >= 1")
    return args


def windows_of(path, tokenizer, vocab_size, max_seq_length, max_tokens, seed):
    """The packed windows of a text jsonl file (as the trainer packs them), in a seeded
    order, up to `max_tokens` target tokens."""
    split = load_jsonl(path, tokenizer, vocab_size, max_seq_length)
    if split.format != "text":
        raise DataError(f"{path}: format {split.format!r}; scoring takes text records "
                        '({"text": ...})')
    chunks = [ex.tokens.tolist() for ex in split.examples if len(ex.tokens) >= 2]
    out, tokens = [], 0
    for i in np.random.default_rng(seed).permutation(len(chunks)):
        if max_tokens is not None and tokens >= max_tokens:
            break
        out.append(chunks[i])
        tokens += len(chunks[i]) - 1
    return out


def read_back(path):
    """Records, target tokens and JSON bytes per token of topk / sampled of a written file."""
    records = tokens = 0
    size = {"topk": 0, "sampled": 0}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            records += 1
            tokens += len(r["ids"]) - 1
            for kind in size:
                if r.get(kind) is not None:
                    size[kind] += len(json.dumps(r[kind]))
    return {"records": records, "tokens": tokens,
            **{f"{k}_bytes_per_token": v / max(tokens, 1) for k, v in size.items() if v}}


def run(args):
    if Path(args.model) == default_teacher.DEFAULT_TEACHER_DIR:
        default_teacher.prepare()
    teacher = LocalTeacher(LocalTeacherArgs(args.model, batch_size=args.batch_size))
    tokenizer = teacher.tokenizer
    vocab_size = teacher.model.args.vocab_size
    data = Path(args.data)
    present = [s for s in SPLITS if (data / f"{s}.jsonl").is_file()]
    if "train" not in present:
        raise DataError(f"{data}: no train.jsonl")
    manifest = {"teacher": {"model": str(args.model), "mode": "teacher_forcing"},
                "tokenizer_hash": vocab_hash(tokenizer), "top_k": args.top_k,
                "samples": args.samples, "seed": args.seed, "max_seq_length": args.max_seq_length,
                "source": str(data), "splits": {}}
    with atomic_dir(args.out) as tmp:
        for split in present:
            windows = windows_of(data / f"{split}.jsonl", tokenizer, vocab_size,
                                 args.max_seq_length, args.max_tokens, args.seed)
            bar = tqdm(total=sum(len(w) - 1 for w in windows), desc=f"score {split}", unit="tok")
            with open(tmp / f"{split}.jsonl", "w") as f:
                for i, topk, sampled in teacher.score(windows, args.top_k, args.samples, args.seed):
                    record = {"text": tokenizer.decode(windows[i]), "ids": windows[i]}
                    if topk is not None:
                        record["topk"] = topk
                    if sampled is not None:
                        record["sampled"] = sampled
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bar.update(len(windows[i]) - 1)
            bar.close()
            manifest["splits"][split] = read_back(tmp / f"{split}.jsonl")
        write_json_atomic(tmp / "manifest.json", manifest)
    for split, c in manifest["splits"].items():
        print(f"{split}: {c['records']} windows, {c['tokens']} target tokens")
    print(f"wrote {args.out}")
    return manifest


def main(argv=None):
    try:
        run(parse_args(argv))
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
