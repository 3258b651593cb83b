"""Sentences of an answer with the context Claimify's stages see (pysbd, rule-based).

    sentences = split_answer(text, before=2, after=2)
    sentences[i].text, .preceding, .following, .start, .end

Claimify (Metropolitansky & Larson, arXiv 2502.10855) shows each stage one sentence with the
sentences around it (and the question): Selection and Disambiguation need them to resolve
"it", "this method", ..., and to tell whether a sentence only introduces a list. pysbd
(Sadvilkar & Neumann, 2020: Golden Rules segmentation) keeps abbreviations, dotted names
(`os.path.join()`), decimals and URLs inside their sentence; a blank line also ends one.

Errors are `AnswerError` naming the field: an empty answer, a sentence longer than
`max_sentence_chars` (a run-on blob no stage can read in its context), bytes that are not UTF-8.
"""

from dataclasses import dataclass
from pathlib import Path

import pysbd

MAX_SENTENCE_CHARS = 2000


class AnswerError(ValueError):
    """An answer (or question) that cannot be split; the message names the file and field."""


@dataclass
class Sentence:
    """One sentence; `start`/`end` are character offsets into the answer (end exclusive),
    `preceding`/`following` the neighbouring sentences' texts, nearest last/first."""

    index: int
    text: str
    start: int
    end: int
    preceding: list
    following: list


def _segments(text):
    """(start, end) of each non-blank sentence: pysbd spans, cut again at blank lines."""
    segmenter = pysbd.Segmenter(language="en", clean=False, char_span=True)
    for span in segmenter.segment(text):
        start = span.start
        for part in span.sent.split("\n\n"):
            stripped = part.strip()
            if stripped:
                left = start + part.index(stripped[0])
                yield left, left + len(stripped)
            start += len(part) + 2


def split_answer(text: str, before: int = 2, after: int = 2, max_sentence_chars: int = MAX_SENTENCE_CHARS,
                 where: str = "answer") -> list:
    """The sentences of `text`, each with up to `before` preceding and `after` following
    sentences. Raises AnswerError (naming `where`) for an empty text or an over-long sentence."""
    if not isinstance(text, str) or not text.strip():
        raise AnswerError(f"{where}: the answer is empty")
    spans = list(_segments(text))
    texts = [" ".join(text[s:e].split()) for s, e in spans]
    out = []
    for i, ((start, end), sentence) in enumerate(zip(spans, texts)):
        if len(sentence) > max_sentence_chars:
            raise AnswerError(
                f"{where}: sentence {i + 1} (characters {start}-{end}) is {len(sentence)} characters "
                f"long, over max_sentence_chars={max_sentence_chars}; split it or raise the limit")
        out.append(Sentence(i, sentence, start, end, texts[max(0, i - before):i], texts[i + 1:i + 1 + after]))
    return out


def read_text(path, field: str = "answer") -> str:
    """A UTF-8 text file; AnswerError names the file, the field and the first bad byte."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AnswerError(f"{path}: {field}: cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise AnswerError(f"{path}:{line}: {field}: not UTF-8 (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start})") from None
