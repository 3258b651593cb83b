"""Cross-tokenizer KD (mlx_student.xtok, the `uld` loss; issue 15, item 4): the default teacher's
SmolLM2 tokenizer against a byte-level BPE trained on the local corpus (conftest's bpe_dir)."""

import json
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, write_jsonl

from mlx_student.data import DataError
from mlx_student.losses import uld
from mlx_student.xtok import Aligner, AlignError, TokenBytes, prepare

# code, spaces, a tab, newlines and multi-byte characters (2 and 3 bytes)
TEXT = 'if ŧ:\n\treturn "naïve→"\n'


@pytest.fixture(scope="module")
def aligner(tokenizer, bpe_tokenizer):
    return Aligner(tokenizer, bpe_tokenizer)


def pieces(tok, ids):
    return [tok._tokenizer.convert_ids_to_tokens(i) for i in ids]


def test_spans_and_common_boundaries_hand_checked(aligner, tokenizer, bpe_tokenizer):
    assert TEXT.encode() == b'if \xc5\xa7:\n\treturn "na\xc3\xafve\xe2\x86\x92"\n'
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    s_ids, t_spans, s_spans = aligner.retokenize(ids)
    # SmolLM2 (GPT-2 byte-level): "Ġ" is a space, "Å" + "§" the two bytes of ŧ, split
    assert pieces(tokenizer, ids) == ["if", "ĠÅ", "§", ":", "Ċ", "ĉ", "return", 'Ġ"', "na",
                                      "Ã¯ve", "âĨĴ", '"', "Ċ"]
    assert t_spans.tolist() == [[0, 2], [2, 4], [4, 5], [5, 6], [6, 7], [7, 8], [8, 14],
                                [14, 16], [16, 18], [18, 22], [22, 25], [25, 26], [26, 27]]
    # the BPE of the first MiB of the corpus: ï and → are rare there, so their bytes stay apart
    assert s_ids == bpe_tokenizer.encode(TEXT, add_special_tokens=False)
    assert pieces(bpe_tokenizer, s_ids) == ["if", "Ġ", "Å", "§", ":", "Ċ", "ĉ", "return", 'Ġ"',
                                            "n", "a", "Ã", "¯", "ve", "â", "Ĩ", "Ĵ", '"', "Ċ"]
    assert s_spans[:, 1].tolist() == [2, 3, 4, 5, 6, 7, 8, 14, 16, 17, 18, 19, 20, 22, 23, 24,
                                      25, 26, 27]
    # common boundaries: ends of both; 4 lies inside ŧ yet both split there; 19 (inside ï) and
    # 23, 24 (inside →) are the BPE's alone
    common = sorted(set(t_spans[:, 1].tolist()) & set(s_spans[:, 1].tolist()))
    assert common == [2, 4, 5, 6, 7, 8, 14, 16, 18, 22, 25, 26, 27]

    # a scored-text record: topk[i] predicts ids[i + 1]; the student's target j + 1 is aligned
    # where its start (= the end of its context) is a teacher target's start
    record = {"text": TEXT, "ids": ids, "topk": [[[t, -0.1]] for t in ids[1:]]}
    out, stats = aligner.convert(record)
    aligned = [j for j, row in enumerate(out["topk"]) if row]
    starts = s_spans[1:, 0].tolist()
    assert [starts[j] for j in aligned] == [2, 4, 5, 6, 7, 8, 14, 16, 18, 22, 25, 26]
    assert (stats["targets"], stats["aligned"], stats["lost_mass"]) == (18, 12, 0.0)
    assert 0 < stats["agree"] <= 12
    assert out["ids"] == s_ids and out["text"] == TEXT
    # the teacher's next token is the student's first piece where they agree: ":" -> ":"
    j = starts.index(5)
    assert out["topk"][j] == [[bpe_tokenizer.encode(":", add_special_tokens=False)[0],
                               pytest.approx(-0.1, abs=1e-15)]]


def test_window_cut_inside_a_character(tokenizer, bpe_tokenizer):
    """Teacher windows may start or end inside a character (byte-level tokens split one): the
    cut bytes have no student token and their positions are not aligned."""
    rev = Aligner(bpe_tokenizer, tokenizer)  # the BPE as teacher: it splits ï into Ã + ¯
    ids = bpe_tokenizer.encode(TEXT, add_special_tokens=False)
    window = ids[12:16]  # "¯", "ve", "â", "Ĩ": starts after ï's first byte, ends inside →
    s_ids, t_spans, s_spans = rev.retokenize(window)
    assert t_spans.tolist() == [[0, 1], [1, 3], [3, 4], [4, 5]]
    assert tokenizer.decode(s_ids) == "ve" and s_spans.tolist() == [[1, 3]]
    out, stats = rev.convert({"text": "", "ids": window, "topk": [[[1, -1.0]]] * 3})
    assert out["ids"] == s_ids and stats["targets"] == 0 and out["topk"] == []


def test_mapped_mass_is_conserved(aligner, tokenizer, bpe_tokenizer):
    """Each teacher candidate's probability goes to the student's first token of its text
    (summed per student id) or, with no counterpart, to the tail: against a numpy reference."""
    words = [" return", " teacher", " teaching", " student", " students", "(", "ŧ", " naïve",
             "→", "\n\t"]
    cand = [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    repo = tokenizer.convert_tokens_to_ids("<repo_name>")  # special, absent from the BPE
    cand += [im_end, repo]
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(len(cand))) * 0.9  # a top-k holding 90 % of the mass
    pairs = [[int(t), float(math.log(q))] for t, q in zip(cand, p)]
    mapped, lost = aligner.map_pairs(pairs)

    table = TokenBytes.of(tokenizer)
    expected = {}
    for t, q in zip(cand, p):
        if t == repo:
            continue
        if t == im_end:
            sid = bpe_tokenizer.eos_token_id
        elif table.bytes_of[t] == b"\xc5":  # ŧ's first byte alone: the BPE's one-byte token
            sid = bpe_tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(t))
        else:
            text = table.bytes_of[t].decode()
            sid = bpe_tokenizer.encode(text, add_special_tokens=False)[0]
        expected[sid] = expected.get(sid, 0.0) + q
    got = {sid: math.exp(lp) for sid, lp in mapped}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-12)
    # SmolLM2's " teacher" / " teaching" and " student" / " students" are one token each; the
    # BPE of a code corpus starts them with " te" and " st": their mass is summed
    assert len(got) == len(cand) - 1 - 2
    assert [v for _, v in mapped] == sorted((v for _, v in mapped), reverse=True)
    np.testing.assert_allclose(lost, p[cand.index(repo)], rtol=1e-12)
    np.testing.assert_allclose(sum(got.values()) + lost, p.sum(), rtol=1e-12)
    counts, lost_n = aligner.map_pairs([[t, 3] for t in cand], counts=True)
    assert sum(c for _, c in counts) + lost_n == 3 * len(cand) and lost_n == 3


def uld_reference(logits, topk_logprobs, mask):
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    p = np.where(np.isfinite(topk_logprobs), np.exp(topk_logprobs), 0.0)
    k = p.shape[-1]
    q_top = np.sort(q, axis=-1)[..., ::-1][..., :k]
    p_sorted = np.sort(p, axis=-1)[..., ::-1]
    per = np.abs(p_sorted - q_top).sum(-1) + np.abs((1 - p.sum(-1)) - (1 - q_top.sum(-1)))
    return (per * mask).sum() / max(mask.sum(), 1)


def test_uld_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 5, 50)).astype(np.float32)
    t = rng.normal(0, 3, (2, 5, 50))
    t_lp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    top = np.sort(t_lp, axis=-1)[..., ::-1][..., :6].copy()
    top = rng.permuted(top, axis=-1)  # ULD sorts: the stored order must not matter
    top[0, 1, 4:] = -np.inf  # a shorter list, padded
    mask = np.array([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], np.float32)
    got = uld(mx.array(logits), mx.array(top.astype(np.float32)), mx.array(mask)).item()
    # fp32 softmax and sums of ~60 terms of size <= 1: a few ulps of 1 each
    np.testing.assert_allclose(got, uld_reference(logits.astype(np.float64), top, mask), atol=1e-5)
    # zero when the student's sorted top-k is the teacher's (another vocabulary order)
    perm = rng.permutation(50)
    same = uld(mx.array(t[..., perm].astype(np.float32)), mx.array(top.astype(np.float32)),
               mx.ones((2, 5))).item()
    assert same < uld(mx.array(logits), mx.array(top.astype(np.float32)), mx.ones((2, 5))).item()
    full = np.sort(t_lp, axis=-1)[..., ::-1][..., :6]
    assert uld(mx.array(t[..., perm].astype(np.float32)), mx.array(full.astype(np.float32)),
               mx.ones((2, 5))).item() < 1e-5
    grad = mx.grad(lambda x: uld(x, mx.array(top.astype(np.float32)), mx.array(mask)))(mx.array(logits))
    assert np.isfinite(np.array(grad)).all() and np.abs(np.array(grad)).sum() > 0


@pytest.fixture(scope="module")
def scored(tmp_path_factory, teacher_dir):
    """Scored-text KD records of the default teacher (real top-8, mlx_student.score) on corpus
    text, with its manifest: ids and top-k in SmolLM2's vocabulary."""
    tmp = tmp_path_factory.mktemp("xtok")
    lines = (ROOT / "data/stdlib/valid.jsonl").read_text().splitlines()
    docs = [{"text": json.loads(line)["text"][:3000]} for line in lines[:6]]
    write_jsonl(tmp / "text/train.jsonl", docs[:4])
    write_jsonl(tmp / "text/valid.jsonl", docs[4:])
    cmd = [sys.executable, "-m", "mlx_student.teacher.score", "--model", str(teacher_dir),
           "--data", str(tmp / "text"), "--out", str(tmp / "scored"), "--top-k", "8",
           "--samples", "0", "--max-seq-length", "64", "--max-tokens", "800", "--batch-size", "8"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return tmp / "scored"


def bpe_config(path, bpe_dir, loss):
    text = (ROOT / "configs/tiny.yaml").read_text()
    text = text.replace("models/smollm2-135m-instruct", str(bpe_dir)).replace("49152", "8192")
    path.write_text(text + "loss:\n" + "".join(f"  {k}: {v}\n" for k, v in loss.items()))
    return path


@pytest.mark.parametrize("kd, mode", [("topk_kd", "cross_tokenizer_topk"), ("uld", "uld")])
def test_tiny_bpe_student_learns_from_the_smollm2_teacher(tmp_path, scored, bpe_dir, kd, mode):
    config = bpe_config(tmp_path / "run.yaml", bpe_dir, {"ce": 1.0, kd: 1.0})
    out = tmp_path / "student"
    cmd = [sys.executable, "-m", "mlx_student.train", "--config", str(config), "--data", str(scored),
           "--out", str(out), "--iters", "12", "--batch-size", "4", "--max-seq-length", "64",
           "--learning-rate", "3e-3", "--warmup", "2", "--steps-per-eval", "100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "kd.json").read_text())
    assert report["kd_mode"] == mode and report["records_tokenizer"] == str(
        json.loads((scored / "manifest.json").read_text())["teacher"]["model"])
    train = report["splits"]["train"]
    assert train["aligned"] + train["unaligned"] == train["target_positions"] > 0
    assert 0.5 < train["aligned_fraction"] < 1  # code aligns mostly, not everywhere
    assert f"{train['aligned']}/{train['target_positions']} target positions aligned" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = np.mean([m[kd] for m in metrics[:3]]), np.mean([m[kd] for m in metrics[-3:]])
    assert last < 0.9 * first, (first, last)


def test_records_of_another_tokenizer_are_refused_or_mapped(tmp_path, scored, tokenizer,
                                                           bpe_tokenizer, bpe_dir):
    loss = {"ce": 1.0, "topk_kd": 1.0}
    # no manifest: the ids are checked against the record's text under the student's tokenizer
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        (bare / name).write_text((scored / name).read_text())
    with pytest.raises(DataError, match=rf"^{bare}/train\.jsonl:1: field 'ids': the token ids do "
                       "not spell the record's text under the student's tokenizer"):
        prepare(bare, bpe_tokenizer, loss, tmp_path / "x")
    folder, report = prepare(bare, bpe_tokenizer, loss, tmp_path / "y",
                             teacher_tokenizer=str(ROOT / "models/smollm2-135m-instruct"))
    assert report["kd_mode"] == "cross_tokenizer_topk" and folder == tmp_path / "y"
    # the same records under their own tokenizer need no mapping
    assert prepare(bare, tokenizer, loss, tmp_path / "z")[1]["kd_mode"] == "same_tokenizer"
    # a manifest naming a tokenizer folder that is gone
    manifest = json.loads((scored / "manifest.json").read_text())
    manifest["teacher"]["model"] = str(tmp_path / "gone")
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"^{bare}/manifest\.json: tokenizer_hash: the records "
                       "were made with another tokenizer than the student's"):
        prepare(bare, bpe_tokenizer, loss, tmp_path / "w")
    # a teacher_tokenizer that is not the one the manifest names
    with pytest.raises(DataError, match="tokenizer_hash: the records were made with tokenizer hash"):
        prepare(bare, tokenizer, loss, tmp_path / "v", teacher_tokenizer=str(bpe_dir))
    # text only and a KD loss: nothing to distil
    text = tmp_path / "text"
    write_jsonl(text / "train.jsonl", [{"text": "x = 1\n"}])
    with pytest.raises(DataError, match="no record holds teacher token ids"):
        prepare(text, bpe_tokenizer, {"ce": 1.0, "uld": 1.0}, tmp_path / "u")
    assert prepare(text, bpe_tokenizer, {"ce": 1.0}, tmp_path / "u")[1]["kd_mode"] == "sequence"

    # the command line: the message, exit 2, no traceback
    config = bpe_config(tmp_path / "run.yaml", bpe_dir, loss)
    proc = subprocess.run([sys.executable, "-m", "mlx_student.train", "--config", str(config),
                           "--data", str(bare), "--out", str(tmp_path / "s"), "--iters", "1"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {bare}/manifest.json: tokenizer_hash: the records were made" in proc.stderr


def test_a_tokenizer_that_is_not_byte_level_is_refused(tmp_path, tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    word = PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(AlignError, match="the student: not a byte-level BPE tokenizer"):
        Aligner(tokenizer, word, student_name="the student")


def test_a_teacher_completion_record_maps_onto_the_student_chat_template(
        tmp_path, aligner, tokenizer, bpe_tokenizer):
    """A kd_mix record (prompt messages, the teacher's completion ids and top-k) becomes the
    student's: its template's prompt, the completion in its tokens, the top-k where aligned;
    mlx_student.data loads it for the student unchanged."""
    from mlx_student.data import load_jsonl

    completion = 'return "naïve→"'
    ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    other = tokenizer.encode(" teacher", add_special_tokens=False)[0]
    record = {"messages": [{"role": "user", "content": "Say it."}], "completion": completion,
              "finish_reason": "stop", "completion_ids": ids,
              "topk": [[[t, math.log(0.7)], [other, math.log(0.2)]] for t in ids]}
    out, stats = aligner.convert(record)
    s_ids = out["completion_ids"]
    assert bpe_tokenizer.decode(s_ids[:-1]) == completion and s_ids[-1] == bpe_tokenizer.eos_token_id
    assert len(out["topk"]) == len(s_ids) == stats["targets"]
    # every teacher boundary of this text is a BPE boundary (the BPE splits ï and → further)
    assert stats["aligned"] == len(ids) and out["topk"][0][0][0] == s_ids[0]
    write_jsonl(tmp_path / "train.jsonl", [out])
    (example,) = load_jsonl(tmp_path / "train.jsonl", bpe_tokenizer, 8192, 128).examples
    prompt = bpe_tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True)
    assert example.prompt_len == len(prompt) and example.tokens.tolist() == list(prompt) + s_ids
    aligned_rows = np.isfinite(example.topk_logprobs).any(axis=1)
    assert aligned_rows.tolist() == [bool(row) for row in out["topk"]]
    np.testing.assert_allclose(np.exp(example.topk_logprobs[aligned_rows]).sum(axis=1), 0.9,
                               rtol=1e-6)  # fp32 storage of log(0.7), log(0.2)

    bad = {**record, "topk": [[[t, "x"]] for t in ids]}
    with pytest.raises(AlignError, match=r"field 'topk\[0\]': expected an \[id, logprob\] pair"):
        aligner.convert(bad)
