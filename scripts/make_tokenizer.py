"""Train the second real tokenizer of the cross-tokenizer KD tests and study: a byte-level BPE
on the local corpus (mlx_student.bpe), saved as a Hugging Face tokenizer folder.

    python scripts/make_tokenizer.py [--data data/stdlib] [--out models/stdlib-bpe-8k] [--vocab-size 8192]

Idempotent: a folder trained with the same settings is left as it is (a few seconds otherwise).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_student.bpe import train_byte_bpe


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/stdlib", help="folder with train.jsonl ({\"text\": ...} lines)")
    p.add_argument("--out", default="models/stdlib-bpe-8k", help="tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokens, special tokens included")
    p.add_argument("--max-bytes", type=int, help="train on at most this much of the corpus (default: all)")
    args = p.parse_args(argv)
    corpus = Path(args.data) / "train.jsonl"
    if not corpus.is_file():
        sys.exit(f"error: {corpus}: no such file (make the corpus first: scripts/make_text_corpus.py)")
    if args.vocab_size < 260:
        sys.exit(f"error: --vocab-size {args.vocab_size}: at least 260 (256 bytes + 3 special tokens)")
    tic = time.perf_counter()
    out = train_byte_bpe(corpus, args.out, args.vocab_size, args.max_bytes)
    print(f"{out}: byte-level BPE, vocab {args.vocab_size} ({time.perf_counter() - tic:.1f} s)")


if __name__ == "__main__":
    main()
