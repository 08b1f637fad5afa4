"""The benchmark scripts run end to end at a tiny size and report what the README and RESULTS.md quote: matched
parameter counts, a constant Mamba cache against a growing KV cache, the ratio table, the goals and the plot.

Runtime budget: under 1 minute on 2 CPU cores (each benchmark point is its own Python process).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_kernels  # noqa: E402
import bench_vlm  # noqa: E402
import vlm_pair  # noqa: E402


def test_matched_pair_has_the_same_lm_size_and_image_tokens():
    mamba, llava = vlm_pair.build_model("ml-mamba", "s"), vlm_pair.build_model("llava", "s")
    m, t = vlm_pair.parameter_counts(mamba)["language_model"], vlm_pair.parameter_counts(llava)["language_model"]
    assert abs(m - t) / t < 0.01  # matched within 1%
    assert mamba.config.text_config.hidden_size == llava.config.text_config.hidden_size
    assert mamba.config.num_image_tokens == llava.config.image_seq_length == 729


@pytest.mark.timeout(300)
def test_vlm_benchmark_runs_side_by_side(tmp_path):
    output = str(tmp_path / "tiny")
    results = bench_vlm.main(["--size", "tiny", "--contexts", "32", "128", "--arms", "ml-mamba", "llava",
                              "--decode-steps", "2", "--prefill-repeats", "1", "--new-tokens", "4",
                              "--e2e-repeats", "1", "--output", output])
    saved = json.load(open(output + ".json"))
    assert saved["summary"] == results["summary"]
    assert os.path.getsize(output + ".png") > 10_000 and "| goal |" in open(output + ".md").read()
    points = {(r["arm"], r["context"]): r for r in saved["sweep"]}
    mamba_cache = [points[("ml-mamba", c)]["decode"]["1"]["cache_mb"] for c in (32, 128)]
    kv_cache = [points[("llava", c)]["decode"]["1"]["cache_mb"] for c in (32, 128)]
    assert mamba_cache[0] == mamba_cache[1] and kv_cache[1] > 3 * kv_cache[0]
    assert points[("llava", 128)]["decode"]["8"]["cache_mb"] == pytest.approx(8 * kv_cache[1], rel=0.05)
    assert {r["arm"] for r in saved["e2e"]} == {"ml-mamba", "llava"}
    assert all(r["new_tokens"] == 4 and r["image_tokens"] == 16 for r in saved["e2e"])
    assert [g["met"] for g in saved["summary"]["goals"] if "cache the same" in g["goal"]] == [True]


def test_kernel_benchmark_reports_equal_outputs():
    rows = bench_kernels.bench_ssd([128], repeats=1) + bench_kernels.bench_decode([2], steps=2)
    assert all(row["max_abs_diff"] < 1e-4 and row["ours_ms"] > 0 for row in rows)


def test_gemv_benchmark_times_every_int8_product(tmp_path):
    import bench_gemv

    from modeling_ml_mamba.ml_mamba_cpu_kernels import supported_isas

    rows = bench_gemv.main(["--size", "tiny", "--rows", "1", "3", "--repeats", "1", "--output", str(tmp_path / "g")])
    expected = {f"int8 activations ({isa})" for isa in supported_isas()} | {"_weight_int8pack_mm",
                                                                         "compiled fused reduction"}
    for count in (1, 3):
        assert {r["variant"] for r in rows if r["rows"] == count} == expected
    assert all(r["ms_per_pass"] > 0 for r in rows)
    assert "| 3 | _weight_int8pack_mm |" in (tmp_path / "g.md").read_text()


def test_decode_benchmark_reports_rooflines_side_by_side(tmp_path):
    """`bench_decode.py` at the tiny size: every precision and decode implementation, LLaVA beside it, the copy and
    read bandwidths, and a roofline share per row (llama.cpp is optional and left out here)."""
    import bench_decode

    out = tmp_path / "decode"
    bench_decode.main(["--size", "tiny", "--contexts", "32", "--steps", "2", "--implementations", "eager", "static",
                       "--no-llama-cpp", "--output", str(out)])
    report = json.loads((tmp_path / "decode.json").read_text())
    assert report["meta"]["bandwidth"]["copy_GBps"] > 0 and report["meta"]["bandwidth"]["read_GBps"] > 0
    rows = report["rows"]
    labels = {(r["arm"], r["precision"], r["implementation"]) for r in rows}
    assert {("ML-Mamba", p, i) for p in ("float32", "float32, split GEMV", "bfloat16", "int8 weight-only")
            for i in ("eager", "static")} <= labels
    assert any(r["arm"] == "LLaVA (Llama)" for r in rows)
    assert all(r["ms_per_token"] > 0 and 0 < r["roofline_share"] for r in rows)
    int8 = next(r for r in rows if r["precision"] == "int8 weight-only")
    float32 = next(r for r in rows if r["precision"] == "float32")
    assert int8["weight_bytes"] < float32["weight_bytes"] / 2  # int8 weights (the embedding row aside)
    assert "share: copy / read roofline" in (tmp_path / "decode.md").read_text()
