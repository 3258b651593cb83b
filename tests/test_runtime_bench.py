"""The generation bench end to end on a tiny student (a smoke run with few tokens)."""

import json

from runtime import bench
from conftest import save_tiny


def test_bench_writes_table_json_and_plot(tmp_path, tokenizer):
    path = save_tiny(tmp_path / "tiny", tokenizer, seed=0)
    out = tmp_path / "bench"
    r = bench.bench(["--model", str(path), "--prompt-lengths", "16", "64", "--decode-tokens", "12",
                    "--reps", "1", "--draft-model", str(path), "--draft-k", "2", "--out", str(out)])
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(r))
    assert set(r["ttft_s"]) == {16, 64}
    assert r["ratio_vs_mlx_lm"] > 0 and r["decode_tps"]["ours"] > 0 and r["decode_tps"]["mlx_lm"] > 0
    rf = r["roofline"]
    assert rf["bytes_per_token"] > 4 * 6_587_008  # fp32 weights at least
    assert 0 < rf["achieved_pct"] and isinstance(rf["m1_max_ceilings_tps"], list)
    assert r["constrained"]["runs"] > 0 and r["constrained"]["grammar_ms_per_token"] > 0
    spec = r["speculative"]["by_k"][2]
    assert spec["exact"] and spec["acceptance"] == 1.0  # the drafter is the target itself
    md = (out / "bench.md").read_text()
    assert "ours vs mlx_lm.generate" in md and "CoreML engine" in md
    assert (out / "bench.png").stat().st_size > 1000
