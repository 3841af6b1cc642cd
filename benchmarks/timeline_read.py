"""Reading a ``profile_step.py`` trace: where the GPU's compute stream waits, and what the CPU AdamW did meanwhile.

    python benchmarks/timeline_read.py benchmarks/results/timeline_llama3.2-3b_b8_cap24_s17gpu_h100_202611.json.gz

Owns the questions asked of every timeline since session 5, by hand until session 7:
* the compute stream's idle gaps in the steady-state period, and
* for each gap, the AdamW calls that ran during it. The engine names them ``sf/cpu_adamw/<unit>`` since
  session 7 (``optim.adamw.adamw_range``); older traces say only ``sf/cpu_adamw``;
* for each gap, the blocking waits on worker futures that overlapped it: the engine's
  ``sf/wait/<thread>: <what>`` ranges (``runtime/waits.py``, session 8; older traces have none).

The compute stream is the one with the most kernel time: the uploaders' device-side casts run on their own
streams and are not compute.

A trace taken with ``--threads none`` has no CPU ranges: its steps come from GPU-side marker kernels
(``add_marker_steps``), and each gap says what ended it: a copy or kernel on another stream that finished just before
the compute stream went on (it was waiting for it), or nothing (it was waiting for its next kernel to be issued).

Invariant: reads the trace only (``add_marker_steps`` adds the step ranges the markers stand for). Times are
milliseconds from the period's start, the profiled step's start to the next step's start (or the step range alone
when there is no next one).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ADAMW = "sf/cpu_adamw"
WAIT = "sf/wait"
MARKER = "spin_kernel"
"""``torch.cuda._sleep``'s kernel: ``profile_step --threads none`` queues one on the compute stream as each step is
called, the steps' GPU-side starts in a trace that has no CPU ranges."""
ENDED_BY_US = 20.0
"""A compute-stream gap counts as ended by another stream's work (a copy it waited for) when that work ended at most
this long (µs) before the compute stream went on."""
CAUSE_MIN_US = 50.0
"""Gaps shorter than this (µs) are launch spacing, not waits: left out of the causes' totals."""


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, merged intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _events(trace: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def compute_stream(events: list[dict[str, Any]]) -> Any:
    """The ``tid`` of the stream with the most kernel time (None without kernels)."""
    busy: dict[Any, float] = defaultdict(float)
    for e in events:
        if str(e.get("cat", "")).lower() == "kernel":
            busy[e.get("tid")] += float(e["dur"])
    return max(busy, key=busy.__getitem__) if busy else None


def period(events: list[dict[str, Any]], step_name: str, next_name: str | None) -> tuple[float, float]:
    """(start, end) in µs: the step's start to the next step's start, or the step range itself."""
    step = [e for e in events if e.get("name") == step_name]
    if not step:
        raise ValueError(f"no {step_name!r} range in the trace")
    t0 = float(step[0]["ts"])
    nxt = [e for e in events if e.get("name") == next_name] if next_name else []
    return t0, float(nxt[0]["ts"]) if nxt else t0 + float(step[0]["dur"])


def add_marker_steps(trace: dict[str, Any] | list[dict[str, Any]], step_name: str = "sf/profiled_step",
                     next_name: str | None = "sf/next_step") -> bool:
    """A trace without CPU ranges (``profile_step --threads none``): give it the step ranges, from the second and
    third of its ``MARKER`` kernels (lead step, profiled step, next step). False when it has ranges or no markers."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    if any(e.get("name") == step_name for e in events):
        return False
    marks = sorted((e for e in events if e.get("ph") == "X" and str(e.get("cat", "")).lower() == "kernel"
                    and MARKER in str(e.get("name", ""))), key=lambda e: float(e["ts"]))
    if len(marks) < 2:
        return False
    lead = 1 if len(marks) >= 3 else 0  # the first marks the lead step when there is one
    t0, t1 = float(marks[lead]["ts"]), float(marks[lead + 1]["ts"]) if len(marks) > lead + 1 else None
    tid = marks[lead].get("tid")
    if t1 is None or next_name is None:
        end = t1 if t1 is not None else max(float(e["ts"]) + float(e.get("dur", 0)) for e in events if "ts" in e)
        events.append({"ph": "X", "cat": "gpu_step_mark", "name": step_name, "ts": t0, "dur": end - t0, "tid": tid})
        return True
    events.append({"ph": "X", "cat": "gpu_step_mark", "name": step_name, "ts": t0, "dur": t1 - t0, "tid": tid})
    events.append({"ph": "X", "cat": "gpu_step_mark", "name": next_name, "ts": t1, "dur": 1.0, "tid": tid})
    return True


def other_streams_work(events: list[dict[str, Any]], stream: Any) -> list[tuple[float, str]]:
    """(end in µs, what) of the GPU work on streams other than ``stream``: copies by direction, kernels by stream."""
    out = []
    for e in events:
        cat = str(e.get("cat", "")).lower()
        if e.get("tid") == stream or cat not in ("kernel", "gpu_memcpy"):
            continue
        low = str(e.get("name", "")).lower()
        what = ("H2D copy" if "htod" in low else "D2H copy" if "dtoh" in low else "copy") if cat == "gpu_memcpy" \
            else f"kernel on stream {e.get('tid')}"
        out.append((float(e["ts"]) + float(e["dur"]), what))
    return sorted(out)


def ended_by(work: list[tuple[float, str]], t: float) -> str:
    """What another stream finished just before the compute stream went on at ``t`` (``ENDED_BY_US``), or '-': the
    compute stream waited for no GPU work, i.e. for its next kernel to be issued."""
    i = bisect.bisect_right(work, t + 2.0, key=lambda w: w[0])  # (a hair after t: clock skew between engines)
    if i and work[i - 1][0] >= t - ENDED_BY_US:
        return work[i - 1][1]
    return "-"


def gaps(busy: list[tuple[float, float]], t0: float, t1: float, min_us: float) -> list[tuple[float, float]]:
    """Idle (start, end) stretches of at least ``min_us`` between merged ``busy`` intervals, inside [t0, t1)."""
    out, at = [], t0
    for start, end in busy:
        if start - at >= min_us:
            out.append((at, min(start, t1)))
        at = max(at, end)
        if at >= t1:
            break
    if t1 - at >= min_us:
        out.append((at, t1))
    return out


LENGTH_BINS_US = (50.0, 1000.0)
"""Edges (µs) of ``idle_by_gap_length``: launch spacing (< 50 µs), short waits, waits over a millisecond."""
WINDOW_US = 50_000.0
"""Width (µs) of ``idle_per_window_ms``'s windows from the period's start: where in the step the idle time sits."""


def idle_profile(idle: list[tuple[float, float]], t0: float) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Every idle stretch of the period (``gaps`` with no minimum) by length: ms and count per bin; and the idle ms in
    each ``WINDOW_US`` window, a stretch counted in the window where it starts."""
    lo, hi = LENGTH_BINS_US
    names = (f"< {lo:g} us", f"{lo:g} us - {hi / 1e3:g} ms", f">= {hi / 1e3:g} ms")
    bins = {n: {"ms": 0.0, "count": 0} for n in names}
    windows: list[float] = []
    for start, end in idle:
        d = end - start
        if d <= 0:
            continue  # kernels back to back (``gaps`` with no minimum keeps them)
        b = bins[names[0] if d < lo else names[1] if d < hi else names[2]]
        b["ms"] += d / 1e3
        b["count"] += 1
        w = int((start - t0) // WINDOW_US)
        windows.extend([0.0] * (w + 1 - len(windows)))
        windows[w] += d / 1e3
    return ({n: {"ms": round(b["ms"], 1), "count": b["count"]} for n, b in bins.items()},
            [round(x, 1) for x in windows])


MERGE_US = 500.0
"""Consecutive AdamW calls on one unit less than this apart (µs) form one span; a longer pause splits it."""


def adamw_calls(events: list[dict[str, Any]], t0: float, t1: float) -> list[tuple[float, float, str]]:
    """The host AdamW calls that overlap the period, clipped to it, as sorted (start, end, unit)."""
    return sorted((max(float(e["ts"]), t0), min(float(e["ts"]) + float(e["dur"]), t1),
                   str(e["name"])[len(ADAMW) + 1:] or "?")
                  for e in events if str(e.get("name", "")).startswith(ADAMW) and float(e["ts"]) < t1
                  and float(e["ts"]) + float(e["dur"]) > t0)


def adamw_spans(calls: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """``adamw_calls`` with back-to-back calls on one unit merged."""
    spans: list[tuple[float, float, str]] = []
    for start, end, unit in calls:
        if spans and spans[-1][2] == unit and start - spans[-1][1] < MERGE_US:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end), unit)
        else:
            spans.append((start, end, unit))
    return spans


HOST_IDLE_MIN_US = 5_000.0
"""Shortest stretch (µs) without any host AdamW call that ``host_adamw_idle`` lists."""


def host_adamw_idle(calls: list[tuple[float, float, str]], t0: float,
                    t1: float) -> tuple[float, list[tuple[float, float]]]:
    """The host AdamW's busy µs in the period (the union of its ``adamw_calls``, every thread's), and the (start, end)
    stretches of at least ``HOST_IDLE_MIN_US`` with no call: where a host-bound step leaves its host idle."""
    busy = union([(s, e) for s, e, _ in calls])
    return length(busy), gaps(busy, t0, t1, HOST_IDLE_MIN_US)


def read(trace: dict[str, Any] | list[dict[str, Any]], step_name: str = "sf/profiled_step",
         next_name: str | None = "sf/next_step", min_gap_ms: float = 1.0) -> dict[str, Any]:
    """The compute stream's idle time and gaps, each with the AdamW units that ran during it."""
    events = _events(trace)
    t0, t1 = period(events, step_name, next_name)
    stream = compute_stream(events)
    busy = union([(max(float(e["ts"]), t0), min(float(e["ts"]) + float(e["dur"]), t1)) for e in events
                  if str(e.get("cat", "")).lower() == "kernel" and e.get("tid") == stream
                  and float(e["ts"]) < t1 and float(e["ts"]) + float(e["dur"]) > t0])
    calls = adamw_calls(events, t0, t1)
    spans = adamw_spans(calls)
    waits = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), str(e["name"])[len(WAIT) + 1:]) for e in events
             if str(e.get("name", "")).startswith(WAIT + "/") and float(e["ts"]) < t1
             and float(e["ts"]) + float(e["dur"]) > t0]

    def ms(t: float) -> float:
        return round((t - t0) / 1e3, 1)

    work = other_streams_work(events, stream)
    causes: dict[str, float] = defaultdict(float)
    for start, end in gaps(busy, t0, t1, CAUSE_MIN_US):
        causes[ended_by(work, end) if end < t1 else "period end"] += end - start
    by_length, per_window = idle_profile(gaps(busy, t0, t1, 0.0), t0)
    host_busy, host_idle = host_adamw_idle(calls, t0, t1)
    rows = []
    for start, end in gaps(busy, t0, t1, min_gap_ms * 1e3):
        during = [u for s, e, u in spans if s < end and e > start]
        waiting = [f"{what} ({round((min(e, end) - max(s, start)) / 1e3, 1)} ms of it)"
                   for s, e, what in waits if s < end and e > start]
        rows.append({"at_ms": ms(start), "ms": round((end - start) / 1e3, 1), "adamw_units": during,
                     "waits": waiting, "ended_by": ended_by(work, end) if end < t1 else "period end"})
    return {
        "period_ms": round((t1 - t0) / 1e3, 1),
        "compute_stream": stream,
        "compute_busy_ms": round(length(busy) / 1e3, 1),
        "compute_idle_ms": round((t1 - t0 - length(busy)) / 1e3, 1),
        "compute_gaps": rows,
        "idle_ended_by_ms": {k: round(v / 1e3, 1) for k, v in sorted(causes.items(), key=lambda kv: -kv[1])},
        "idle_by_gap_length": by_length,
        "idle_per_window_ms": per_window,
        "adamw_spans": [{"from_ms": ms(s), "to_ms": ms(e), "unit": u} for s, e, u in spans],
        "host_adamw_busy_ms": round(host_busy / 1e3, 1),
        "host_adamw_idle": [{"at_ms": ms(s), "ms": round((e - s) / 1e3, 1)} for s, e in host_idle],
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path, help="a profile_step trace (.json or .json.gz)")
    p.add_argument("--min-gap-ms", type=float, default=1.0)
    p.add_argument("--drain", action="store_true", help="the trace is a --drain profile (no next step)")
    args = p.parse_args(argv)
    opener = gzip.open if args.trace.suffix == ".gz" else open
    with opener(args.trace, "rt") as f:
        trace = json.load(f)
    next_name = None if args.drain else "sf/next_step"
    add_marker_steps(trace, next_name=next_name)
    out = read(trace, next_name=next_name, min_gap_ms=args.min_gap_ms)
    print(f"period {out['period_ms']} ms: compute busy {out['compute_busy_ms']} ms, idle {out['compute_idle_ms']} ms")
    print("  idle in gaps over 50 us, by what the compute stream went on after: "
          + ", ".join(f"{k} {v} ms" for k, v in out["idle_ended_by_ms"].items()))
    print("  idle by gap length: " + ", ".join(f"{k} {v['ms']} ms ({v['count']})"
                                               for k, v in out["idle_by_gap_length"].items()))
    print(f"  idle per {WINDOW_US / 1e3:g} ms from the start: {out['idle_per_window_ms']}")
    if out["adamw_spans"]:
        print(f"host AdamW busy {out['host_adamw_busy_ms']} ms; without a call for {HOST_IDLE_MIN_US / 1e3:g} ms or "
              "more: " + (", ".join(f"at {g['at_ms']} ms for {g['ms']} ms" for g in out["host_adamw_idle"]) or "never"))
    for g in out["compute_gaps"]:
        print(f"  idle at {g['at_ms']:8.1f} ms for {g['ms']:6.1f} ms (ended by {g['ended_by']}); "
              f"AdamW on: {', '.join(g['adamw_units']) or '-'}")
        for w in g["waits"]:
            print(f"      waiting: {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
