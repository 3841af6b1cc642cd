"""``benchmarks/timeline_read.py``: the compute stream's gaps in a steady-state period, the AdamW units in each,
and ``profile_step``'s lanes keeping the uploaders' cast kernels out of compute."""

from __future__ import annotations

from tests.bench_modules import load


def _x(name: str, ts_ms: float, dur_ms: float, tid: int = 7, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts_ms * 1e3, "dur": dur_ms * 1e3, "tid": tid}


def _trace() -> dict:
    ann = "user_annotation"
    return {"traceEvents": [
        _x("sf/profiled_step", 0, 50, tid=1, cat=ann), _x("sf/next_step", 100, 50, tid=1, cat=ann),
        _x("gemm", -5, 25),  # the compute stream (most kernel time), clipped to the period: busy 0-20 ms
        _x("gemm", 30, 40),  # busy 30-70 ms; idle 20-30 and 70-100 ms
        _x("cast", 20, 10, tid=13), _x("cast", 75, 20, tid=13),  # an uploader's stream: not compute
        _x("sf/cpu_adamw/layers.3", 18, 4, tid=2, cat=ann), _x("sf/cpu_adamw/layers.3", 22.2, 4, tid=2, cat=ann),
        _x("sf/cpu_adamw/embed", 40, 5, tid=2, cat=ann),
        _x("sf/cpu_adamw", 80, 2, tid=2, cat=ann),  # an unnamed call (older traces)
        _x("sf/cpu_adamw/layers.3", 200, 1, tid=2, cat=ann),  # outside the period
        _x("sf/wait/MainThread: embedding gather", 69, 12, tid=1, cat=ann),  # 1 ms before the gap at 70
        _x("sf/wait/sf-upload: update of layers.3", 50, 5, tid=3, cat=ann),  # inside no gap
    ]}


def test_gaps_name_the_adamw_units_that_ran_in_them() -> None:
    out = load("timeline_read").read(_trace(), min_gap_ms=5)
    assert out["period_ms"] == 100 and out["compute_stream"] == 7
    assert out["compute_busy_ms"] == 60 and out["compute_idle_ms"] == 40
    assert out["compute_gaps"] == [
        {"at_ms": 20.0, "ms": 10.0, "adamw_units": ["layers.3"], "waits": [], "ended_by": "kernel on stream 13"},
        {"at_ms": 70.0, "ms": 30.0, "adamw_units": ["?"], "waits": ["MainThread: embedding gather (11.0 ms of it)"],
         "ended_by": "period end"}]
    assert out["idle_ended_by_ms"] == {"period end": 30.0, "kernel on stream 13": 10.0}
    # Back-to-back calls on one unit are one span; the next unit, or a pause, starts another.
    assert [(s["from_ms"], s["to_ms"], s["unit"]) for s in out["adamw_spans"]] == [
        (18.0, 26.2, "layers.3"), (40.0, 45.0, "embed"), (80.0, 82.0, "?")]
    assert [g["at_ms"] for g in load("timeline_read").read(_trace(), min_gap_ms=20)["compute_gaps"]] == [70.0]


def test_engine_waits_are_named_ranges_only_when_they_block() -> None:
    """``runtime.waits.result`` names a blocking wait ``sf/wait/<thread>: <what>``; a done future gets no range."""
    import threading
    from concurrent.futures import Future

    from torch.profiler import ProfilerActivity, profile

    from slideformer.runtime import waits

    done: Future = Future()
    done.set_result(1)
    later: Future = Future()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        threading.Timer(0.2, later.set_result, (2,)).start()  # set while the main thread waits
        assert waits.result(done, "a done future") == 1
        assert waits.result(later, "a slow future", timeout=5) == 2
    names = {e.name for e in prof.events() if e.name.startswith("sf/wait/")}
    assert names == {f"sf/wait/{threading.current_thread().name}: a slow future"}


def test_profile_lanes_keep_the_uploaders_casts_out_of_compute() -> None:
    ps = load("profile_step")
    t0, t1, lanes = ps.timeline(_trace(), "sf/profiled_step", "sf/next_step")
    assert (t0, t1) == (0.0, 100e3)
    assert lanes["compute"] == [(0.0, 20e3), (30e3, 70e3)]
    assert lanes["upload"] == [(20e3, 30e3), (75e3, 95e3)]
    assert [lane for lane, v in lanes.items() if v and lane == "cpu_adamw"] == ["cpu_adamw"]


def test_profile_lanes_draw_the_resident_updates_stream_apart() -> None:
    """The resident layers' norm and AdamW on their own stream (session 16) are a lane of their own, not upload work;
    the main thread's launch of their ``_fused_adamw_`` is not the CPU optimizer's."""
    ps = load("profile_step")
    trace = _trace()
    adam = "void multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>"
    trace["traceEvents"] += [
        _x(adam, 32, 3, tid=21), _x("reduce_kernel<NormTwoOps>", 31, 1, tid=21),  # the resident updates' stream
        _x("aten::_fused_adamw_", 31, 0.1, tid=1, cat="cpu_op"),  # its launch, on the main thread
    ]
    _, _, lanes = ps.timeline(trace, "sf/profiled_step", "sf/next_step")
    assert lanes["gpu_adamw"] == [(31e3, 35e3)]
    assert lanes["upload"] == [(20e3, 30e3), (75e3, 95e3)]
    assert (31e3, 31.1e3) not in lanes["cpu_adamw"]
    # A trace without that stream (every engine before session 16) draws nothing there.
    assert ps.timeline(_trace(), "sf/profiled_step", "sf/next_step")[2]["gpu_adamw"] == []


def _gpu_only_trace() -> dict:
    """What ``profile_step --threads none`` records: GPU work only, a marker kernel where each step was called."""
    mark = "void at::cuda::(anonymous namespace)::spin_kernel(long)"
    return {"traceEvents": [
        _x(mark, -30, 0.001), _x(mark, 0, 0.001), _x(mark, 100, 0.001),  # lead, profiled and next step
        _x("gemm", 0.001, 19.999),
        _x("Memcpy HtoD (Pinned -> Device)", 15, 9.99, tid=21, cat="gpu_memcpy"),  # ends 10 µs before the gemm
        _x("gemm", 25, 35),  # 20-25 ms: waited for the upload
        _x("Memcpy DtoH (Device -> Pinned)", 50, 5, tid=22, cat="gpu_memcpy"),  # ended long before the next gemm
        _x("gemm", 62, 30),  # 60-62 ms: nothing on another stream ended then: its kernel was issued late
        _x("gemm", 92.03, 7.97),  # a 30 µs launch gap: spacing, not counted
    ]}


def test_a_gpu_only_trace_takes_its_period_from_the_markers_and_names_what_each_gap_waited_for() -> None:
    tr = load("timeline_read")
    trace = _gpu_only_trace()
    assert tr.add_marker_steps(trace) is True and tr.add_marker_steps(trace) is False  # once
    out = tr.read(trace, min_gap_ms=1)
    assert out["period_ms"] == 100
    assert [(g["at_ms"], g["ms"], g["ended_by"]) for g in out["compute_gaps"]] == [
        (20.0, 5.0, "H2D copy"), (60.0, 2.0, "-")]
    assert out["idle_ended_by_ms"] == {"H2D copy": 5.0, "-": 2.0}
    assert abs(out["compute_idle_ms"] - 7.0) < 0.1  # (the 30 µs launch gap and the markers' own spacing included)
    # A trace with CPU ranges keeps them: no markers needed, none added.
    assert tr.add_marker_steps(_trace()) is False


def test_idle_time_by_gap_length_and_by_window() -> None:
    """Where the idle time sits (session 18's table): every idle stretch by length, and per 50 ms from the start."""
    out = load("timeline_read").read(_trace(), min_gap_ms=5)
    assert out["idle_by_gap_length"] == {"< 50 us": {"ms": 0.0, "count": 0}, "50 us - 1 ms": {"ms": 0.0, "count": 0},
                                         ">= 1 ms": {"ms": 40.0, "count": 2}}
    assert out["idle_per_window_ms"] == [10.0, 30.0]  # the gap at 20 ms in the first window, at 70 ms in the second
    tr = load("timeline_read")
    by_length, windows = tr.idle_profile([(0.0, 10.0), (60.0, 560.0), (50_100.0, 52_100.0)], 0.0)
    assert by_length == {"< 50 us": {"ms": 0.0, "count": 1}, "50 us - 1 ms": {"ms": 0.5, "count": 1},
                         ">= 1 ms": {"ms": 2.0, "count": 1}}
    assert windows == [0.5, 2.0]


def test_host_adamw_busy_time_and_its_idle_stretches() -> None:
    """Session 19's 8B read: the host without an AdamW call for 419 ms of the forward. Here: calls at 18-22, 22.2-26.2,
    40-45 and 80-82 ms of a 100 ms period (the one at 200 ms is outside it)."""
    out = load("timeline_read").read(_trace(), min_gap_ms=5)
    assert out["host_adamw_busy_ms"] == 15.0
    assert out["host_adamw_idle"] == [{"at_ms": 0.0, "ms": 18.0}, {"at_ms": 26.2, "ms": 13.8},
                                      {"at_ms": 45.0, "ms": 35.0}, {"at_ms": 82.0, "ms": 18.0}]
