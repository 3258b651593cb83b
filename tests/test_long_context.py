"""Long prompts on device: a worker-head-layout package (32 query / 8 KV heads, d_head 128) at a
4k context, a 1200-token prompt through its prefill chunks and decode steps (reference MIL
executor; each call attends over the whole 4096-long state) against one MLX prefill: logits and
the whole KV state. scripts/check_long_context.py runs 12k tokens through a 16k package."""

import dataclasses
from pathlib import Path

import pytest

from mlx_student.config import load_config

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, tokenizer):
    from export.convert import convert_function, plan, save_multifunction
    from export.mirror import load_mirror
    from mlx_student import model as student_model

    config = load_config(ROOT / "configs/worker_narrow.yaml")
    config = dataclasses.replace(config, contexts=[4096], max_position_embeddings=4096)
    model = student_model.build(config, seed=7)
    model.model.norm.weight = model.model.norm.weight * 4  # logits far from ties
    root = tmp_path_factory.mktemp("narrow")
    folder = student_model.save(root / "student", model, config, tokenizer)
    mirror = load_mirror(folder)
    specs = plan(config.contexts, config.prefill_lengths)
    package = save_multifunction({s.name: convert_function(mirror, s) for s in specs},
                                 root / "student.mlpackage", specs[0].name)
    return folder, package, config


def test_chunked_prefill_at_4k_matches_one_mlx_prefill(narrow):
    from runtime.long_prefill import check, markdown

    folder, package, config = narrow
    r = check(folder, package, n_tokens=1200, fp16_tokens=512)
    print(markdown(r))
    assert r["backend"] == "executor" and r["context"] == 4096
    assert r["calls"] == {"512": 2, "64": 2, "1": 48}  # 1024 + 128 + 48 = 1200
    assert [c["position"] for c in r["per_call"][:5]] == [511, 1023, 1087, 1151, 1152]
    # the probe's fp16 error model: within 8x mlx-lm's own fp16 error on the same ids, every
    # call's logits and the whole KV state; and a wrong chunk would be far outside (below)
    for name in ("logits", "k_cache", "v_cache"):
        assert r[name]["nonfinite"] == 0 and r[name]["err_ratio"] < 8, (name, r[name])
    assert r["ok"] and {g["gate"] for g in r["gates"]} == {"tap_err_ratio", "top1", "kl"}
    assert r["top1_rate"] >= 0.99 and r["kl_mean"] < 1e-2
    shape = [config.num_hidden_layers, 8, 128, 4096]
    assert r["kv_state"] == {4096: {"shape": shape, "states": 2, "bytes": 2 * 2 * 2 * 8 * 128 * 4096}}
    assert r["peak_memory_gb"]["coreml_process_rss"] > 0 and r["peak_memory_gb"]["mlx"] > 0
