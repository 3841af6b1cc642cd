"""``benchmarks/common.time_steps``: each step's wall time, the wall time of the ``step()`` call alone, and the CPU
time the main thread spent issuing it (the measure of a main-thread-bound step that needs no profiler)."""

from __future__ import annotations

import time

import pytest
from tests.bench_modules import load


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_main_threads_cpu_time_is_told_from_waiting() -> None:
    common = load("common")
    # A step that computes 30 ms on the calling thread, then waits 40 ms (a future, a device), then a 20 ms sync.
    out = common.time_steps(lambda: (_spin(0.03), time.sleep(0.04)), warmup=0, steps=3, sync=lambda: time.sleep(0.02))
    assert len(out.times_s) == len(out.call_s) == len(out.main_cpu_s) == 3
    for wall, call, cpu in zip(out.times_s, out.call_s, out.main_cpu_s, strict=True):
        assert cpu == pytest.approx(0.03, abs=0.01)  # the waits are not the thread's CPU time
        assert call == pytest.approx(0.07, abs=0.02) and wall == pytest.approx(0.09, abs=0.025)
        assert cpu < call < wall


def test_the_report_shows_the_main_threads_share() -> None:
    report = load("report_md")
    rec = {"system": "slideformer", "batch_size": 8, "status": "ok", "step_time_s": 0.4,
           "step_call_times_s": [0.30, 0.32, 0.31], "step_main_thread_cpu_s": [0.10, 0.30, 0.20]}
    lines = report.main_thread_lines({"records": [rec, {**rec, "system": "zero2", "step_main_thread_cpu_s": []}]})
    assert lines[-1] == "| 8 | slideformer | 0.400 | 0.310 | 0.200 | 50% |"
    assert len(lines) == 6  # (a record without the field, as before session 16, gets no row)
    assert report.main_thread_lines({"records": [{**rec, "step_main_thread_cpu_s": None}]}) == []
