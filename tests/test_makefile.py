"""The Makefile: `make help` lists every target, and every target's commands (`make -n`) call
a console script of this project with flags its own argparse parser accepts."""

import importlib
import re
import shlex
import subprocess
import tomllib

import pytest

from conftest import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def make(*args):
    out = subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def targets():
    return re.findall(r"^  (\S+)\s", make("help"), flags=re.M)


SEED_TARGETS = {"worker", "onnx-worker", "coreml-worker", "probes", "eval", "proc", "qat",
                "contextual-gen", "contextual-extract", "contextual-verify", "contextual-pipeline",
                "gen-scale-1k", "gen-scale-10k", "verify-scale-1k", "verify-scale-10k",
                "eval-runner-openai", "eval-runner-local", "caws-eval",
                "judge_data", "judge_train", "judge_eval", "judge_coreml"}


def test_help_lists_the_seed_workflow_with_one_line_each():
    listed = targets()
    assert SEED_TARGETS <= set(listed)
    assert len(listed) == len(set(listed))


def commands(target):
    """Each `.venv/bin/mlx_student.X args` invocation that `make -n target` would run."""
    dry = make("-n", target, "MODEL=runs/m", "IN=data/in", "OUT=artifacts/o")
    calls = []
    for part in re.split(r"&&|\|\||;|\n", dry):
        words = shlex.split(part.strip().removeprefix("do "))
        if words and words[0].startswith(".venv/bin/mlx_student."):
            calls.append((words[0].removeprefix(".venv/bin/"), words[1:]))
    return calls


@pytest.mark.parametrize("target", sorted(SEED_TARGETS - {"help"}))
def test_each_target_calls_a_real_cli_with_flags_it_accepts(target):
    calls = commands(target)
    assert calls, f"make -n {target} runs no mlx_student CLI"
    for script, argv in calls:
        assert script in SCRIPTS, f"{target}: {script} is not a console script"
        module = importlib.import_module(SCRIPTS[script].split(":")[0])
        argv = [a.replace("$k", "0") for a in argv]
        module.build_parser().parse_args(argv)  # SystemExit(2) names the unknown flag


def test_contextual_pipeline_runs_for_real(tmp_path):
    """A real target end to end: 60 gold traces generated, then verified with every gate."""
    out = tmp_path / "ctx"
    make("contextual-pipeline", f"OUT={out}")
    report = (out / "report" / "toolverify.md").read_text()
    assert (out / "train.jsonl").exists() and "| schema_validity | 1.0000 |" in report
