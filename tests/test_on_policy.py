"""On-policy distillation (GKD): student-sampled rows scored by an in-process teacher,
reproducible by (seed, step), exact on resume (issue 15, item 3)."""

import json

import mlx_lm
import numpy as np
import pytest
from conftest import save_tiny, train_argv

from mlx_student import train
from mlx_student.batches import iterate_batches
from mlx_student.data import load_dataset
from mlx_student.onpolicy import on_policy_batch, on_policy_settings

SETTINGS = {"lmbda": 0.5, "temperature": 1.0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    path = save_tiny(tmp_path_factory.mktemp("student") / "tiny", tokenizer, seed=0)
    return mlx_lm.load(str(path))[0]


@pytest.fixture(scope="module")
def batch(kd_data, tokenizer):
    examples = load_dataset(kd_data, tokenizer, 49152, 64)["train"].examples
    return next(iterate_batches(examples, 4, 64, seed=0))


def test_rows_are_the_prompt_and_the_students_sample(student, batch, tokenizer):
    eos = set(tokenizer.eos_token_ids)
    out, rows = on_policy_batch(student, batch, SETTINGS, eos, seed=0, step=3, max_seq_length=64)
    assert len(rows) == 2  # round(0.5 * 4 rows with loss tokens)
    mask, kd_mask = np.array(batch["mask"]), np.array(out["kd_mask"])
    inputs, targets = np.array(out["inputs"]), np.array(out["targets"])
    for j in range(4):
        start = int(np.argmax(mask[j]))  # the prompt: tokens[: start + 1]
        np.testing.assert_array_equal(inputs[j, : start + 1], np.array(batch["inputs"])[j, : start + 1])
        if j not in rows:  # the data's own rows are untouched
            width = mask.shape[1]
            np.testing.assert_array_equal(np.array(out["mask"])[j, :width], mask[j])
            np.testing.assert_array_equal(kd_mask[j, :width], np.array(batch["kd_mask"])[j])
            continue
        assert np.array(out["mask"])[j].sum() == 0  # no CE on the student's own tokens
        n = int(kd_mask[j].sum())
        assert 1 <= n <= SETTINGS["max_new_tokens"] and kd_mask[j, start : start + n].all()
        sample = targets[j, start : start + n].tolist()
        np.testing.assert_array_equal(inputs[j, start + 1 : start + n], sample[:-1])
        assert n == SETTINGS["max_new_tokens"] or sample[-1] in eos  # stops at eos or the cap
        assert not any(t in eos for t in sample[:-1])
        assert not np.isfinite(np.array(out["topk_logprobs"])[j]).any()  # no stored targets


def test_batches_are_reproducible_by_step(student, batch, tokenizer):
    eos = set(tokenizer.eos_token_ids)

    def make(step, seed=0):
        out, rows = on_policy_batch(student, batch, SETTINGS, eos, seed, step, 64)
        return rows, {k: np.array(v) for k, v in out.items()}

    rows, a = make(5)
    rows2, b = make(5)
    assert rows == rows2 and all(np.array_equal(a[k], b[k]) for k in a)
    others = [make(6), make(5, seed=1)]
    assert all(not np.array_equal(a["targets"], o["targets"]) for _, o in others)


def run(tmp_path, data, teacher, *flags):
    argv = train_argv(tmp_path, data, "--teacher", str(teacher), "--on-policy",
                      "lmbda=0.5,temperature=1.0,max_new_tokens=8", *flags,
                      loss={"ce": 0.5, "jsd": 1.0})
    return train.run(train.parse_args(argv))


def test_resumed_run_samples_and_trains_exactly_as_the_whole_one(tmp_path, kd_data, tokenizer):
    teacher = save_tiny(tmp_path / "teacher", tokenizer, seed=1)
    whole = run(tmp_path / "whole", kd_data, teacher, "--iters", "4")
    run(tmp_path / "cut", kd_data, teacher, "--iters", "2")
    resumed = run(tmp_path / "cut", kd_data, teacher, "--iters", "4", "--resume")
    assert [h["step"] for h in resumed] == [3, 4]
    np.testing.assert_array_equal([h["loss"] for h in resumed], [h["loss"] for h in whole[2:]])
    metrics = [json.loads(x) for x in (tmp_path / "cut" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [m["jsd"] for m in metrics] == [h["jsd"] for h in whole]


@pytest.mark.parametrize("value, loss, teacher, message", [
    ({"lmbda": 1.5}, {"jsd": 1}, True, "on_policy.lmbda: a fraction in [0, 1], got 1.5"),
    ({"lambda": 0.5}, {"jsd": 1}, True, "unknown key(s) ['lambda']"),
    ({}, {"jsd": 1}, False, "needs a teacher in process"),
    ({}, {"topk_kd": 1, "jsd": 1}, True, "nothing but ce besides"),
])
def test_settings_errors(value, loss, teacher, message):
    with pytest.raises(ValueError) as e:
        on_policy_settings(value, loss, teacher)
    assert message in str(e.value)


def test_cli_names_the_config_file(tmp_path, kd_data, capsys):
    argv = train_argv(tmp_path, kd_data, "--on-policy", "lmbda=2", loss={"jsd": 1.0})
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err and "--on-policy lmbda: a fraction in [0, 1], got 2" in err

