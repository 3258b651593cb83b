"""Prompt builders over the real local corpora (CPython's standard library, the Python docs)."""

import ast
import difflib
import json

import pytest

from mlx_student.teacher import prompts


@pytest.fixture(scope="module")
def functions():
    return prompts.stdlib_functions()


def test_stdlib_functions_are_real_parseable_functions(functions):
    assert len(functions) > 5000
    for fn in functions[::50]:
        tree = ast.parse(fn.source)
        assert isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        assert tree.body[0].name == fn.name.split(".")[-1]
        assert prompts.MIN_LINES <= len(fn.source.splitlines()) <= prompts.MAX_LINES
    assert not any("test" in fn.path.split("/")[:-1] for fn in functions)


def operators(source):
    """Every binary and comparison operator of `source`, in walk order."""
    out = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.BinOp):
            out.append(type(n.op))
        elif isinstance(n, ast.Compare):
            out += [type(op) for op in n.ops]
    return out


def test_planted_bug_flips_exactly_one_operator_in_place(functions):
    planted = 0
    for fn in functions[::10]:
        buggy = prompts.plant_bug(fn, seed=7)
        if buggy is None:
            continue
        planted += 1
        ast.parse(buggy)
        diff = [d for d in difflib.ndiff(fn.source.split("\n"), buggy.split("\n")) if d[:2] in ("- ", "+ ")]
        assert len(diff) == 2, (fn.path, fn.name, diff)  # one line changed, comments kept
        old_ops, new_ops = operators(fn.source), operators(buggy)
        assert len(old_ops) == len(new_ops)
        changed = [(a, b) for a, b in zip(old_ops, new_ops) if a is not b]
        assert len(changed) == 1 and prompts.FLIPS[changed[0][0]] is changed[0][1]
    assert planted > 300


def test_builders_make_distinct_user_prompts(functions):
    for name in ("stdlib_explain", "stdlib_complete", "stdlib_fix", "docs_explain", "docs_recall"):
        built = prompts.BUILDERS[name]()
        assert len(built) > 1000, name
        hashes = {prompts.prompt_hash(p.messages) for p in built}
        assert len(hashes) > 0.95 * len(built), name
        for p in built[::500]:
            assert [m["role"] for m in p.messages] == ["user"]
            assert ("```python\n" in p.messages[0]["content"]) == name.startswith("stdlib")
    recall = prompts.docs_recall()
    assert any("`bisect.bisect_left`" in p.messages[0]["content"] for p in recall)
    explain = {p.origin: p.messages[0]["content"] for p in prompts.docs_explain()}
    bisect = next(text for origin, text in explain.items() if "bisect.bisect_left(" in text)
    assert "Locate the insertion point" in bisect and "versionchanged" not in bisect


def test_complete_prompt_stops_after_the_docstring(functions):
    fn = next(f for f in functions if f.path == "bisect.py" and f.name == "insort_right")
    head = prompts._head(fn)
    assert head.startswith("def insort_right(") and head.rstrip().endswith('"""')
    assert "lo = bisect_right" not in head and "lo = bisect_right" in fn.source


def test_jsonl_prompts_and_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    good = [{"prompt": "Hi"}, {"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hello"}]}]
    path.write_text("".join(json.dumps(x) + "\n" for x in good) + "\n")
    got = prompts.read_jsonl(path)
    assert [p.messages for p in got] == [[{"role": "user", "content": "Hi"}], good[1]["messages"]]
    assert got[1].origin == f"{path}:2"
    for line, error in [('{"messages": [{"role": "assistant", "content": "x"}]}', "must not end"),
                        ('{"messages": "hi"}', "field 'messages'"),
                        ('{"text": "x"}', "expected field 'messages'"),
                        ("{not json", "invalid JSON")]:
        path.write_text('{"prompt": "ok"}\n' + line + "\n")
        with pytest.raises(prompts.PromptError, match=f"p.jsonl:2: .*{error}"):
            prompts.read_jsonl(path)


def test_missing_docs_say_how_to_install_them(tmp_path):
    with pytest.raises(prompts.PromptError, match="apt-get install python3.*-doc"):
        prompts.doc_entries(tmp_path)


def test_plan_mixes_by_weight_dedups_and_splits_by_prompt(tmp_path):
    files = []
    for name, n in (("a", 30), ("b", 30), ("c", 5)):
        path = tmp_path / f"{name}.jsonl"
        lines = [{"prompt": f"{name} {i}"} for i in range(n)] + [{"prompt": "a 0"}]  # shared
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        files.append(path)
    sources = [{"name": "a", "jsonl": str(files[0]), "weight": 2},
               {"name": "b", "jsonl": str(files[1]), "weight": 1},
               {"name": "c", "jsonl": str(files[2]), "weight": 1}]
    jobs, shortfall = prompts.plan(sources, 24, 0, 0.2, 0.1, {"temperature": 0.0})
    by_source = {s: sum(j.source == s for j in jobs) for s in "abc"}
    assert by_source == {"a": 12, "b": 6, "c": 5} and shortfall == {"c": 1}
    assert len({prompts.prompt_hash(j.messages) for j in jobs}) == len(jobs)  # "a 0" once
    again, _ = prompts.plan(sources, 24, 0, 0.2, 0.1, {"temperature": 0.0})
    assert [j.id for j in again] == [j.id for j in jobs]
    reseeded, _ = prompts.plan(sources, 24, 1, 0.2, 0.1, {"temperature": 0.0})
    assert {j.id for j in reseeded} != {j.id for j in jobs}
    hot = {j.messages[0]["content"]: j for j in prompts.plan(sources, 24, 0, 0.2, 0.1, {"temperature": 1.0})[0]}
    for j in jobs:  # other sampling: other ids, the same splits
        assert hot[j.messages[0]["content"]].id != j.id
        assert hot[j.messages[0]["content"]].split == j.split
    splits = [j.split for j in prompts.plan(sources, 60, 0, 0.2, 0.1, {})[0]]
    assert {"train", "valid", "test"} == set(splits)
