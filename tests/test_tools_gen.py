"""The contextual generator: determinism across shard counts and N, strata, controls, and
traces the runtime and the data loader read as the student will see them."""

import json
from collections import Counter

import pytest

from mlx_student.tools import toolgen
from mlx_student.tools.registry import TOOLS
from mlx_student.tools.traces import gold_trace

from conftest import ROOT


def _gen(out, *flags):
    toolgen.main(["--tokenizer", str(ROOT / "models/smollm2-135m-instruct"), "--out", str(out), *flags])


@pytest.fixture(scope="module")
def generated(tmp_path_factory, teacher_dir):
    base = tmp_path_factory.mktemp("toolgen")
    _gen(base / "one", "--n", "30")
    for k in range(3):
        _gen(base / f"s{k}", "--n", "30", "--num-shards", "3", "--shard", str(k))
    _gen(base / "merged", "--merge", *(str(base / f"s{k}") for k in range(3)))
    return base


def test_same_items_in_any_shard_count(generated):
    names = sorted(p.name for p in (generated / "one").iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in (generated / "merged").iterdir() if p.name != "manifest.json")
    assert "train.jsonl" in names and "fixtures.json" in names
    for name in names:
        assert (generated / "one" / name).read_bytes() == (generated / "merged" / name).read_bytes(), name
    shard = [json.loads(x) for x in (generated / "s1" / "train.jsonl").read_text().splitlines()]
    assert shard and all(r["meta"]["index"] % 3 == 1 for r in shard)


def test_smaller_n_is_a_prefix_of_larger_n():
    small = [toolgen.make_item(0, i) for i in range(40)]
    again = [toolgen.make_item(0, i) for i in range(40)]  # no state carried between items
    assert small == again
    assert toolgen.make_item(1, 3) != toolgen.make_item(0, 3)  # the seed matters
    assert [toolgen.make_item(0, i)["meta"]["split"] for i in range(40)] == [r["meta"]["split"] for r in small]


def test_strata_controls_and_probes():
    items = [toolgen.make_item(0, i) for i in range(len(toolgen.CELLS) * 2)]
    ordinary = [it for it in items if not it["meta"]["control"] and not it["meta"]["locale"]
                and not it["meta"]["long_context"]]
    cells = Counter((m["scenario"], m["complexity"], m["structure"]) for m in (it["meta"] for it in ordinary))
    assert len(cells) >= 0.8 * len(toolgen.CELLS)  # stratified: nearly every cell in two blocks
    assert sum(it["meta"]["control"] for it in items) / len(items) == pytest.approx(0.1, abs=0.02)
    for it in items:
        m = it["meta"]
        if m["control"]:
            assert it["steps"] == [] and m["expected_calls"] == []
        else:
            assert [c["name"] for c in m["expected_calls"]] == [s[0] for s in it["steps"]]
            assert set(c["name"] for c in m["expected_calls"]) <= set(it["tools"]) <= set(TOOLS)
            assert all(f in it["answer"] for f in m["facts"])
    kinds = Counter(it["meta"]["adversarial"] for it in items)
    assert kinds["injection"] >= 3 and kinds["malformed_output"] >= 1
    assert any(it["meta"]["locale"] for it in items) and any(it["meta"]["long_context"] for it in items)
    branching = [it for it in ordinary if it["meta"]["complexity"] == "branching"]
    assert branching and all("error" in json.dumps(it["steps"][0][2]).lower() or it["steps"][0][2] in (
        {"results": []}, {"matches": []}) for it in branching)


def test_trace_prompt_is_the_runtime_prompt(tokenizer):
    from runtime.generate import chat_prompt

    record = gold_trace(toolgen.make_item(0, 2))
    messages, tools = record["messages"], record["tools"]
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            ours = tokenizer.apply_chat_template(messages[:k], tools=tools, add_generation_prompt=True)
            assert list(ours) == chat_prompt(tokenizer, messages[1:k], tools)
            if m.get("tool_calls"):
                fn = m["tool_calls"][0]["function"]
                call = json.loads(m["content"])
                assert call == {"name": fn["name"], "arguments": json.loads(fn["arguments"])}


def test_data_loader_reads_the_generated_folder(generated, tokenizer):
    from mlx_student.data import load_dataset

    splits = load_dataset(generated / "one", tokenizer, 49152, 4096)
    assert splits["train"].format == "tools" and splits["train"].skipped == 0
    records = [json.loads(x) for x in (generated / "one" / "train.jsonl").read_text().splitlines()]
    ex = splits["train"].examples[0]
    # the loss part (the last turn) decodes to the final answer
    assert records[0]["messages"][-1]["content"] in tokenizer.decode(list(ex.tokens[ex.prompt_len:]))
    manifest = json.loads((generated / "one" / "manifest.json").read_text())
    assert manifest["gold"]["records"] == 30 and manifest["gold"]["alignment"]["alignment_rate"] == 1.0


def test_bad_shard_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _gen(tmp_path / "x", "--n", "5", "--shard", "3", "--num-shards", "3")
    assert e.value.code == 2 and "--shard 3 must be in [0, 3)" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n: must be an integer >= 1, got 0"),
    (["--n", "-5"], "--n: must be an integer >= 1, got -5"),
    (["--n", "5", "--concurrency", "0"], "--concurrency: must be an integer >= 1, got 0")])
def test_bad_counts_are_refused_naming_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        _gen(tmp_path / "x", *flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_counts_in_the_config_are_named_by_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("seed: 1\nn: 0\n")
    with pytest.raises(SystemExit):
        _gen(tmp_path / "x", "--config", str(tmp_path / "c.yaml"))
    assert f"{tmp_path / 'c.yaml'}:2: n: must be an integer >= 1, got 0" in capsys.readouterr().err
