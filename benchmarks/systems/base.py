"""What every benchmarked system provides, and the one driver that measures them all alike.

A system is built once per child process (``make(spec)``), then for each batch size it hands the
driver a zero-argument ``step`` closure that runs one full training step (forward, backward,
optimizer update). The driver owns warm-up, timing, memory peaks and error capture, so the systems
differ only in what their step does.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import common
import host_vmstat
import shapes


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark invocation, as every child process sees it."""

    model: str
    """A key of ``shapes.CONFIGS``."""
    batch_sizes: tuple[int, ...]
    seq_len: int
    steps: int = 5
    """Measured steps per batch size (the median is reported)."""
    warmup: int = 2
    device: str = "cuda"
    gpu_memory_gib: float | None = None
    """Cap on this process's GPU allocator (every system alike)."""
    seed: int = 0
    lr: float = 1e-5
    window: int = 2
    """slideformer: decoder-layer slots on the GPU."""
    engine_options: dict[str, Any] = field(default_factory=dict)
    """slideformer: extra ``EngineConfig`` fields (``--engine-opt key=value``)."""
    kernels: str = "torch"
    """Decoder-layer kernels of EVERY system alike: 'torch' (HF's modules) or 'liger' (Liger-Kernel's
    RMSNorm / SwiGLU / RoPE on the model instance, ``slideformer.kernels.liger``; ``common.apply_kernels``)."""

    @property
    def torch_device(self) -> torch.device:
        """The device, with an explicit index on CUDA (``set_device`` and the memory cap require one)."""
        return common.resolve_device(self.device)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchSpec:
        raw = json.loads(text)
        raw["batch_sizes"] = tuple(raw["batch_sizes"])
        return cls(**raw)


StepFn = Callable[[], Any]


class BenchSystem:
    """Base of the benchmarked systems; subclasses implement ``prepare`` and may refine the rest."""

    mode: str = "unknown"
    """What actually runs (e.g. ``resident`` or ``peak`` for the resident system)."""

    def __init__(self, spec: BenchSpec) -> None:
        self.spec = spec
        self.device = spec.torch_device

    def prepare(self, batch_size: int) -> StepFn:
        """A closure running one training step on a fixed random batch of ``batch_size``."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until the step's GPU work is done (called after every step)."""
        common.synchronize(self.device)

    def drain(self) -> None:
        """Wait until all work of the step, CPU included, is done (called after the last step)."""
        self.sync()

    def info(self) -> dict[str, Any]:
        """Extra fields for the record (pinned bytes, configuration, engine reports)."""
        return {}

    def close(self) -> None:
        """Release what the system holds (the child exits right after, so this may do nothing)."""


def is_oom(exc: BaseException) -> bool:
    """True for GPU allocator (or host allocator) out-of-memory errors."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "cuda error: out of memory" in text


def error_text(exc: BaseException, limit: int = 1500) -> str:
    """``Type: message`` plus the innermost frames of the traceback, bounded in size."""
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(frames[-4:])
    head = f"{type(exc).__name__}: {exc}"
    text = head if head in tail else head + "\n" + tail
    return text if len(text) <= limit else text[: limit // 3] + "\n...\n" + text[-(2 * limit) // 3 :]


def _loss_value(out: Any) -> float | None:
    loss = getattr(out, "loss", out)
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().item())
    if isinstance(loss, int | float):
        return float(loss)
    return None


def drive(system_name: str, spec: BenchSpec, make: Callable[[BenchSpec], BenchSystem]) -> None:
    """Build the system, measure it at every batch size, and ``emit`` one record per batch size."""
    device = spec.torch_device
    cap = common.cap_gpu_memory(device, spec.gpu_memory_gib)
    stats = shapes.shape_stats(spec.model)
    rss = common.RssSampler().start()
    base = {"system": system_name, "model": spec.model, "seq_len": spec.seq_len, "gpu_cap_bytes": cap,
            "kernels": spec.kernels}

    def record(batch_size: int, **fields: Any) -> dict[str, Any]:
        return {**base, "batch_size": batch_size, "tokens_per_step": batch_size * spec.seq_len, **fields}

    baseline_rss = rss.last_bytes
    common.reset_gpu_peaks(device)
    clock = common.Stopwatch()
    try:
        system = make(spec)
    except Exception as exc:  # a system that cannot even start is a result, not a crash
        text = error_text(exc)
        for b in spec.batch_sizes:
            common.emit(
                record(
                    b,
                    status="error",
                    phase="setup",
                    error=text,
                    oom=is_oom(exc),
                    host_rss_peak_bytes=rss.max_bytes,
                    **common.gpu_peaks(device),
                )
            )
        rss.stop()
        return
    setup_s = clock.elapsed()
    setup_gpu = common.gpu_peaks(device)
    setup_rss = rss.max_bytes

    oom_at: int | None = None
    for b in spec.batch_sizes:
        if oom_at is not None and b >= oom_at:
            common.emit(
                record(
                    b,
                    status="skipped",
                    mode=system.mode,
                    error=f"skipped: out of memory at batch size {oom_at}",
                )
            )
            continue
        common.reset_gpu_peaks(device)
        rss.reset_peak()
        try:
            step = system.prepare(b)
            vm0 = host_vmstat.read()
            times = common.time_steps(step, warmup=spec.warmup, steps=spec.steps, sync=system.sync, drain=system.drain)
            vm_steps = host_vmstat.delta(vm0, host_vmstat.read())
        except Exception as exc:
            oom = is_oom(exc)
            if oom:
                oom_at = b
            common.emit(
                record(
                    b,
                    status="error",
                    phase="step",
                    mode=system.mode,
                    error=error_text(exc),
                    oom=oom,
                    host_rss_peak_bytes=max(setup_rss, rss.peak_bytes),
                    **common.gpu_peaks(device),
                )
            )
            step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        peaks = common.gpu_peaks(device)
        tokens = b * spec.seq_len
        median = times.median_s
        tps = tokens / median
        common.emit(
            record(
                b,
                status="ok",
                mode=system.mode,
                step_time_s=median,
                step_times_s=times.times_s,
                step_call_times_s=times.call_s,
                step_main_thread_cpu_s=times.main_cpu_s,
                mean_step_time_with_drain_s=times.total_s / spec.steps,
                tokens_per_s=tps,
                model_tflops=stats.flops_per_token(spec.seq_len) * tps / 1e12,
                losses=[_loss_value(o) for o in times.outputs],
                gpu_peak_allocated_bytes=_max_or_none(
                    peaks["gpu_peak_allocated_bytes"], setup_gpu["gpu_peak_allocated_bytes"]
                ),
                gpu_peak_reserved_bytes=_max_or_none(
                    peaks["gpu_peak_reserved_bytes"], setup_gpu["gpu_peak_reserved_bytes"]
                ),
                gpu_step_peak_allocated_bytes=peaks["gpu_peak_allocated_bytes"],
                gpu_setup_peak_allocated_bytes=setup_gpu["gpu_peak_allocated_bytes"],
                gpu_alloc_retries=peaks["gpu_alloc_retries"],
                gpu_alloc_retries_after_setup=_minus_or_none(peaks["gpu_alloc_retries"],
                                                             setup_gpu["gpu_alloc_retries"]),
                host_rss_peak_bytes=max(setup_rss, rss.peak_bytes),
                host_rss_baseline_bytes=baseline_rss,
                host_vmstat_steps=vm_steps,
                setup_time_s=setup_s,
                **system.info(),
            )
        )
        del step
    system.close()
    rss.stop()


def _minus_or_none(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


def _max_or_none(a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return a if b is None else b
    return max(a, b)
