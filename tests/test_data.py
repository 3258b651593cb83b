"""Tests for mlx_student.data with the real teacher tokenizer (SmolLM2, ChatML)."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_student.batches import iterate_batches
from mlx_student.data import DataError, Example, load_dataset, load_jsonl

VOCAB = 49152
EOS_TEXT = "<|im_end|>"


def write(path, records):
    """Write records (dicts, or raw strings written as they are) one a line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def load(tmp_path, tokenizer, records, max_seq_length=512, **kwargs):
    path = write(tmp_path / "train.jsonl", records)
    return load_jsonl(path, tokenizer, VOCAB, max_seq_length, **kwargs)


def one_batch(examples, max_seq_length=512, **kwargs):
    batches = list(iterate_batches(examples, len(examples), max_seq_length, **kwargs))
    assert len(batches) == 1
    return {k: np.array(v) for k, v in batches[0].items()}


def masked_text(tokenizer, batch, row, key="mask"):
    """Decode the targets of one row where ``batch[key]`` is 1."""
    keep = batch[key][row] == 1
    return tokenizer.decode(batch["targets"][row][keep].tolist())


def kd_record(completion="The answer is 4.", finish_reason="stop", **extra):
    record = {
        "id": "r0",
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "completion": completion,
        "reasoning": None,
        "teacher": {"model": "smollm2"},
        "finish_reason": finish_reason,
        "usage": {"completion_tokens": 5},
    }
    record.update(extra)
    return record


def topk_for(ids, widths=(1, 3, 2)):
    """Top-k lists whose first entry is the actual token; list lengths cycle through widths."""
    out = []
    for i, token in enumerate(ids):
        width = widths[i % len(widths)]
        others = [[(token + 1 + j) % VOCAB, -2.0 - j] for j in range(width - 1)]
        out.append([[token, -0.25]] + others)
    return out


# ----------------------------------------------------------------------------
# formats and masks


def test_completions_mask_is_completion_plus_eos(tmp_path, tokenizer):
    split = load(tmp_path, tokenizer, [{"prompt": "Name a color.", "completion": "Blue."}] * 2)
    assert split.format == "completions" and split.skipped == 0 and split.truncated == 0
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a color."}], add_generation_prompt=True
    )
    ex = split.examples[0]
    completion = tokenizer.encode("Blue.", add_special_tokens=False)
    assert ex.tokens.tolist() == prompt + completion + [tokenizer.eos_token_id]
    assert ex.prompt_len == len(prompt)
    batch = one_batch(split.examples)
    assert masked_text(tokenizer, batch, 0) == "Blue." + EOS_TEXT
    # The mask starts exactly at the first completion token.
    assert batch["mask"][0].tolist().index(1) == len(prompt) - 1
    assert "kd_mask" not in batch


def test_chat_mask_is_only_last_assistant_turn(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Second answer"},
    ]
    split = load(tmp_path, tokenizer, [{"messages": messages}])
    assert split.format == "chat"
    batch = one_batch(split.examples)
    assert masked_text(tokenizer, batch, 0) == "Second answer" + EOS_TEXT + "\n"
    unmasked = tokenizer.decode(batch["inputs"][0][batch["mask"][0] == 0].tolist())
    assert "First answer" in unmasked


def test_tools_format(tmp_path, tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    messages = [{"role": "user", "content": "Add 1 and 2"}, {"role": "assistant", "content": "3"}]
    split = load(tmp_path, tokenizer, [{"messages": messages, "tools": tools}])
    assert split.format == "tools"
    assert masked_text(tokenizer, one_batch(split.examples), 0) == "3" + EOS_TEXT + "\n"


def test_text_packing(tmp_path, tokenizer):
    docs = [f"Document number {i} says something about the sea and the sky." for i in range(7)]
    split = load(tmp_path, tokenizer, [{"text": d} for d in docs], max_seq_length=16)
    assert split.format == "text" and split.truncated == 0
    chunks = [ex.tokens.tolist() for ex in split.examples]
    assert all(len(c) == 17 for c in chunks[:-1]) and 2 <= len(chunks[-1]) <= 17
    assert all(ex.prompt_len == 0 for ex in split.examples)
    # Consecutive chunks overlap by one token, so every token is a target exactly once.
    stream = chunks[0] + [t for c in chunks[1:] for t in c[1:]]
    expected = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_token_id]]
    assert stream == expected
    assert stream.count(tokenizer.eos_token_id) == len(docs)
    for a, b in zip(chunks, chunks[1:]):
        assert a[-1] == b[0]
    batch = one_batch(split.examples, max_seq_length=16)
    rows = [batch["targets"][j][batch["mask"][j] == 1].tolist() for j in range(len(chunks))]
    assert sorted(rows) == sorted(c[1:] for c in chunks)


def test_kd_alignment_with_completion_ids(tmp_path, tokenizer):
    ids = tokenizer.encode("The answer is 4.", add_special_tokens=False)
    record = kd_record(completion_ids=ids, topk=topk_for(ids))
    split = load(tmp_path, tokenizer, [record])
    assert split.format == "kd"
    ex = split.examples[0]
    assert ex.topk_ids.shape == (len(ids), 3) and ex.topk_logprobs.dtype == np.float32
    assert ex.tokens[-1] == tokenizer.eos_token_id
    batch = one_batch(split.examples)
    mask, kd_mask = batch["mask"][0], batch["kd_mask"][0]
    assert masked_text(tokenizer, batch, 0) == "The answer is 4." + EOS_TEXT
    assert masked_text(tokenizer, batch, 0, key="kd_mask") == "The answer is 4."
    loss_pos = np.nonzero(mask)[0]
    eos_pos = loss_pos[-1]
    assert batch["targets"][0, eos_pos] == tokenizer.eos_token_id
    assert kd_mask[eos_pos] == 0 and kd_mask.sum() == len(ids)
    assert np.all(kd_mask <= mask)
    kd_pos = np.nonzero(kd_mask)[0]
    np.testing.assert_array_equal(batch["topk_ids"][0, kd_pos, 0], ids)
    np.testing.assert_array_equal(batch["targets"][0, kd_pos], ids)
    assert batch["topk_ids"].shape == batch["inputs"].shape + (3,)
    lp = batch["topk_logprobs"][0]
    widths = [1, 3, 2]
    for i, pos in enumerate(kd_pos):
        w = widths[i % 3]
        assert np.all(np.isfinite(lp[pos, :w])) and np.all(lp[pos, w:] == -np.inf)
        assert np.all(batch["topk_ids"][0, pos, w:] == 0)
    assert np.all(lp[kd_mask == 0] == -np.inf)


def test_kd_without_ids_and_length_finish(tmp_path, tokenizer):
    ids = tokenizer.encode("Four", add_special_tokens=False)
    records = [
        kd_record(completion="Four", finish_reason="length", topk=topk_for(ids)),
        kd_record(completion="Four"),
    ]
    split = load(tmp_path, tokenizer, records)
    no_eos, with_eos = split.examples
    assert no_eos.tokens[no_eos.prompt_len:].tolist() == ids
    assert with_eos.tokens[with_eos.prompt_len:].tolist() == ids + [tokenizer.eos_token_id]
    assert with_eos.topk_ids is None
    batch = one_batch(split.examples)
    # Sorted by length: the record without eos comes first.
    assert batch["kd_mask"][0].sum() == len(ids) and batch["kd_mask"][1].sum() == 0
    assert batch["mask"][1].sum() == len(ids) + 1


def test_tiny_positive_logprob_is_clamped(tmp_path, tokenizer):
    ids = tokenizer.encode("Yes", add_special_tokens=False)
    topk = [[[t, 5e-5]] for t in ids]
    split = load(tmp_path, tokenizer, [kd_record(completion_ids=ids, topk=topk)])
    assert np.all(split.examples[0].topk_logprobs == 0.0)


# ----------------------------------------------------------------------------
# batching


def completion_examples(tmp_path, tokenizer, n=12):
    records = [{"prompt": f"Q{i}", "completion": "word " * (3 * i + 1)} for i in range(n)]
    return load(tmp_path, tokenizer, records).examples


def test_batch_shapes_and_padding(tmp_path, tokenizer):
    examples = completion_examples(tmp_path, tokenizer)
    for batch in iterate_batches(examples, 3, 512, pad_id=7):
        B, L = batch["inputs"].shape
        assert B == 3 and L % 32 == 0 and L <= 512
        assert batch["targets"].shape == batch["mask"].shape == (B, L)
        assert batch["inputs"].dtype == batch["targets"].dtype == mx.int32
        assert batch["mask"].dtype == mx.float32
        inputs, mask = np.array(batch["inputs"]), np.array(batch["mask"])
        lengths = [int((inputs[j] != 7).sum()) for j in range(B)]
        assert max(lengths) > L - 32  # no more padding than needed
        for j, n in enumerate(lengths):
            assert np.all(inputs[j, n:] == 7) and np.all(mask[j, n:] == 0)


def test_batch_width_capped_at_max_seq_length(tmp_path, tokenizer, capsys):
    records = [{"prompt": "Q", "completion": "word " * 80}] * 2
    split = load(tmp_path, tokenizer, records, max_seq_length=40)
    assert split.truncated == 2
    assert "2 examples" in capsys.readouterr().err
    assert all(len(ex.tokens) == 41 for ex in split.examples)
    batch = one_batch(split.examples, max_seq_length=40)
    assert batch["inputs"].shape == (2, 40)
    assert batch["mask"][0, -1] == 1


def test_kd_truncation_keeps_the_completion_and_its_topk(tmp_path, tokenizer, capsys):
    ids = tokenizer.encode("one two three four five six seven", add_special_tokens=False)
    record = kd_record(completion_ids=ids, topk=topk_for(ids), finish_reason="length")
    full = load(tmp_path, tokenizer, [record]).examples[0]
    prompt_len = full.prompt_len
    split = load(tmp_path, tokenizer, [record], max_seq_length=prompt_len + 2)
    ex = split.examples[0]
    # 4 prompt tokens cut from the left; the 7 completion tokens and their top-k all kept
    assert split.truncated == 1 and len(ex.tokens) == prompt_len + 3
    assert ex.prompt_len == prompt_len - 4
    np.testing.assert_array_equal(ex.tokens, full.tokens[4:])
    np.testing.assert_array_equal(ex.topk_ids, full.topk_ids)
    batch = one_batch(split.examples, max_seq_length=prompt_len + 2)
    assert batch["kd_mask"].sum() == 7 and batch["mask"].sum() == 7
    assert "prompts were cut from the left" in capsys.readouterr().err


def test_prompts_longer_than_the_limit_never_make_an_empty_batch(tmp_path, tokenizer, capsys):
    long_prompt = "word " * 200
    records = [{"prompt": long_prompt, "completion": "short answer"}] * 2
    records += [{"prompt": "Q", "completion": "done " * 100}]
    split = load(tmp_path, tokenizer, records, max_seq_length=64)
    assert split.truncated == 3 and split.dropped == 0
    answer = tokenizer.encode("short answer", add_special_tokens=False)
    for ex in split.examples[:2]:  # the whole completion, after the prompt's last tokens
        assert list(ex.tokens[-len(answer) - 1 : -1]) == answer and len(ex.tokens) == 65
    long_answer = split.examples[2]  # the prompt fits in half the limit: the completion is cut
    assert len(long_answer.tokens) == 65 and long_answer.prompt_len < 32
    batch = one_batch(split.examples[:2], max_seq_length=64)
    assert batch["mask"].sum() == 2 * (len(answer) + 1)  # the answer and eos, per row
    # a record with nothing to learn is dropped, counted and reported
    empty = kd_record(completion="", finish_reason="length", completion_ids=[])
    split = load(tmp_path, tokenizer, [empty, kd_record()])
    assert split.dropped == 1 and len(split.examples) == 1
    assert "dropped 1 records" in capsys.readouterr().err
    with pytest.raises(DataError, match="no record has a loss token"):
        load(tmp_path, tokenizer, [empty])


def fingerprint(batch):
    """A hashable summary of every array in a batch."""
    return tuple((k, np.array(v).tobytes()) for k, v in sorted(batch.items()))


def test_same_seed_same_batches_different_seed_different_order(tmp_path, tokenizer):
    examples = completion_examples(tmp_path, tokenizer)

    def run(seed):
        return [fingerprint(b) for b in iterate_batches(examples, 2, 512, seed=seed)]

    assert len(run(0)) == 6
    assert run(0) == run(0)
    assert run(0) != run(1)
    assert sorted(run(0)) == sorted(run(1))


def test_loop_new_permutation_each_epoch(tmp_path, tokenizer):
    examples = completion_examples(tmp_path, tokenizer)
    it = iterate_batches(examples, 2, 512, seed=3, loop=True)
    epochs = [[fingerprint(next(it)) for _ in range(6)] for _ in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
    assert [fingerprint(b) for b in iterate_batches(examples, 2, 512, seed=3)] == epochs[0]


def test_group_by_length_off_shuffles_records_into_batches():
    """--no-group-by-length: epoch e's batches are default_rng([seed, e]).permutation of the
    records cut into batches (short and long records mixed), every record once an epoch, the
    remainder padded with empty rows; `start` resumes at the same batch."""
    lengths = [9] * 5 + [61] * 5
    examples = [Example(np.array([i] + [100 + i] * (n - 1), np.int32), prompt_len=1)
                for i, n in enumerate(lengths)]

    def rows(batch):  # the examples in a batch, by their first token; -1 for an empty row
        first, mask = np.array(batch["inputs"][:, 0]), np.array(batch["mask"]).sum(axis=1)
        return [int(f) if m else -1 for f, m in zip(first, mask)]

    it = iterate_batches(examples, 4, 64, seed=5, loop=True, group_by_length=False)
    got = [rows(next(it)) for _ in range(6)]
    for e in range(2):
        perm = np.random.default_rng([5, e]).permutation(10).tolist()
        assert got[3 * e : 3 * e + 3] == [perm[0:4], perm[4:8], perm[8:10] + [-1, -1]]
    assert any(len({lengths[i] for i in r if i >= 0}) == 2 for r in got)  # mixed batches
    resumed = iterate_batches(examples, 4, 64, seed=5, loop=True, start=4, group_by_length=False)
    assert [rows(next(resumed)) for _ in range(2)] == got[4:6]
    sorted_rows = [rows(b) for b in iterate_batches(examples, 4, 64, seed=5)]  # the default
    assert sorted(map(sorted, sorted_rows)) == [[-1, -1, 8, 9], [0, 1, 2, 3], [4, 5, 6, 7]]


def test_too_few_examples(tmp_path, tokenizer):
    examples = completion_examples(tmp_path, tokenizer, n=2)
    with pytest.raises(ValueError, match="at least batch_size=3"):
        next(iterate_batches(examples, 3, 512))


def test_remainder_is_padded_with_empty_rows(tmp_path, tokenizer):
    examples = completion_examples(tmp_path, tokenizer, n=5)
    batches = list(iterate_batches(examples, 2, 512))
    assert [b["inputs"].shape[0] for b in batches] == [2, 2, 2]
    assert sum(int((b["mask"].sum(axis=1) > 0).sum().item()) for b in batches) == 5
    longest = max(examples, key=lambda ex: len(ex.tokens))
    last = [b for b in batches if (b["mask"].sum(axis=1) > 0).sum().item() == 1][0]
    n = len(longest.tokens) - 1
    np.testing.assert_array_equal(np.array(last["inputs"][0, :n]), longest.tokens[:n])
    assert last["mask"][1].sum().item() == 0


# ----------------------------------------------------------------------------
# loading folders and errors


def test_load_dataset_folder(tmp_path, tokenizer):
    write(tmp_path / "train.jsonl", [{"text": "a b c"}])
    write(tmp_path / "valid.jsonl", [{"prompt": "p", "completion": "c"}])
    splits = load_dataset(tmp_path, tokenizer, VOCAB, 64)
    assert set(splits) == {"train", "valid"}
    assert splits["valid"].format == "completions"


def test_missing_train_file(tmp_path, tokenizer):
    write(tmp_path / "valid.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=rf"{tmp_path}.*train\.jsonl.*valid\.jsonl.*test\.jsonl"):
        load_dataset(tmp_path, tokenizer, VOCAB, 64)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope", tokenizer, VOCAB, 64)


@pytest.mark.parametrize("lines", [[], ["", "   "]])
def test_empty_file(tmp_path, tokenizer, lines):
    with pytest.raises(DataError, match=r"train\.jsonl: the file is empty"):
        load(tmp_path, tokenizer, lines)


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}
CHAT = {"messages": [USER, ASSISTANT]}


def kd(**fields):
    record = {"messages": [USER], "completion": "x", "finish_reason": "stop",
              "completion_ids": [504, 2], "topk": [[[504, -0.1]], [[2, -0.2]]]}
    record.update(fields)
    return record


BAD_CHAT = [
    ("malformed json", '{"text": "a",}', r"invalid JSON: Expecting"),
    ("not an object", "[1, 2]", r"expected a JSON object, got a list"),
    ("messages not a list", {"messages": "Hi"},
     r"field 'messages': expected a list of messages, got a string"),
    ("content not a string", {"messages": [USER, {"role": "assistant", "content": 3}]},
     r"field 'messages\[1\]\.content': expected a string or a list of text parts, got an integer"),
    ("message without role", {"messages": [{"content": "x"}, ASSISTANT]},
     r"field 'messages\[0\]\.role': expected one of system, user, assistant, tool, got None"),
    ("last not assistant", {"messages": [ASSISTANT, USER]},
     r"field 'messages': the last message must be the assistant's, got role 'user'"),
]


@pytest.mark.parametrize("line, match", [c[1:] for c in BAD_CHAT], ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_line_errors(tmp_path, tokenizer, line, match):
    # The blank line 2 is ignored but still counted: the bad record is line 3.
    with pytest.raises(DataError, match=r"train\.jsonl:3: " + match):
        load(tmp_path, tokenizer, [CHAT, "", line])


def test_missing_keys_error(tmp_path, tokenizer):
    match = (
        r"train\.jsonl:2: missing key\(s\) 'completion' "
        r"\(format 'completions', detected from line 1\)"
    )
    with pytest.raises(DataError, match=match):
        load(tmp_path, tokenizer, [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: missing key\(s\) 'finish_reason'"):
        load(tmp_path, tokenizer, [{"messages": [USER], "completion": "c"}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: unknown format with keys \['prompt'\]"):
        load(tmp_path, tokenizer, [{"prompt": "p"}])


NAN_LINE = (
    '{"messages": [{"role": "user", "content": "Hi"}], "completion": "x", '
    '"finish_reason": "stop", "completion_ids": [504, 2], "topk": [[[504, -0.1]], [[2, NaN]]]}'
)
BAD_KD = [
    ("completion not a string", kd(completion=5),
     r"field 'completion': expected a string, got an integer"),
    ("completion id out of vocab", kd(completion_ids=[504, VOCAB]),
     rf"field 'completion_ids\[1\]': token id {VOCAB} outside the vocabulary \(size {VOCAB}\)"),
    ("completion id not int", kd(completion_ids=[504, "2"]),
     r"field 'completion_ids\[1\]': expected an integer token id, got a string"),
    ("topk id out of vocab", kd(topk=[[[504, -0.1], [60000, -1.0]], [[2, -0.2]]]),
     r"field 'topk\[0\]\[1\]': token id 60000 outside the vocabulary \(size 49152\)"),
    ("topk too short", kd(topk=[[[504, -0.1]]]),
     r"field 'topk': 1 entries but 'completion_ids' has 2 tokens"),
    ("topk entry not a pair", kd(topk=[[[504, -0.1]], [[2]]]),
     r"field 'topk\[1\]\[0\]': expected an \[id, logprob\] pair .*got \[2\]"),
    ("topk id float", kd(topk=[[[504.0, -0.1]], [[2, -0.2]]]),
     r"field 'topk\[0\]\[0\]': expected an \[id, logprob\] pair"),
    ("topk position not a list", kd(topk=[[[504, -0.1]], 7]),
     r"field 'topk\[1\]': expected a list of \[id, logprob\] pairs"),
    ("positive logprob", kd(topk=[[[504, 0.5]], [[2, -0.2]]]),
     r"field 'topk\[0\]\[0\]': logprob 0\.5 is not a log-probability"),
    ("NaN literal", NAN_LINE, r"field 'topk\[1\]\[0\]\[1\]': NaN is not a JSON number"),
    ("-Infinity literal", NAN_LINE.replace("NaN", "-Infinity"),
     r"field 'topk\[1\]\[0\]\[1\]': -Infinity is not a JSON number"),
    ("Infinity in any field", json.dumps(kd(usage={"seconds": 1})).replace("1}", "Infinity}"),
     r"field 'usage\.seconds': Infinity is not a JSON number"),
    ("top-k mass above 1", kd(topk=[[[504, math.log(0.8)], [7, math.log(0.5)]], [[2, -0.2]]]),
     r"field 'topk\[0\]': the probabilities sum to 1\.3 > 1"),
    ("prompt ends with assistant", kd(messages=[USER, ASSISTANT]),
     r"field 'messages': a KD prompt must not end with an assistant"),
    ("finish_reason not a string", kd(finish_reason=1),
     r"field 'finish_reason': expected a string or null"),
]


@pytest.mark.parametrize("line, match", [c[1:] for c in BAD_KD], ids=[c[0] for c in BAD_KD])
def test_bad_kd_line_errors(tmp_path, tokenizer, line, match):
    with pytest.raises(DataError, match=r"train\.jsonl:2: " + match):
        load(tmp_path, tokenizer, [kd(), line])


def test_topk_checked_against_encoded_completion(tmp_path, tokenizer):
    n = len(tokenizer.encode("Hello world, friends", add_special_tokens=False))
    record = kd(completion_ids=None, completion="Hello world, friends")
    match = rf"field 'topk': 2 entries but 'completion' encodes to {n} tokens"
    with pytest.raises(DataError, match=match):
        load(tmp_path, tokenizer, [record])


def test_skip_bad_lines(tmp_path, tokenizer, capsys):
    lines = [CHAT, "not json", json.dumps({"messages": "x"}), CHAT, "[]", ""]
    split = load(tmp_path, tokenizer, lines, skip_bad_lines=True)
    assert split.skipped == 3 and len(split.examples) == 2
    err = capsys.readouterr().err
    assert f"skipped 3 bad lines in {tmp_path / 'train.jsonl'}" in err
    assert "line 2: invalid JSON" in err
    with pytest.raises(DataError, match="no valid records"):
        load(tmp_path, tokenizer, ["nope", "[]"], skip_bad_lines=True)


def test_first_line_format_applies_to_all(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"train\.jsonl:2: missing key\(s\) 'text' \(format 'text'"):
        load(tmp_path, tokenizer, [{"text": "a"}, {"prompt": "p", "completion": "c"}])


def test_a_position_without_top_k_has_no_kd_target(tmp_path, tokenizer):
    """A zero-probability entry is left out (JSON has no -Infinity); an empty list is a
    position with no teacher target, padded with -inf in memory and masked out."""
    line = ('{"messages": [{"role": "user", "content": "Hi"}], "completion": "x", '
            '"finish_reason": "length", "completion_ids": [504], "topk": [[]]}')
    split = load(tmp_path, tokenizer, [line, line])
    assert math.isinf(split.examples[0].topk_logprobs[0, 0])
    assert one_batch(split.examples)["kd_mask"].sum() == 0
