"""``benchmarks/report.py``'s derived numbers: the roofline bound stays issue 3's three terms; the host-memory
traffic is an extra, informational figure with the bytes its markdown states."""

from __future__ import annotations

import pytest
from tests.bench_modules import load


def _results(upload_cast: str, step_s: float = 1.0) -> dict:
    report = {"host_updated_params": 2_000_000_000, "streamed_params": 2_500_000_000, "upload_cast": upload_cast}
    return {
        "shape": {"total_params": 3_000_000_000},
        "args": {"batch_sizes": [8]},
        "records": [{"system": "slideformer", "batch_size": 8, "status": "ok", "step_time_s": step_s,
                     "tokens_per_s": 8192 / step_s, "host_rss_peak_bytes": 40 << 30,
                     "engine_memory_report": report}],
        "roofline": {"gpu_compute": {"8": {"time_s": 0.5}},
                     "pcie": {"h2d_gbs": 50.0, "d2h_gbs": 50.0, "both_gbs": 90.0},
                     "cpu_adam_slideformer": {"gparam_s": 5.0}},
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
