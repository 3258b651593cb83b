"""Per-context bench rows on a tiny student: the prompt fills each context, KV bytes from the
config, gate statuses, and the time to a schema-valid tool call under the grammar."""

import sys

from conftest import save_tiny

from runtime import bench, context_bench
from runtime.generate import MLXEngine


def test_per_context_rows_fill_each_context_and_gate(tmp_path, tokenizer):
    engine = MLXEngine.load(save_tiny(tmp_path / "tiny", tokenizer))
    gates = {512: {"ttft_s": ("<=", 60.0), "decode_tps": (">=", 1e9), "peak_memory_gb": ("<=", 1e-6)}}
    rows = context_bench.per_context(engine, [256, 512], 8, bench.prompt_of, bench.no_eos,
                                     bench.TOOL, gates)
    assert [r["context"] for r in rows] == [256, 512]
    for r in rows:
        assert r["prompt_tokens"] + r["decode_tokens"] == r["context"]
        # 2 (K, V) x 2 layers x 1 KV head x 64 head_dim x context x 2 bytes (fp16)
        assert r["kv_cache_bytes_fp16"] == 2 * 2 * 1 * 64 * r["context"] * 2
        # the fp32 model's own cache at this context is in MLX's peak
        assert r["peak_memory_gb"] * 1e9 > r["kv_cache_bytes_fp16"] * 2
        assert r["ttft_s"] > 0 and r["decode_tps"] > 0
        t = r["ttfa"]
        assert t["valid"] == (t["finish_reason"] == "stop") and 0 < t["tokens"] <= 120
    assert rows[0]["gates"] == []
    status = {g["metric"]: g["status"] for g in rows[1]["gates"]}
    speed = "fail" if sys.platform == "darwin" else "needs macOS"
    assert status == {"ttft_s": "pass" if sys.platform == "darwin" else "needs macOS",
                      "decode_tps": speed, "peak_memory_gb": "fail"}
    assert "| 512 |" in "\n".join(context_bench.markdown(rows))
