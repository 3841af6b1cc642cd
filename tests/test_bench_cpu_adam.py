"""``benchmarks/bench_cpu_adam.py``: its JSON on the CPU, its argument checks, and (GPU) the copy load that
measures the optimizer while host<->GPU copies share the host's memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.bench_modules import load

bench = load("bench_cpu_adam")


def test_rows_and_best_rates(tmp_path: Path) -> None:
    out = tmp_path / "adam.json"
    assert bench.main(["--sizes", "4099", "--threads", "1", "--repeats", "2", "--no-pin",
                       "--variants", "torch_fused_fp32,fallback_bf16", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert {r["variant"] for r in rows} == {"torch_fused_fp32", "fallback_bf16"}
    assert all(r["dma"] == "none" and r["dma_gbps"] is None and r["gparam_s"] > 0 for r in rows)
    assert doc["best_gparam_s"]["fallback_bf16"] == max(r["gparam_s"] for r in rows if r["variant"] == "fallback_bf16")
    assert doc["best_gparam_s_dma"] == {}


@pytest.mark.parametrize("argv, message", [
    (["--dma", "sideways"], "unknown --dma mode 'sideways'"),
    (["--variants", "nope"], "unknown variant 'nope'"),
])
def test_bad_arguments_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--sizes", "16", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_copies_need_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "16", "--dma", "h2d"])
    assert "--dma with copies needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_copy_load_runs_and_is_counted(tmp_path: Path) -> None:
    out = tmp_path / "adam.json"
    assert bench.main(["--sizes", "1048576", "--threads", "2", "--repeats", "3", "--variants", "ext_bf16_nt",
                       "--dma", "none,h2d,both", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    by_mode = {r["dma"]: r for r in rows}
    assert set(by_mode) == {"none", "h2d", "both"}
    assert by_mode["none"]["dma_gbps"] is None
    assert by_mode["h2d"]["dma_gbps"] > 1.0 and by_mode["both"]["dma_gbps"] > 1.0
