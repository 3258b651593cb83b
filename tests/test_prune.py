"""mlx_student.prune and mlx_student.importance: exact identity cuts, importance that finds
planted dead units, the CLI's report read back against the folder it wrote, and shape errors
that name the flag."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import ROOT

from mlx_student import model as student_model
from mlx_student import prune
from mlx_student.config import StudentConfig
from mlx_student.importance import importance

CALIB = ROOT / "data/stdlib/train.jsonl"
HELDOUT = ROOT / "data/stdlib/valid.jsonl"
SMALL = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=49152, rope_theta=100000.0,
             role="test", contexts=[128], prefill_lengths=[16])


def small_base(seed=0):
    config = StudentConfig(**SMALL)
    return student_model.build(config, seed=seed), config


def test_keeping_everything_reproduces_the_teachers_logits_exactly(teacher_dir, tokenizer):
    teacher, _ = mlx_lm.load(str(teacher_dir))
    b = StudentConfig(**prune.base_config(teacher_dir))
    batches = prune.text_batches(CALIB, tokenizer, 64, 32, 2)
    imp = importance(teacher, batches, drop_kl_tokens=0, progress=False)
    assert imp.tokens == 64 and imp.heads.shape == (30, 9) and imp.neurons.shape == (30, 1536)
    inputs = mx.array(batches[0])
    want = np.array(teacher(inputs))
    for depth, width in (("even", "norm"), ("block_importance", "activation")):
        cut = prune.plan(b, b, depth, width, teacher.parameters(), imp)
        assert cut.layers == list(range(30)) and cut.hidden == list(range(576))
        assert all(n == list(range(1536)) for n in cut.neurons)
        student = prune.build(b, cut, teacher.parameters())
        np.testing.assert_array_equal(np.array(student(inputs)), want)


def test_importance_ranks_planted_dead_units_last(tokenizer):
    model, c = small_base()
    layers = model.model.layers
    # layer 2 adds nothing to the residual stream; neuron 7 of layer 1 never fires; KV group 1
    # of layer 0 reads zero values; hidden channel 5 is scaled to zero by every norm
    layers[2].self_attn.o_proj.weight = mx.zeros_like(layers[2].self_attn.o_proj.weight)
    layers[2].mlp.down_proj.weight = mx.zeros_like(layers[2].mlp.down_proj.weight)
    up = np.array(layers[1].mlp.up_proj.weight)
    up[7] = 0
    layers[1].mlp.up_proj.weight = mx.array(up)
    v = np.array(layers[0].self_attn.v_proj.weight)
    v[64:128] = 0
    layers[0].self_attn.v_proj.weight = mx.array(v)
    for norm in [model.model.norm] + [n for ly in layers
                                      for n in (ly.input_layernorm, ly.post_attention_layernorm)]:
        w = np.array(norm.weight)
        w[5] = 0
        norm.weight = mx.array(w)
    batches = prune.text_batches(CALIB, tokenizer, 128, 32, 2)
    imp = importance(model, batches, drop_kl_tokens=64, progress=False)
    assert imp.drop_kl_tokens == 64 and imp.drop_kl[2] == 0 and (np.delete(imp.drop_kl, 2) > 0).all()
    assert np.argmin(imp.block) == 2 and np.argmin(imp.neurons[1]) == 7
    assert imp.neurons[1][7] == 0 and imp.hidden[5] == 0 and np.argmin(imp.hidden) == 5
    assert (imp.heads[0][2:] == 0).all() and (imp.heads[0][:2] > 0).all()
    target = StudentConfig(**{**SMALL, "num_hidden_layers": 3, "num_key_value_heads": 1,
                              "num_attention_heads": 2, "intermediate_size": 192,
                              "hidden_size": 64})
    for depth in ("block_importance", "drop_kl"):
        cut = prune.plan(target, c, depth, "activation", model.parameters(), imp)
        assert cut.layers == [0, 1, 3]
        assert cut.kv_heads[0] == [0] and cut.q_heads[0] == [0, 1]
        assert 7 not in cut.neurons[1] and 5 not in cut.hidden and len(cut.hidden) == 64
    assert prune.plan(target, c, "even", "norm", model.parameters()).layers == [0, 2, 3]


def test_cli_writes_the_lowest_kl_cut_and_its_report_reads_back(tmp_path, tokenizer):
    model, c = small_base(seed=1)
    base = student_model.save(tmp_path / "base", model, c, tokenizer)
    out = tmp_path / "cut"
    r = subprocess.run(
        [sys.executable, "-m", "mlx_student.prune", "--teacher", str(base), "--out", str(out),
         "--layers", "3", "--intermediate", "192", "--calibration", str(CALIB),
         "--calibration-tokens", "128", "--drop-kl-tokens", "64", "--heldout", str(HELDOUT),
         "--heldout-tokens", "128", "--seq-len", "32", "--batch-size", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "prune_report.json").read_text())
    names = {n for cand in report["candidates"] for n in [cand["name"], *cand["same_as"]]}
    assert names == {f"{d}+{w}" for d in prune.DEPTH for w in prune.WIDTH}
    best = min(report["candidates"], key=lambda x: x["kl"])
    assert [x["chosen"] for x in report["candidates"]].count(True) == 1 and best["chosen"]
    assert report["chosen"] == best["name"] and report["cut"]["layers"] == best["layers"]
    md = (out / "prune_report.md").read_text()
    assert f"| {best['name']}" in md and "**chosen**" in md.split(f"| {best['name']}")[1].split("\n")[0]
    assert f"{best['kl']:.4f}" in md
    assert report["importance"]["tokens"] == 128 and len(report["importance"]["drop_kl"]) == 4
    # the folder holds the chosen cut: rescoring it gives the report's numbers
    student, tok = mlx_lm.load(str(out))
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (3, 192)
    heldout = prune.text_batches(HELDOUT, tok, 128, 32, 2)
    teacher, _ = mlx_lm.load(str(base))
    again = prune.score(student, heldout, prune.teacher_logprobs(teacher, heldout))
    for key in ("kl", "ce", "top1_agree"):
        assert again[key] == pytest.approx(best[key], rel=1e-5), key
    assert report["heldout_tokens"] == 4 * 31
    # the held-out chunks are real text from documents spread over the file
    texts = [json.loads(line)["text"] for line in open(HELDOUT)]
    where = [next(i for i, t in enumerate(texts) if tok.decode(row.tolist()) in t)
             for batch in heldout for row in batch]
    assert len(set(where)) == 3  # 4 documents picked, the first too short for a chunk


@pytest.mark.parametrize("flags, message", [
    (["--hidden", "500"], "--hidden 500: model.hidden_size: 500 is not a multiple of 64"),
    (["--layers", "40"], "model.num_hidden_layers: 40 is more than the base's 4"),
    (["--heads", "3", "--kv-heads", "2"], "3 attention heads are not divisible by 2 KV heads"),
])
def test_bad_target_shapes_name_the_field(tmp_path, tokenizer, capsys, flags, message):
    model, c = small_base()
    base = student_model.save(tmp_path / "base", model, c, tokenizer)
    with pytest.raises(SystemExit) as exit:
        prune.main(["--teacher", str(base), "--out", str(tmp_path / "cut"), *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cut").exists()
