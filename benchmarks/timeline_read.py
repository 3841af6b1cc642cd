"""Reading a ``profile_step.py`` trace: where the GPU's compute stream waits, and what the CPU AdamW did meanwhile.

    python benchmarks/timeline_read.py benchmarks/results/timeline_llama3.1-8b_b8_top_split_h100_202611.json.gz

Owns the questions asked of every timeline since session 5, by hand until session 7:
* the compute stream's idle gaps in the steady-state period, and
* for each gap, the AdamW calls that ran during it. The engine names them ``sf/cpu_adamw/<unit>`` since
  session 7 (``optim.adamw.adamw_range``); older traces say only ``sf/cpu_adamw``;
* for each gap, the blocking waits on worker futures that overlapped it: the engine's
  ``sf/wait/<thread>: <what>`` ranges (``runtime/waits.py``, session 8; older traces have none).

The compute stream is the one with the most kernel time: the uploaders' device-side casts run on their own
streams and are not compute.

Invariant: reads the trace only. Times are milliseconds from the period's start, the profiled step's start to
the next step's start (or the step range alone when there is no next one).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ADAMW = "sf/cpu_adamw"
WAIT = "sf/wait"


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


MERGE_US = 500.0
"""Consecutive AdamW calls on one unit less than this apart (µs) form one span; a longer pause splits it."""


def adamw_spans(events: list[dict[str, Any]], t0: float, t1: float) -> list[tuple[float, float, str]]:
    """AdamW calls in the period as (start, end, unit), back-to-back calls on one unit merged."""
    calls = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), str(e["name"])[len(ADAMW) + 1:] or "?")
                   for e in events if str(e.get("name", "")).startswith(ADAMW) and t0 <= float(e["ts"]) < t1)
    spans: list[tuple[float, float, str]] = []
    for start, end, unit in calls:
        if spans and spans[-1][2] == unit and start - spans[-1][1] < MERGE_US:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end), unit)
        else:
            spans.append((start, end, unit))
    return spans


def read(trace: dict[str, Any] | list[dict[str, Any]], step_name: str = "sf/profiled_step",
         next_name: str | None = "sf/next_step", min_gap_ms: float = 1.0) -> dict[str, Any]:
    """The compute stream's idle time and gaps, each with the AdamW units that ran during it."""
    events = _events(trace)
    t0, t1 = period(events, step_name, next_name)
    stream = compute_stream(events)
    busy = union([(max(float(e["ts"]), t0), min(float(e["ts"]) + float(e["dur"]), t1)) for e in events
                  if str(e.get("cat", "")).lower() == "kernel" and e.get("tid") == stream
                  and float(e["ts"]) < t1 and float(e["ts"]) + float(e["dur"]) > t0])
    spans = adamw_spans(events, t0, t1)
    waits = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), str(e["name"])[len(WAIT) + 1:]) for e in events
             if str(e.get("name", "")).startswith(WAIT + "/") and float(e["ts"]) < t1
             and float(e["ts"]) + float(e["dur"]) > t0]

    def ms(t: float) -> float:
        return round((t - t0) / 1e3, 1)

    rows = []
    for start, end in gaps(busy, t0, t1, min_gap_ms * 1e3):
        during = [u for s, e, u in spans if s < end and e > start]
        waiting = [f"{what} ({round((min(e, end) - max(s, start)) / 1e3, 1)} ms of it)"
                   for s, e, what in waits if s < end and e > start]
        rows.append({"at_ms": ms(start), "ms": round((end - start) / 1e3, 1), "adamw_units": during,
                     "waits": waiting})
    return {
        "period_ms": round((t1 - t0) / 1e3, 1),
        "compute_stream": stream,
        "compute_busy_ms": round(length(busy) / 1e3, 1),
        "compute_idle_ms": round((t1 - t0 - length(busy)) / 1e3, 1),
        "compute_gaps": rows,
        "adamw_spans": [{"from_ms": ms(s), "to_ms": ms(e), "unit": u} for s, e, u in spans],
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
    out = read(trace, next_name=None if args.drain else "sf/next_step", min_gap_ms=args.min_gap_ms)
    print(f"period {out['period_ms']} ms: compute busy {out['compute_busy_ms']} ms, idle {out['compute_idle_ms']} ms")
    for g in out["compute_gaps"]:
        print(f"  idle at {g['at_ms']:8.1f} ms for {g['ms']:6.1f} ms; AdamW on: {', '.join(g['adamw_units']) or '-'}")
        for w in g["waits"]:
            print(f"      waiting: {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
