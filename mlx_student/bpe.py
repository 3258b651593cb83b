"""Train a byte-level BPE tokenizer on a text corpus: a second real tokenizer for
cross-tokenizer KD (mlx_student.xtok) without any download.

    python scripts/make_tokenizer.py --data data/stdlib --out models/stdlib-bpe-8k

The tokenizer is GPT-2 style byte-level BPE (Hugging Face `tokenizers`: ByteLevel
pre-tokenizer without a prefix space, ByteLevel decoder, all 256 bytes in the alphabet, so
any text encodes and every token is a byte string), with ChatML special tokens
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`; eos `<|im_end|>`) and a ChatML chat
template, saved as a Hugging Face folder (tokenizer.json, tokenizer_config.json) that
`transformers.AutoTokenizer` and mlx-lm's `load_tokenizer` load.
"""

import json
from pathlib import Path

from .files import atomic_dir

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STAMP = "bpe_settings.json"  # what the folder was trained with: a rerun with the same is a no-op


def corpus_texts(path, max_bytes=None):
    """The ``text`` fields of a jsonl file, in order, up to ``max_bytes`` UTF-8 bytes (None: all)."""
    total = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            text = json.loads(line)["text"]
            yield text
            total += len(text.encode())
            if max_bytes is not None and total >= max_bytes:
                return


def train_byte_bpe(corpus, out, vocab_size=8192, max_bytes=None, min_frequency=2):
    """Train a byte-level BPE of ``vocab_size`` tokens (specials included) on the texts of
    ``corpus`` (a ``{"text": ...}`` jsonl file, at most ``max_bytes`` of it) and save it at
    ``out`` as a Hugging Face tokenizer folder, atomically. Idempotent: a folder trained with
    the same settings is kept as it is. Returns ``out`` as a Path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    settings = {"corpus": str(Path(corpus).resolve()), "vocab_size": vocab_size,
                "max_bytes": max_bytes, "min_frequency": min_frequency}
    if (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == settings:
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_texts(corpus, max_bytes), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], model_max_length=1 << 20)
    fast.chat_template = CHAT_TEMPLATE
    with atomic_dir(out) as tmp:
        fast.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(settings, indent=2) + "\n")
    return out
