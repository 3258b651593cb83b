"""Write a text corpus from the CPython standard-library sources that ship with Python.

Real code, offline, licensed for this use (PSF). Each .py file is one {"text": ...} record;
files go to train/valid/test by a hash of their path (deterministic, stable as files are
added), in mlx-lm's --data folder layout:

    python scripts/make_text_corpus.py --out data/stdlib --max-chars 4000000
"""

import argparse
import hashlib
import json
import sysconfig
from pathlib import Path

from mlx_student.files import atomic_dir

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


def stdlib_files(root: Path):
    """The standard library's .py files, sorted, without test suites and installed packages."""
    for path in sorted(root.rglob("*.py")):
        if not SKIP_DIRS.intersection(path.relative_to(root).parts):
            yield path


def split_of(name: str, valid: float, test: float) -> str:
    u = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0x100000000
    return "test" if u < test else "valid" if u < test + valid else "train"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/stdlib"), help="output folder")
    parser.add_argument("--max-chars", type=int, default=4_000_000, help="stop after this much text")
    parser.add_argument("--valid", type=float, default=0.05, help="fraction of files for valid")
    parser.add_argument("--test", type=float, default=0.05, help="fraction of files for test")
    args = parser.parse_args()

    root = Path(sysconfig.get_paths()["stdlib"])
    counts, chars = {"train": 0, "valid": 0, "test": 0}, 0
    with atomic_dir(args.out) as tmp:
        files = {s: open(tmp / f"{s}.jsonl", "w") for s in counts}
        for path in stdlib_files(root):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if not text:
                continue
            name = str(path.relative_to(root))
            split = split_of(name, args.valid, args.test)
            files[split].write(json.dumps({"text": text}) + "\n")
            counts[split] += 1
            chars += len(text)
            if chars >= args.max_chars:
                break
        for f in files.values():
            f.close()
    print(f"{args.out}: {counts} files, {chars:,} characters from {root}")


if __name__ == "__main__":
    main()
