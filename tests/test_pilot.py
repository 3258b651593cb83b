"""The KD pilot end to end (--quick, tiny student): every stage runs for real, the report's
numbers come from the stage outputs, its gates from the probe's real exit, and a rerun skips
every stage."""

import json
import math
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from pilot import run as pilot
from pilot.report import _f


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, teacher_dir):
    """The quick pilot on configs/tiny.yaml, run from a temp folder (runs/, data/ there)."""
    work = tmp_path_factory.mktemp("pilot")
    config = work / "tiny.yaml"
    config.write_text((ROOT / "configs/tiny.yaml").read_text().replace(
        "models/smollm2", str(ROOT / "models/smollm2")) + f"""
pilot:
  name: t
  teacher: {teacher_dir.resolve()}
  kd_mix: {{config: {ROOT / 'configs/kd_mix.yaml'}}}
  export: {{config: {ROOT / 'configs/export.yaml'}}}
  prune: {{calibration: {ROOT / 'data/stdlib/train.jsonl'}, heldout: {ROOT / 'data/stdlib/valid.jsonl'}}}
  eval: {{heldout_fallback: {ROOT / 'data/stdlib/test.jsonl'},
          next_line: {{file: {ROOT / 'data/stdlib/test.jsonl'}}}}}
  quick:
    export: {{contexts: [128], prefill_lengths: [16]}}
""")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        pilot.main(["--config", str(config), "--quick"])
    return work, config, work / "runs" / "t_quick"


def finite_numbers(obj):
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in finite_numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_report_numbers_come_from_the_stage_outputs(quick_run):
    work, _, run = quick_run
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["models"]) == {"pruned", *pilot.ARMS, "teacher"}
    for who, row in ev["models"].items():
        for key in ("kl", "ce", "top1_agree", "next_line"):
            lo, hi = row[key]["ci95"]
            assert math.isfinite(row[key]["value"]) and lo <= hi, (who, key)
        assert f"{_f(row['kl']['value'])} [{_f(row['kl']['ci95'][0])}" in md
        assert f"{_f(row['ce']['value'])} [{_f(row['ce']['ci95'][0])}" in md
    teacher = ev["models"]["teacher"]
    assert teacher["kl"]["value"] == 0 and teacher["top1_agree"]["value"] == 1
    assert ev["best"] in pilot.ARMS and ev["best"] != "control"
    # every arm starts from the pruned init the prune report chose, and trains 12 steps
    prune = json.loads((run / "pruned" / "prune_report.json").read_text())
    chosen = next(c for c in prune["candidates"] if c["chosen"])
    assert chosen["kl"] == min(c["kl"] for c in prune["candidates"])
    assert f"| {chosen['name']}" in md and _f(chosen["kl"]) in md
    for arm in pilot.ARMS:
        metrics = [json.loads(x) for x in (run / arm / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 12 and all(math.isfinite(m["loss"]) for m in metrics)
        state = json.loads((run / f"{arm}.trainer" / "state.json").read_text())["settings"]
        assert state["init_from"] == str(pilot.Path("runs/t_quick/pruned"))
        assert state["loss"] == pilot.PILOT_DEFAULTS["arms"][arm] and state["seed"] == 0
        assert bool(state["teacher"]) == (arm == "dense_kd")
    kd = next((work / "data").glob("kd_t_quick-*"))
    manifest = json.loads((kd / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records_with_topk"] == manifest["records"]
    assert f"{manifest['records']} (" in md  # every record of the folder
    # the arms' data: scored natural text (each source's budget met) + the teacher's completions
    natural = json.loads((run / "natural" / "sources.json").read_text())
    budgets = {s["path"]: s["tokens"] for s in pilot.PILOT_DEFAULTS["quick"]["score"]["sources"]}
    assert {k: v["train"]["tokens"] >= budgets[k] for k, v in natural.items()} == {
        k: True for k in budgets}
    scored = json.loads((work / "data" / "scored_t_quick" / "manifest.json").read_text())
    data = json.loads((work / "data" / "train_t_quick" / "manifest.json").read_text())
    for split in ("train", "valid"):
        got = data["splits"][split]
        assert got["scored natural text"]["target_tokens"] == scored["splits"][split]["tokens"]
        lines = (kd / f"{split}.jsonl").read_text().splitlines()
        assert got["teacher completions"]["records"] == len(lines)
        assert f"| {split} | teacher completions | {len(lines)} |" in md
    for arm in pilot.ARMS:  # loss tokens each arm saw, from its own metrics
        seen = sum(json.loads(x)["tokens"] for x in (run / arm / "metrics.jsonl").read_text()
                   .splitlines())
        assert f"| `{arm}` | {json.dumps(pilot.PILOT_DEFAULTS['arms'][arm])} | 12 | {seen} |" in md
    bench = json.loads((run / "bench" / "bench.json").read_text())
    assert all(math.isfinite(x) for x in finite_numbers(bench["roofline"]) if x is not None)
    assert f"achieved {bench['roofline']['achieved_pct']:.0f} %" in md
    assert "needs macOS" in md
    for fmt in ("fp16", "int8"):
        em = json.loads((run / "export" / fmt / "export_manifest.json").read_text())
        assert f"{em['bytes_per_param']:.3f}" in md
    # plots: files beside the Markdown, inline PNGs in the HTML
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(images) >= 3 and all((run / i).stat().st_size > 1000 for i in images)
    assert page.count("data:image/png;base64,iVBORw0KGgo") == len(images)


def ev_best(run):
    return json.loads((run / "eval.json").read_text())["best"]


def test_gates_reflect_the_probes_real_exit(quick_run):
    work, _, run = quick_run
    gates = json.loads((run / "report_files" / "gates.json").read_text())
    pkg = run / "export" / "fp16"
    recorded = json.loads((run / "probe" / "fp16" / "exit.json").read_text())["exit"]
    real = subprocess.run(
        [sys.executable, "-m", "export.probe", "--model", str(run / ev_best(run)), "--package",
         str(pkg / "model.mlpackage"), "--out", str(work / "reprobe"), "--windows", "1",
         "--decode-steps", "4"], cwd=ROOT, capture_output=True, text=True)
    assert real.returncode == recorded, real.stderr
    row = next(g for g in gates if g[0] == "probe exit (fp16)")
    assert row[1] == f"exit {recorded}" and row[2] == ("pass" if recorded == 0 else "FAIL")
    ev = json.loads((run / "eval.json").read_text())
    for key, label in (("kd_beats_control_kl", "held-out KL"), ("kd_beats_control_ce", "held-out CE"),
                       ("gap_closed_ok", "CE gap")):
        row = next(g for g in gates if label in g[0])
        assert row[2] == ("pass" if ev["gates"][key] else "FAIL")
    tc = json.loads((run / "tool_calls.json").read_text())
    row = next(g for g in gates if g[0].startswith("constrained tool calls"))
    assert row[1] == f"{tc['valid']}/{tc['n']}" and tc["n"] == 4
    assert all(c["valid"] == (c["error"] is None) for c in tc["calls"])


def test_rerun_skips_every_stage(quick_run, capsys):
    work, config, run = quick_run
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        pilot.main(["--config", str(config), "--quick"])
    out = capsys.readouterr().out
    for stage in pilot.STAGES:
        assert re.search(rf"\[pilot\] {stage}: up to date \(key \w+\), skipped", out), stage
    log = json.loads((run / "pilot_log.json").read_text())
    assert all(s["skipped"] for s in log["stages"])


def test_another_seed_is_a_new_run_with_every_seed_changed():
    s0 = pilot.settings_of(ROOT / "configs/pilot.yaml")
    s1 = pilot.settings_of(ROOT / "configs/pilot.yaml", seed=1)
    assert (s0["name"], s1["name"]) == ("kd_pilot", "kd_pilot_seed1")
    assert pilot.settings_of(ROOT / "configs/pilot.yaml", name="x", seed=1)["name"] == "x"
    for s, seed in ((s0, "0"), (s1, "1")):
        for argv in (pilot.kd_mix_argv(s), pilot.score_argv(s),
                     pilot.train_argv(s, "control", "init")):
            assert argv[argv.index("--seed") + 1] == seed
    assert pilot.kd_dir(s0) != pilot.kd_dir(s1)


def test_bad_stage_settings_stop_the_pilot_before_its_first_stage(tmp_path, monkeypatch, capsys):
    """Every arm's train settings and the kd_mix settings are checked up front: a mistake in
    the pilot: block ends at load with exit 2, naming the setting, before any stage runs."""
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "configs/tiny.yaml").read_text().replace(
        "models/smollm2", str(ROOT / "models/smollm2"))
        + "pilot:\n  name: bad\n  train:\n    iters: -3\n  arms: {control: {ce: 1.0}, "
          "topk_kd: {topk_kd: 1.0, nope: 1.0}}\n")
    monkeypatch.chdir(ROOT)  # the pilot's relative paths (configs/kd_mix.yaml, runs/)
    with pytest.raises(SystemExit) as e:
        pilot.main(["--config", str(config)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"{config}: the control arm's mlx_student.train settings" in err
    assert "--iters: must be an integer >= 1, got -3" in err
    assert not (ROOT / "runs" / "bad").exists()
