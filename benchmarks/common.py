"""Timing and memory sampling for the benchmarks: the only module that reads a clock.

Every number the benchmarks report comes through here: whole-step wall time (device synchronised
around each step, ``time.perf_counter``), the median over N steps after a fixed warm-up, peak GPU
memory from the caching allocator, and peak host RSS from a psutil thread that samples every 50 ms.
A child process reports results as one JSON object per line, prefixed by ``RESULT_PREFIX``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

RESULT_PREFIX = "@@SLIDEFORMER_BENCH@@ "
"""Marks a result line on a child's stdout; everything else a child prints is log."""

GIB = 1 << 30


def engine_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--engine-opt``) as EngineConfig keyword arguments; values parsed as JSON when
    they are JSON (numbers, booleans, null), else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def apply_kernels(kernels: str, device: torch.device, model_type: str, model: Any = None,
                  layers: list[Any] | None = None, norms: list[Any] | None = None, config: Any = None) -> list[str]:
    """The step benchmark's ``--kernels`` on a baseline's HF modules: the same Liger patch as the engine's
    (``slideformer.kernels.liger``), on a whole causal LM (``model``) or on loose ``layers`` / ``norms``
    (the per-layer peak). 'torch' patches nothing; 'liger' where it cannot run raises its ConfigError."""
    if kernels == "torch":
        return []
    from slideformer.kernels import liger

    liger.resolve("liger", device, model_type)
    if model is not None:
        return liger.apply(model, model_type)
    done: list[str] = []
    for i, layer in enumerate(layers or []):
        done += liger.apply_to_layer(layer, model_type, config, f"layers.{i}.")
    for i, norm in enumerate(norms or []):
        done += liger.apply_to_norm(norm, f"norm.{i}")
    return done


def emit(record: dict[str, Any]) -> None:
    """Print one result record for the parent process (one line of JSON)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def parse_result_line(line: str) -> dict[str, Any] | None:
    """The record on a child's output line, or None when the line is log."""
    if not line.startswith(RESULT_PREFIX):
        return None
    return json.loads(line[len(RESULT_PREFIX) :])


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device; a bare 'cuda' becomes 'cuda:0' (several torch.cuda calls need the index)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cap_gpu_memory(device: torch.device, gib: float | None) -> int | None:
    """Limit this process's CUDA caching allocator to ``gib`` GiB; returns the cap in bytes."""
    if gib is None or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    cap = int(gib * GIB)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    return cap


def gpu_capacity_bytes(device: torch.device, cap_bytes: int | None) -> int:
    """Bytes this process may allocate on ``device``: the cap, else the card's (or, on CPU, host's) total."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = psutil.virtual_memory().total
    return min(total, cap_bytes) if cap_bytes else total


def reset_gpu_peaks(device: torch.device) -> None:
    """Start a new window for ``max_memory_allocated`` / ``max_memory_reserved``."""
    if device.type == "cuda":
        torch.cuda.init()  # resetting the stats of an allocator that never ran raises "Invalid device argument"
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peaks(device: torch.device) -> dict[str, int | None]:
    """Peak allocated and reserved bytes since the last reset, and the caching allocator's retries since the process
    started (None off the GPU). A retry is an allocation that failed under the cap and was repeated after the
    allocator freed its cached blocks (a device synchronisation each): near the cap they cost whole steps' worth."""
    if device.type != "cuda":
        return {"gpu_peak_allocated_bytes": None, "gpu_peak_reserved_bytes": None, "gpu_alloc_retries": None}
    return {
        "gpu_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "gpu_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        "gpu_alloc_retries": int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0)),
    }


class RssSampler:
    """Samples the resident set size of one process every ``interval_s`` in a daemon thread.

    ``peak_bytes`` is the largest sample since ``start`` or the last ``reset_peak``; the
    overall peak survives resets as ``max_bytes``.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.05) -> None:
        self._proc = psutil.Process(pid if pid is not None else os.getpid())
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.peak_bytes = 0
        self.max_bytes = 0
        self.last_bytes = 0

    def _sample(self) -> None:
        try:
            rss = self._proc.memory_info().rss
        except psutil.Error:  # the process is gone: keep the last samples
            return
        self.last_bytes = rss
        self.peak_bytes = max(self.peak_bytes, rss)
        self.max_bytes = max(self.max_bytes, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def start(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def reset_peak(self) -> None:
        """Start a new peak window at the current RSS."""
        self._sample()
        self.peak_bytes = self.last_bytes

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._sample()


class Stopwatch:
    """Wall time since construction (for setup phases that are reported, not benchmarked)."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0


@dataclass
class StepTimes:
    """Per-step wall times of the measured steps, plus the wall time of all of them and a drain."""

    times_s: list[float] = field(default_factory=list)
    total_s: float = 0.0
    """From the start of the first measured step to the end of ``drain`` after the last."""
    outputs: list[Any] = field(default_factory=list)
    call_s: list[float] = field(default_factory=list)
    """Wall seconds of each ``step()`` call alone: the main thread issuing the step, without the ``sync`` after it."""
    main_cpu_s: list[float] = field(default_factory=list)
    """CPU seconds the calling (main) thread spent in each ``step()`` call (``time.thread_time``: blocking waits not
    counted). Close to the step time, the main thread's issue rate bounds the step; the profiler cannot say this
    without slowing that thread."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_steps(
    step: Callable[[], Any],
    *,
    warmup: int,
    steps: int,
    sync: Callable[[], None],
    drain: Callable[[], None] | None = None,
) -> StepTimes:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step``.

    Each timed step spans from the end of the previous ``sync`` to the end of its own ``sync``, so
    work a step leaves running (a pipelined optimizer) is charged to the next one and nothing is
    lost between steps. ``drain`` (default: ``sync``) runs once after the last step and is counted
    in ``total_s`` only.
    """
    for _ in range(warmup):
        step()
        sync()
    out = StepTimes()
    sync()
    t_start = prev = time.perf_counter()
    for _ in range(steps):
        cpu0 = time.thread_time()
        out.outputs.append(step())
        out.main_cpu_s.append(time.thread_time() - cpu0)
        out.call_s.append(time.perf_counter() - prev)
        sync()
        now = time.perf_counter()
        out.times_s.append(now - prev)
        prev = now
    (drain or sync)()
    out.total_s = time.perf_counter() - t_start
    return out


def time_callable(fn: Callable[[], Any], *, iters: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median wall seconds of ``fn`` (synchronised before and after each call)."""
    return time_steps(fn, warmup=warmup, steps=iters, sync=sync).median_s


def host_available_bytes() -> int:
    """Host memory still available to new allocations (psutil's ``available``)."""
    return int(psutil.virtual_memory().available)
