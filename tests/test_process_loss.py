"""Process supervision: tool-trace spans weight the CE and KD terms per token (issue 11, item 6)."""

import json

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import ROOT, write_jsonl
from mlx.utils import tree_flatten

from mlx_student import model as student_model
from mlx_student import train
from mlx_student.batches import iterate_batches
from mlx_student.config import load_config
from mlx_student.data import DataError, load_jsonl
from mlx_student.losses import loss_mix
from mlx_student.records import process_weights
from mlx_student.trainer import TrainingArgs, evaluate
from mlx_student.trainer import train as train_loop

WEIGHTS = {"tool_name": 2.0, "arguments": 3.0, "integration": 5.0}
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def trace(city="Paris", temp=21):
    """A gold trace as mlx_student.tools writes it: the call is the assistant's content."""
    call = {**CALL, "arguments": {**CALL["arguments"], "city": city}}
    return [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": json.dumps(call), "tool_calls": [{"type": "function", "function": {
            "name": call["name"], "arguments": json.dumps(call["arguments"])}}]},
        {"role": "tool", "content": json.dumps({"temp_c": temp, "sky": "clear"})},
        {"role": "assistant", "content": f"It is {temp} C and clear in {city}."},
    ]


def spans_of(tokenizer, messages, wanted):
    """Spans found independently of mlx_student.records: bytes by search in the rendered text,
    tokens as the minimal cover by the byte lengths of decoded prefixes (ASCII text)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False).encode()
    ids = tokenizer.apply_chat_template(messages)
    prefix = [len(tokenizer.decode(ids[:i]).encode()) for i in range(len(ids) + 1)]
    spans = []
    for kind, sub, after in wanted:
        bs = text.index(sub.encode(), text.index(after.encode()))
        be = bs + len(sub.encode())
        ts = max(i for i, n in enumerate(prefix) if n <= bs)
        te = min(i for i, n in enumerate(prefix) if n >= be)
        spans.append({"type": kind, "byte_start": bs, "byte_end": be, "tok_start": ts, "tok_end": te})
    return spans


def record(tokenizer, city="Paris", temp=21):
    messages = trace(city, temp)
    args = json.dumps(json.loads(messages[1]["content"])["arguments"])
    spans = spans_of(tokenizer, messages, [
        ("tool_name", "get_weather", "assistant"), ("arguments", args, "assistant"),
        ("integration", str(temp), "It is"), ("integration", city, "It is")])
    return {"id": city, "messages": messages, "tools": [], "source": "gold", "spans": spans}


def test_spans_weight_every_assistant_turn(tmp_path, tokenizer):
    rec = record(tokenizer)
    write_jsonl(tmp_path / "train.jsonl", [rec])
    ex = load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 256, weights=WEIGHTS).examples[0]
    text = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
    assert ex.tokens.tolist() == tokenizer.apply_chat_template(rec["messages"])
    w = ex.weights
    for span in rec["spans"]:
        assert (w[span["tok_start"] : span["tok_end"]] == WEIGHTS[span["type"]]).all()
    # In the loss: both assistant turns (content and end of turn), nothing else.
    loss_text = "".join(tokenizer.decode([int(t)]) for t, x in zip(ex.tokens, w) if x)
    assert loss_text == (json.dumps(CALL) + "<|im_end|>\n" + "It is 21 C and clear in Paris.<|im_end|>\n")
    assert text.count("<|im_start|>assistant") == 2
    assert sorted(set(w.tolist())) == [0.0, 1.0, 2.0, 3.0, 5.0]
    # Batches: token_weights are aligned with the targets (shifted by one) and define the mask.
    write_jsonl(tmp_path / "train.jsonl", [rec] * 2)
    examples = load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 256, weights=WEIGHTS).examples
    batch = next(iterate_batches(examples, 2, 256))
    n = len(ex.tokens) - 1
    np.testing.assert_array_equal(np.array(batch["token_weights"][0, :n]), w[1:])
    np.testing.assert_array_equal(np.array(batch["mask"][0, :n]), (w[1:] != 0).astype(np.float32))
    # Default weights: the multi-turn mask, every weight 1.
    plain = load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 256).examples[0]
    np.testing.assert_array_equal(plain.weights, (w != 0).astype(np.float32))


def _bad(rec, **change):
    rec = json.loads(json.dumps(rec))
    rec["spans"][1].update(change)
    return rec


@pytest.mark.parametrize("change, match", [
    ({"type": "answer"}, r"'spans\[1\].type': expected one of"),
    ({"byte_end": 10**6}, r"'spans\[1\]': bytes .* not a range inside the rendered conversation"),
    ({"tok_end": 10**6}, r"'spans\[1\]': tokens .* not a range inside the conversation"),
    ({"tok_start": "3"}, r"'spans\[1\].tok_start': expected an integer"),
    ("shift", r"'spans\[1\]': tokens .* are not the minimal cover of bytes"),
    ("user", r"'spans\[1\]': tokens .* lie outside the assistant turns"),
])
def test_bad_spans_name_file_line_and_field(tmp_path, tokenizer, change, match):
    good = record(tokenizer)
    if change == "shift":
        change = {"tok_end": good["spans"][1]["tok_end"] + 1}
    elif change == "user":
        change = spans_of(tokenizer, good["messages"], [("arguments", "Paris", "user")])[0]
    write_jsonl(tmp_path / "train.jsonl", [good, _bad(good, **change)])
    with pytest.raises(DataError, match=r"train.jsonl:2: field " + match):
        load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 256, weights=WEIGHTS)


def test_process_weights_settings():
    assert process_weights() == {"tool_name": 1.0, "arguments": 1.0, "integration": 1.0}
    assert process_weights({"arguments": 2})["arguments"] == 2.0
    with pytest.raises(ValueError, match="unknown span type"):
        process_weights({"names": 2})
    with pytest.raises(ValueError, match="expected a number >= 0"):
        process_weights({"arguments": -1})


@pytest.mark.parametrize("term", ["ce", "topk_kd", "forward_kl", "jsd"])
def test_gradient_on_a_span_token_scales_with_its_weight(term):
    rng = np.random.default_rng(0)
    B, L, V, K = 2, 7, 13, 4
    mask = (rng.random((B, L)) < 0.8).astype(np.float32)
    weights = mask * rng.choice([1.0, 2.0, 3.0, 5.0, 0.5], size=(B, L)).astype(np.float32)
    teacher = rng.normal(size=(B, L, V)).astype(np.float32)
    top = np.argsort(-teacher, axis=-1)[..., :K]
    logp = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    batch = {"targets": mx.array(rng.integers(0, V, (B, L)).astype(np.int32)), "mask": mx.array(mask),
             "teacher_logits": mx.array(teacher), "topk_ids": mx.array(top.astype(np.int32)),
             "topk_logprobs": mx.array(np.take_along_axis(logp, top, -1))}
    logits = mx.array(rng.normal(size=(B, L, V)).astype(np.float32))

    def loss(x, b):
        return loss_mix(x, b, {term: 1.0})[0]

    plain_loss, plain = mx.value_and_grad(loss)(logits, batch)
    weighted_loss, weighted = mx.value_and_grad(loss)(logits, {**batch, "token_weights": mx.array(weights)})
    plain, weighted = np.array(plain), np.array(weighted)
    on = mask > 0
    ratio = weighted[on] / np.where(plain[on] == 0, 1, plain[on])
    np.testing.assert_allclose(ratio[np.abs(plain[on]) > 1e-7],
                               np.broadcast_to(weights[on][:, None], ratio.shape)[np.abs(plain[on]) > 1e-7],
                               rtol=1e-5)
    np.testing.assert_array_equal(weighted[~on], 0)
    # The normaliser is the token count, not the sum of weights: all-ones weights are plain.
    per_token = np.array(mx.grad(loss)(logits, {**batch, "token_weights": mx.array(mask)}))
    np.testing.assert_allclose(per_token, plain, rtol=1e-6, atol=1e-9)
    assert weighted_loss.item() != pytest.approx(plain_loss.item())


def _tiny(seed=0):
    config = load_config(ROOT / "configs" / "tiny.yaml")
    return student_model.build(config, seed=seed)


def _run(examples, accum, iters=2):
    model = _tiny()
    args = TrainingArgs(batch_size=4, iters=iters, max_seq_length=128, grad_accumulation_steps=accum,
                        steps_per_eval=100, steps_per_save=100)
    optimizer = optim.SGD(learning_rate=0.5)  # updates linear in the gradient: params compare it
    history = train_loop(model, optimizer, examples, None, args)
    return model, history


def test_weighted_batch_split_trains_like_one_process(tmp_path, tokenizer):
    recs = [record(tokenizer, city, temp) for city, temp in
            [("Paris", 21), ("Oslo", 3), ("Lima", 18), ("Rome", 25), ("Cairo", 33), ("Quito", 12)]]
    write_jsonl(tmp_path / "train.jsonl", recs)
    examples = load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 128, weights=WEIGHTS).examples
    one, h1 = _run(examples, 1)
    two, h2 = _run(examples, 4)
    np.testing.assert_allclose([h["loss"] for h in h2], [h["loss"] for h in h1], rtol=1e-5)
    for (name, a), (_, b) in zip(tree_flatten(one.parameters()), tree_flatten(two.parameters())):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6, err_msg=name)
    # Weighted training moves the weights differently from plain training on the same data,
    # and validation reports the plain (unweighted) per-token CE.
    plain_examples = load_jsonl(tmp_path / "train.jsonl", tokenizer, 49152, 128).examples
    _, h3 = _run(plain_examples, 1)
    assert h3[0]["loss"] != pytest.approx(h1[0]["loss"])
    args = TrainingArgs(batch_size=4, max_seq_length=128, val_batches=-1)
    model = _tiny()
    assert evaluate(model, examples, args)["ce"] == pytest.approx(evaluate(model, plain_examples, args)["ce"],
                                                                  rel=1e-6)


def test_train_cli_process_weights(tmp_path, capsys):
    args = train.parse_args(["--config", str(ROOT / "configs/tiny.yaml"), "--process-weights",
                             "tool_name=2,arguments=3"])
    assert args.process_weights == {"tool_name": 2.0, "arguments": 3.0}
    config = tmp_path / "run.yaml"
    config.write_text((ROOT / "configs/tiny.yaml").read_text() + "process_weights:\n  names: 2\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(config)])
    assert e.value.code == 2
    assert "process_weights: unknown span type(s) ['names']" in capsys.readouterr().err
