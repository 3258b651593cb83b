"""Only the positions that count: the LM head at the loss positions gives the full-logit
losses and gradients (issue 15, item 5)."""

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import ROOT, write_jsonl
from mlx.utils import tree_flatten

from mlx_student import model as student_model
from mlx_student.batches import iterate_batches
from mlx_student.config import load_config
from mlx_student.data import load_dataset, load_jsonl
from mlx_student.tools import spans, toolgen
from mlx_student.tools.traces import gold_trace
from mlx_student.trainer import TrainingArgs, counted_positions, make_loss, train

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def tool_examples(tmp_path_factory, tokenizer):
    """Real tool traces (mlx_student.tools): long tool schemas in the prompt, process spans."""
    records = []
    for i in (10, 6, 4, 1):  # 360 to 655 tokens, 5-27 % of them in the loss
        r = gold_trace(toolgen.make_item(0, i))
        r["spans"] = spans.compute(tokenizer, r)
        records.append(r)
    path = tmp_path_factory.mktemp("tools") / "train.jsonl"
    write_jsonl(path, records)
    return load_jsonl(path, tokenizer, 49152, 1024).examples


@pytest.fixture(scope="module")
def tiny():
    return student_model.build(load_config(ROOT / "configs/tiny.yaml"), seed=0)


def first_batch(examples, rows, seq):
    return next(iterate_batches(examples, rows, seq, seed=0))


def test_gather_keeps_every_counted_position_in_order(tool_examples):
    batch = first_batch(tool_examples, 4, 1024)
    out = counted_positions(batch)
    mask, pos = np.array(batch["mask"]), np.array(out["positions"])
    width = pos.shape[1]
    assert width % 32 == 0 and width < mask.shape[1]
    assert width - 32 < (mask != 0).sum(axis=1).max() <= width
    for row in range(mask.shape[0]):
        counted = np.flatnonzero(mask[row])
        np.testing.assert_array_equal(pos[row, : len(counted)], counted)
        assert mask[row, pos[row, len(counted):]].sum() == 0  # padding: uncounted positions
        for name in ("targets", "mask", "token_weights"):
            np.testing.assert_array_equal(np.array(out[name])[row], np.array(batch[name])[row, pos[row]])
    text = {"inputs": batch["inputs"], "targets": batch["targets"], "mask": mx.ones(mask.shape)}
    assert counted_positions(text) is text  # every position counts: nothing to gather


def assert_same_loss_and_grads(loss_fn, model, batch):
    vg = nn.value_and_grad(model, loss_fn)
    scales = mx.ones(1)
    (full, _), g_full = vg(model, batch, scales)
    gathered = counted_positions(batch)
    assert "positions" in gathered
    (part, _), g_part = vg(model, gathered, scales)
    # fp32 sums of n per-position terms in another order: |error| <~ sqrt(n) * eps * scale.
    n = batch["mask"].size
    tol = 16 * math.sqrt(n) * EPS32
    assert part.item() == pytest.approx(full.item(), rel=tol)
    for (name, a), (_, b) in zip(tree_flatten(g_part), tree_flatten(g_full)):
        scale = np.abs(np.array(b)).max()
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol * scale, err_msg=name)


def test_topk_kd_and_ce_losses_and_gradients_match_the_full_logits(tiny, kd_data, tokenizer):
    examples = load_dataset(kd_data, tokenizer, 49152, 64)["train"].examples
    batch = first_batch(examples, 4, 64)
    assert batch["mask"].sum().item() < batch["mask"].size / 2  # prompt-heavy records
    args = TrainingArgs(loss={"ce": 0.5, "topk_kd": 0.5})
    assert_same_loss_and_grads(make_loss(args, ["ce", "topk_kd"]), tiny, batch)


def test_dense_teacher_on_tool_traces_matches_the_full_logits(tiny, tool_examples):
    # any model of the vocabulary is a teacher here: another tiny one keeps the test fast
    teacher = student_model.build(load_config(ROOT / "configs/tiny.yaml"), seed=1)
    batch = first_batch(tool_examples, 1, 1024)  # the shortest trace: 17 of 360 tokens count
    assert "token_weights" in batch
    args = TrainingArgs(loss={"ce": 1.0, "forward_kl": 1.0})
    assert_same_loss_and_grads(make_loss(args, ["ce", "forward_kl"], teacher=teacher), tiny, batch)


def test_training_and_evaluation_give_the_same_numbers(kd_data, tokenizer):
    splits = load_dataset(kd_data, tokenizer, 49152, 64)
    runs = {}
    for counted in (False, True):
        model = student_model.build(load_config(ROOT / "configs/tiny.yaml"), seed=0)
        args = TrainingArgs(batch_size=2, iters=4, max_seq_length=64, steps_per_eval=4,
                            loss={"ce": 0.5, "topk_kd": 0.5}, counted_positions=counted)
        runs[counted] = train(model, optim.AdamW(learning_rate=3e-3), splits["train"].examples,
                              splits["valid"].examples, args)
    # four Adam steps amplify the rounding of the first ones a little: 1e-5 relative.
    np.testing.assert_allclose([h["loss"] for h in runs[True]], [h["loss"] for h in runs[False]], rtol=1e-5)
    full, part = runs[False][-1]["valid"], runs[True][-1]["valid"]
    assert part.keys() == full.keys() >= {"ce", "topk_kd", "top1_agree", "kl_topk"}
    for k in full:
        assert part[k] == pytest.approx(full[k], rel=1e-5), k
