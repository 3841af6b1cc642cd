"""``benchmarks/report.py``'s derived numbers: the roofline bound stays issue 3's three terms; the host-memory
traffic is an extra, informational figure with the bytes its markdown states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.bench_modules import load

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _results(upload_cast: str, step_s: float = 1.0) -> dict:
    report = {"host_updated_params": 2_000_000_000, "streamed_params": 2_500_000_000, "upload_cast": upload_cast}
    return {
        "shape": {"total_params": 3_000_000_000},
        "args": {"batch_sizes": [8]},
        "records": [{"system": "slideformer", "batch_size": 8, "status": "ok", "step_time_s": step_s,
                     "tokens_per_s": 8192 / step_s, "model_tflops": 100.0, "mode": "slideformer",
                     "host_rss_peak_bytes": 40 << 30,
                     "engine_memory_report": report}],
        "roofline": {"gpu_compute": {"8": {"time_s": 0.5}},
                     "pcie": {"h2d_gbs": 50.0, "d2h_gbs": 50.0, "both_gbs": 90.0},
                     "cpu_adam_slideformer": {"gparam_s": 5.0, "threads": 16}},
    }


@pytest.mark.parametrize("cast,adam,up", [("copy", 28, 4), ("device", 26, 8), ("host", 26, 16)])
def test_host_memory_traffic_is_informational(cast: str, adam: int, up: int) -> None:
    rep = load("report")
    row = rep.derive(_results(cast))["per_batch"]["8"]
    # The bound is still max(GPU, CPU optimizer, PCIe): 2e9 params / 5 Gparam/s = 0.4 s vs 0.5 s of GPU.
    assert row["cpu_optimizer_s"] == pytest.approx(0.4) and row["bound_by"] == "gpu_compute"
    assert row["efficiency"] == pytest.approx(0.5)
    moved = adam * 2e9 + (up + 2) * 2.5e9
    assert row["host_memory_s"] == pytest.approx(moved / (5e9 * 28))
    assert row["host_memory_efficiency"] == pytest.approx(row["host_memory_s"] / 1.0)
    assert row["host_memory_s"] > row["bound_s"]  # what the three terms cannot see


def test_roofline_measures_a_variant_when_the_run_has_no_plain_child() -> None:
    """A run of variants only (session 19's ``effpark19``) still gets its efficiency, on the first variant of this
    tree's engine (never another tree's ``slideformer@LABEL``), named in the target row and the markdown."""
    rep = load("report")
    res = _results("device", step_s=0.8)
    plain = res["records"][0]
    other = {**plain, "system": "slideformer@prev", "step_time_s": 0.4}
    variant = {**plain, "system": "slideformer+grad_park_mib=8192"}
    res["records"] = [other, variant]
    row = rep.derive(res)["per_batch"]["8"]
    assert row["efficiency_child"] == "slideformer+grad_park_mib=8192"
    assert row["efficiency"] == pytest.approx(0.5 / 0.8)
    # Every slideformer child, each against the roofline with its own parameters (the other tree's too).
    assert {k: round(v["efficiency"], 3) for k, v in row["children"].items()} == {
        "slideformer@prev": round(0.5 / 0.4, 3), "slideformer+grad_park_mib=8192": round(0.5 / 0.8, 3)}
    res["shape"] = {"name": "llama3.2-3b", "num_layers": 28, "hidden_size": 3072, "total_params": 3_000_000_000}
    res["args"] = {**res["args"], "seq_len": 1024, "warmup": 2, "steps": 5}
    res["derived"] = rep.derive(res)
    labels = [r[0] for r in load("report_md").targets(res, res["derived"])]
    assert "3: efficiency, batch 8 (slideformer+grad_park_mib=8192)" in labels
    # The markdown of the run that needed it (its raw JSON, committed), re-derived.
    run = json.loads((RESULTS / "llama3.1-8b_cap24g_effpark19_h100_bench.json").read_text())
    run["derived"] = rep.derive(run)
    text = rep.markdown(run)
    assert "| 8 | 0.978 | 1.347 | 0.546 | 1.347 | cpu_optimizer | 1.675 | 0.80 |" in text
    assert "the step and efficiency above are `slideformer+grad_park_mib=8192`'s" in text
    assert ("| 8 | slideformer+host_copy=bf16+grad_park_mib=8192 | 1.920 | 1.347 | 0.546 | 1.347 | cpu_optimizer "
            "| 0.70 | 0.85 |") in text
    # With the plain child present, it is the one measured.
    res["records"] = [variant, {**plain, "step_time_s": 1.0}]
    assert rep.derive(res)["per_batch"]["8"]["efficiency_child"] == "slideformer"
