"""The pilot's natural-text source (pilot/targets.py): token budgets per source, seeded
passages, held-out files refused by path and by content, and the arms' data manifest read
back from the files."""

import json

import pytest

from mlx_student.config import ConfigError
from pilot import targets


def docs_folder(path, n, words=400):
    path.mkdir(parents=True)
    for i in range(n):
        paras = [" ".join(f"{path.name}{i}x{j}y{k}" for k in range(words // 8)) for j in range(8)]
        (path / f"doc{i:02d}.rst.txt").write_text("\n\n".join(paras))
    return path


def test_natural_text_meets_each_budget_with_seeded_passages(tmp_path, tokenizer):
    a, b = docs_folder(tmp_path / "a", 6), docs_folder(tmp_path / "b", 4)
    sources = [{"path": str(a), "tokens": 1500}, {"path": str(b), "tokens": 500}]
    out = tmp_path / "nat"
    got = targets.natural_text(sources, tokenizer, 400, seed=3, out=out, chars=600)
    rows = {sp: [json.loads(x)["text"] for x in (out / f"{sp}.jsonl").read_text().splitlines()]
            for sp in ("train", "valid")}
    passages = {src: dict(targets.passages(targets.documents(src), 600)) for src in (a, b)}
    longest = max(len(tokenizer.encode(t)) for p in passages.values() for t in p.values())
    for src, share in ((a, 300), (b, 100)):  # valid: each source's share of 400 tokens
        g = got[str(src)]
        assert sources[0 if src == a else 1]["tokens"] <= g["train"]["tokens"] < (
            sources[0 if src == a else 1]["tokens"] + longest)
        assert share <= g["valid"]["tokens"] < share + longest
        for sp in ("train", "valid"):  # the counts are the written passages' tokens
            texts = [passages[src][n] for n in g[sp]["names"]]
            assert all(t in rows[sp] for t in texts)
            assert g[sp]["tokens"] == sum(len(tokenizer.encode(t)) for t in texts)
    assert not set(rows["train"]) & set(rows["valid"])
    assert all(len(t) <= 600 or "\n\n" not in t for t in rows["train"])  # cut at blank lines
    again = targets.natural_text(sources, tokenizer, 400, seed=3, out=tmp_path / "again", chars=600)
    other = targets.natural_text(sources, tokenizer, 400, seed=4, out=tmp_path / "other", chars=600)
    assert again == got and other != got
    with pytest.raises(ConfigError, match=rf"{b} holds \d+ train tokens, 99999 asked"):
        targets.natural_text([{"path": str(b), "tokens": 99999}], tokenizer, 0, 0,
                             tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_sources_that_touch_the_held_out_text_are_refused(tmp_path):
    held = docs_folder(tmp_path / "docs" / "tutorial", 2)
    other = docs_folder(tmp_path / "docs" / "library", 2)
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    targets.check_disjoint([str(other)], [str(held), str(jsonl)])
    with pytest.raises(ConfigError, match=r"docs shares 2 file\(s\) with the held-out evaluation"):
        targets.check_disjoint([str(tmp_path / "docs")], [str(held)])
    with pytest.raises(ConfigError, match="shares 1 file"):
        targets.check_disjoint([str(jsonl)], [str(held), str(jsonl)])
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "x.txt").write_text((held / "doc01.rst.txt").read_text())
    with pytest.raises(ConfigError, match=rf"copy \(x.txt\) holds the same text as the held-out "
                                          rf"{held} \(doc01.rst.txt\)"):
        targets.check_disjoint([str(copy)], [str(held)])


def test_read_back_counts_each_source(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a b", "ids": [1, 2, 3, 4], "topk": [[[2, -0.1]]] * 3},
            {"messages": [{"role": "user", "content": "q"}], "completion": "x",
             "completion_ids": [5, 6], "finish_reason": "stop"},
            {"messages": [{"role": "user", "content": "q"}], "completion": "x",
             "completion_ids": [5, 6, 7], "finish_reason": "length"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert targets.read_back(path) == {
        "scored natural text": {"records": 1, "target_tokens": 3},
        "teacher completions": {"records": 2, "target_tokens": 3 + 3}}
