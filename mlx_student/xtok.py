"""Cross-tokenizer KD: teacher targets made with another tokenizer, mapped onto the student's.

The production teacher (any model behind an API) and a pretrained student base do not share
a tokenizer, so the teacher's stored top-k ids mean nothing to the student. This module
re-expresses KD records made with the teacher's tokenizer in the student's:

1. The teacher's token ids give the exact bytes of the text (byte-level BPE: every token is
   a byte string; special tokens are one unit each). The student's tokenizer encodes the same
   text, and each token of either side gets its span ``[start, end)`` in that byte stream.
2. Positions align where both sides predict a token that starts at the same byte, i.e. where
   their contexts END at the same byte (a common token boundary). Elsewhere (a boundary inside
   a token of the other side) the student learns by CE only; those positions are counted.
3. At an aligned position each teacher candidate (its top-k ids, or sampled ids) is mapped to
   the student's FIRST token of that candidate's text (the boundary is shared, so the
   student's next token starts at the same byte), and the probabilities (or counts) of
   candidates with the same student id are summed. The rest of the teacher's mass stays the
   tail bucket of ``topk_kd`` (candidates with no student counterpart, e.g. a special token
   the student lacks, join the tail).

The converted records are ordinary ``kd`` records of the student (mlx_student.data) with an
empty target list at unaligned positions, so ``topk_kd``, ``sampled_kd`` and ``uld``
(mlx_student.losses) train on them unchanged. Approach: byte-span alignment as in
cross-tokenizer distillation work (e.g. MinED/DSKD-style span alignment); the loss that needs
no mapping at all is ULD (Boizard et al., arXiv 2402.12030).

Limits: a teacher token longer than the student's (teacher "foobar", student "foo" + "bar")
has its mass put on the student's first piece, a distribution over next *tokens* that differ
in length; tokenizers that are not byte-level (SentencePiece with "▁", tiktoken without a
Hugging Face tokenizer.json) are refused, naming the folder.
"""

import codecs
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .data import SPLITS, DataError

BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}  # GPT-2's byte <-> printable char map


class AlignError(ValueError):
    """A record whose tokens cannot be aligned; the message names the field."""


def _hf(tokenizer):
    """The Hugging Face tokenizer of an mlx-lm TokenizerWrapper, or ``tokenizer`` itself."""
    return tokenizer if hasattr(type(tokenizer), "backend_tokenizer") else tokenizer._tokenizer


@dataclass
class TokenBytes:
    """Each token id's bytes under a byte-level BPE tokenizer, and its special tokens.

    ``bytes_of[i]`` is the UTF-8 (or partial UTF-8) byte string of token i; special tokens
    (``special``: id -> content) are single units of the stream, not text."""

    tokenizer: object
    bytes_of: list
    special: dict
    eos_ids: set
    by_bytes: dict = field(default_factory=dict)  # bytes -> id (ordinary tokens)
    special_by_content: dict = field(default_factory=dict)

    @classmethod
    def of(cls, tokenizer, name="the tokenizer"):
        """Raises AlignError when ``tokenizer`` is not byte-level BPE (its token bytes unknown)."""
        hf = _hf(tokenizer)
        decoder = json.loads(hf.backend_tokenizer.to_str()).get("decoder") or {}
        kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
        if "ByteLevel" not in kinds:
            raise AlignError(f"{name}: not a byte-level BPE tokenizer (decoder {kinds or None}); "
                             "cross-tokenizer alignment needs each token's bytes")
        vocab = hf.get_vocab()
        added = hf.added_tokens_decoder
        bytes_of = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            if i in added:
                bytes_of[i] = added[i].content.encode()
            else:
                try:
                    bytes_of[i] = bytes(BYTE_OF[c] for c in token)
                except KeyError:
                    raise AlignError(f"{name}: token {i} {token!r} is not a byte-level token") from None
        special = {i: t.content for i, t in added.items() if t.special}
        out = cls(tokenizer, bytes_of, special, set(getattr(tokenizer, "eos_token_ids", None)
                                                    or {hf.eos_token_id}))
        out.by_bytes = {b: i for i, b in enumerate(bytes_of) if i not in special and b}
        out.special_by_content = {c: i for i, c in special.items()}
        return out


def _split_utf8(data: bytes):
    """(lead, text, tail): ``data`` without the continuation bytes it starts with (a character
    cut by a window's start) and the incomplete character it ends with."""
    lead = 0
    while lead < min(len(data), 3) and 0x80 <= data[lead] < 0xC0:
        lead += 1
    text = codecs.getincrementaldecoder("utf-8")().decode(data[lead:], final=False)
    return lead, text, len(data) - lead - len(text.encode())


class Aligner:
    """Maps KD targets from the ``teacher`` tokenizer's ids to the ``student``'s."""

    def __init__(self, teacher, student, teacher_name="teacher tokenizer",
                 student_name="student tokenizer"):
        self.t = TokenBytes.of(teacher, teacher_name)
        self.s = TokenBytes.of(student, student_name)
        self.student = student
        self._first = {}

    def student_special(self, tid):
        """The student's id for teacher special token ``tid`` (same content; eos -> eos), or None."""
        sid = self.s.special_by_content.get(self.t.special[tid])
        if sid is None and tid in self.t.eos_ids:
            sid = min(self.s.eos_ids)
        return sid

    def first_token(self, tid):
        """The student's first token of teacher token ``tid``'s text, or None (a special
        token the student lacks). Text that is valid UTF-8 is encoded by the student; a
        partial character (byte-level tokens may split one) maps to the student's longest
        token that is a prefix of its bytes."""
        if tid in self._first:
            return self._first[tid]
        if tid in self.t.special:
            sid = self.student_special(tid)
        else:
            data = self.t.bytes_of[tid]
            try:
                ids = self.student.encode(data.decode(), add_special_tokens=False)
                sid = ids[0] if ids else None
            except UnicodeDecodeError:
                sid = next((self.s.by_bytes[data[:n]] for n in range(len(data), 0, -1)
                            if data[:n] in self.s.by_bytes), None)
        self._first[tid] = sid
        return sid

    def retokenize(self, teacher_ids, field="ids"):
        """The student's tokens of the text that ``teacher_ids`` spell.

        Returns ``(student_ids, teacher_spans (n, 2), student_spans (m, 2))``: spans in units
        of the stream (a byte of text, or one special token). Text between special tokens is
        encoded by the student segment by segment; a character cut at a segment's edge (a
        window boundary) has no student token. Raises AlignError naming ``field``."""
        t_spans, s_ids, s_spans = [], [], []
        segment, seg_start, pos = bytearray(), 0, 0

        def flush():
            lead, text, _ = _split_utf8(bytes(segment))
            at = seg_start + lead
            for sid in self.student.encode(text, add_special_tokens=False) if text else []:
                n = len(self.s.bytes_of[sid])
                s_ids.append(sid)
                s_spans.append((at, at + n))
                at += n
            if bytes(segment[lead : at - seg_start]) != text.encode():
                raise AlignError(f"field {field!r}: the student's tokens do not spell the text's "
                                 "bytes (a tokenizer with a normalizer?)")

        for k, tid in enumerate(teacher_ids):
            if tid in self.t.special:
                flush()
                sid = self.student_special(tid)
                if sid is None:
                    raise AlignError(f"field '{field}[{k}]': the teacher's special token "
                                     f"{self.t.special[tid]!r} has no counterpart in the "
                                     "student's vocabulary")
                s_ids.append(sid)
                s_spans.append((pos, pos + 1))
                t_spans.append((pos, pos + 1))
                pos += 1
                segment, seg_start = bytearray(), pos
            else:
                data = self.t.bytes_of[tid]
                t_spans.append((pos, pos + len(data)))
                pos += len(data)
                segment += data
        flush()
        return (s_ids, np.array(t_spans, np.int64).reshape(-1, 2),
                np.array(s_spans, np.int64).reshape(-1, 2))

    def map_pairs(self, pairs, counts=False):
        """Teacher ``[[id, logprob], ...]`` (or ``[[id, count], ...]`` with ``counts``) as the
        student's: each id -> its first student token, values of one student id summed
        (probabilities, or counts), sorted by value, largest first; ids with no student token
        are left out (their mass joins the tail). Returns ``(pairs, mass left out)``."""
        merged, lost = {}, 0.0
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
                    and 0 <= pair[0] < len(self.t.bytes_of) and isinstance(pair[1], (int, float))):
                raise AlignError(f"expected an [id, {'count' if counts else 'logprob'}] pair of "
                                 f"the teacher's vocabulary, got {json.dumps(pair)}")
            tid, value = pair
            sid = self.first_token(tid)
            v = value if counts else math.exp(min(value, 0.0))
            if sid is None:
                lost += v
            else:
                merged[sid] = merged.get(sid, 0.0) + v
        ordered = sorted(merged.items(), key=lambda kv: -kv[1])
        if counts:
            return [[sid, int(c)] for sid, c in ordered], lost
        return [[sid, math.log(p) if p > 0 else -1e30] for sid, p in ordered if p > 0], lost

    def convert(self, record):
        """A KD record with teacher ids (a scored-text record, or a completion with
        ``completion_ids`` and ``topk`` / ``sampled``) as the student's record, plus its stats
        {targets, aligned, agree, lost_mass}; records without teacher ids come back unchanged
        (the student tokenizes their text: sequence-level KD). Raises AlignError."""
        scored = "ids" in record and "messages" not in record
        key = "ids" if scored else "completion_ids"
        if record.get(key) is None:
            return record, None
        ids = record[key]
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < len(self.t.bytes_of)
                                                for i in ids):
            raise AlignError(f"field {key!r}: expected the teacher tokenizer's token ids")
        s_ids, t_spans, s_spans = self.retokenize(ids, key)
        first = 1 if scored else 0  # scored text: ids[0] is context only
        # target k of either side is the token at index first + k; it starts where its context ends
        teacher_at = {int(start): k for k, start in enumerate(t_spans[first:, 0])}
        out = {k: v for k, v in record.items() if k not in ("topk", "sampled")}
        out[key] = s_ids
        if scored:
            out["text"] = self.student.decode(s_ids)
        n = max(len(s_ids) - first, 0)
        match = [teacher_at.get(int(start)) for start in s_spans[first:, 0]]
        stats = {"targets": n, "aligned": sum(m is not None for m in match), "agree": 0,
                 "lost_mass": 0.0}
        for kind in ("topk", "sampled"):
            rows = record.get(kind)
            if rows is None:
                continue
            if not isinstance(rows, list) or len(rows) != len(ids) - first:
                raise AlignError(f"field {kind!r}: expected {len(ids) - first} entries, one per "
                                 f"teacher target token")
            mapped = []
            for j, m in enumerate(match):
                if m is None:
                    mapped.append([])
                    continue
                try:
                    pairs, lost = self.map_pairs(rows[m], counts=kind == "sampled")
                except (AlignError, TypeError) as e:
                    raise AlignError(f"field '{kind}[{m}]': {e}") from None
                mapped.append(pairs)
                if kind == "topk":
                    stats["lost_mass"] += lost
            out[kind] = mapped
        for j, m in enumerate(match):  # the teacher's own next token, mapped, vs the student's
            if m is not None and self.first_token(ids[first + m]) == s_ids[first + j]:
                stats["agree"] += 1
        return out, stats


def read_back(path):
    """Target positions of a converted file's records with teacher targets, and how many of
    them carry a target (aligned) or none (unaligned: CE only)."""
    targets = aligned = records = 0
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            rows = r.get("topk") if r.get("topk") is not None else r.get("sampled")
            if rows is None:
                continue
            records += 1
            targets += len(rows)
            aligned += sum(1 for row in rows if row)
    return {"records_with_targets": records, "target_positions": targets, "aligned": aligned,
            "unaligned": targets - aligned, "aligned_fraction": aligned / max(targets, 1)}


def convert_folder(src, dst, aligner):
    """Convert every split of the KD data folder ``src`` into ``dst`` (``Aligner.convert``).
    Returns {split: counts read back from the written file, plus ``first_token_agreement``
    (how often the teacher's own next token maps to the student's) and ``lost_mass_mean``}.
    Raises DataError naming the file, line and field of a record that does not align."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    report = {}
    for split in SPLITS:
        path = src / f"{split}.jsonl"
        if not path.is_file():
            continue
        totals = {"targets": 0, "aligned": 0, "agree": 0, "lost_mass": 0.0}
        with open(path) as f, open(dst / path.name, "w") as out:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    out.write("\n")  # keeps line numbers: mlx_student.data's errors name the source's
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise AlignError("expected a JSON object")
                    converted, stats = aligner.convert(record)
                except (AlignError, ValueError) as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
                for k, v in (stats or {}).items():
                    totals[k] += v
                out.write(json.dumps(converted, ensure_ascii=False) + "\n")
        counts = read_back(dst / path.name)
        counts["first_token_agreement"] = totals["agree"] / max(totals["aligned"], 1)
        counts["lost_mass_mean"] = totals["lost_mass"] / max(totals["aligned"], 1)
        report[split] = counts
    return report


KD_TERMS = ("topk_kd", "sampled_kd", "uld")  # losses that read stored teacher targets
CROSS_MODES = {"uld": "uld", "topk_kd": "cross_tokenizer_topk", "sampled_kd": "cross_tokenizer_sampled"}


def _first_with_ids(data_dir):
    """(path, line number, record) of the first record holding teacher token ids, or None."""
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.jsonl"
        if not path.is_file():
            continue
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if '"ids"' not in line and '"completion_ids"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # mlx_student.data names the bad line when it loads the file
                if isinstance(record, dict) and (record.get("completion_ids") is not None or (
                        record.get("ids") is not None and "messages" not in record)):
                    return path, lineno, record
    return None


def _manifest_tokenizer(data_dir):
    """(vocab hash, tokenizer folder, 'FILE: field') the folder's manifest.json gives for the
    records' token ids (mlx_student.score: tokenizer_hash and teacher.model; mlx_student.kd_mix:
    student_tokenizer), or None."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not JSON ({e})") from None
    if isinstance(m.get("tokenizer_hash"), str):
        return m["tokenizer_hash"], (m.get("teacher") or {}).get("model"), f"{path}: tokenizer_hash"
    st = m.get("student_tokenizer")
    if isinstance(st, dict) and isinstance(st.get("vocab_hash"), str):
        return st["vocab_hash"], st.get("path"), f"{path}: student_tokenizer.vocab_hash"
    return None


def _decodes(record, tokenizer):
    """Whether the record's token ids spell its text under ``tokenizer`` (same vocabulary)."""
    scored = "messages" not in record
    ids, text = (record["ids"], record.get("text")) if scored else (
        record["completion_ids"], record.get("completion"))
    try:
        return tokenizer.decode(ids) == text
    except (TypeError, ValueError, IndexError, OverflowError):  # ids outside the vocabulary
        return False


def prepare(data_dir, student, loss, tmp, teacher_tokenizer=None, teacher=None):
    """The data folder to train on and the KD report of the run.

    Finds which tokenizer the records' token ids belong to (``teacher_tokenizer``, a folder;
    else the folder's manifest.json; else a check that the first record's ids spell its
    text under the student's tokenizer). Records of another tokenizer are converted into
    ``tmp`` (``convert_folder``); records without ids are text (sequence-level KD).
    ``loss``: the run's loss mix; ``teacher``: an in-process teacher's folder (dense KD needs
    the student's vocabulary). Returns ``(folder, report)`` with report ``kd_mode``
    (same_tokenizer | cross_tokenizer_topk | cross_tokenizer_sampled | uld | sequence) and,
    when converted, per-split counts of aligned / unaligned positions read back from the
    converted files. Raises DataError naming the file and field of a combination that would
    be misread."""
    from mlx_lm.utils import load_tokenizer

    from .teacher.kd_mix import vocab_hash

    data_dir = Path(data_dir)
    student_hash = vocab_hash(student)
    used = [n for n, w in loss.items() if w]
    if teacher and vocab_hash(load_tokenizer(Path(teacher))) != student_hash:
        raise DataError(f"teacher: {teacher} has another tokenizer than the student's; dense KD "
                        "(forward_kl, reverse_kl, jsd) needs one vocabulary: score text with it "
                        "(mlx_student.score) and train on those records, aligned across tokenizers")
    first = _first_with_ids(data_dir)
    kd_terms = [n for n in used if n in KD_TERMS]
    report = {"data": str(data_dir), "student_tokenizer_hash": student_hash}
    if first is None:
        if kd_terms:
            raise DataError(f"{data_dir}: no record holds teacher token ids and targets (text "
                            f"only), so loss.{kd_terms[0]} has nothing to distil; sequence-level "
                            "KD on this text is loss: {ce: 1}")
        return data_dir, {**report, "kd_mode": "same_tokenizer" if teacher else "sequence"}
    from_manifest = _manifest_tokenizer(data_dir)
    records_hash = from_manifest[0] if from_manifest else None
    tok_dir = teacher_tokenizer or (from_manifest[1] if from_manifest else None)
    if teacher_tokenizer:
        records_tok = load_tokenizer(Path(teacher_tokenizer))
        if records_hash and vocab_hash(records_tok) != records_hash:
            raise DataError(f"{from_manifest[2]}: the records were made with tokenizer hash "
                            f"{records_hash[:12]}..., not teacher_tokenizer {teacher_tokenizer} "
                            f"({vocab_hash(records_tok)[:12]}...)")
        records_hash = vocab_hash(records_tok)
    elif records_hash is None:  # no manifest: the ids must spell the text under the student's
        path, lineno, record = first
        if _decodes(record, student):
            records_hash = student_hash
        else:
            key = "ids" if "messages" not in record else "completion_ids"
            raise DataError(f"{path}:{lineno}: field {key!r}: the token ids do not spell the "
                            "record's text under the student's tokenizer: the records were made "
                            "with another tokenizer; set teacher_tokenizer (--teacher-tokenizer) "
                            "to its folder to map them onto the student's tokens")
    if records_hash == student_hash:
        mode = "same_tokenizer" if kd_terms or teacher else "sequence"
        return data_dir, {**report, "kd_mode": mode, "records_tokenizer_hash": records_hash}
    if teacher_tokenizer is None:  # the manifest names the records' tokenizer folder
        records_tok = load_tokenizer(Path(tok_dir)) if tok_dir and Path(tok_dir).is_dir() else None
        if records_tok is None or vocab_hash(records_tok) != records_hash:
            raise DataError(f"{from_manifest[2]}: the records were made with another tokenizer "
                            f"than the student's (hash {records_hash[:12]}...; folder {tok_dir!r} "
                            "is missing or holds another one); set teacher_tokenizer "
                            "(--teacher-tokenizer) to that tokenizer's folder")
    try:
        aligner = Aligner(records_tok, student, f"teacher tokenizer {tok_dir}", "the student's tokenizer")
    except AlignError as e:
        raise DataError(str(e)) from None
    splits = convert_folder(data_dir, tmp, aligner)
    mode = next((CROSS_MODES[n] for n in ("uld", "topk_kd", "sampled_kd") if n in used), "sequence")
    return Path(tmp), {**report, "kd_mode": mode, "records_tokenizer": str(tok_dir),
                       "records_tokenizer_hash": records_hash, "splits": splits}
