"""The roofline terms of a run, measured on the same machine in their own child process.

- GPU compute: the no-offload per-layer peak step (``systems.peak``) at each batch size, seconds.
- CPU optimizer: Gparam/s of ``torch._fused_adamw_`` on FP32 p/g/m/v buffers sized like one decoder
  layer, at ``threads`` intra-op threads; and of ``slideformer.optim.cpu_adam.adamw_step`` (BF16
  gradient in, BF16 upload copy out) when the package has it.
- PCIe: pinned host<->device GB/s over 256 MiB buffers: H2D alone, D2H alone, and both at once on
  two streams.
``report.py`` turns rates into times with the bytes and parameters the engine moves and updates.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

import common
import shapes
from systems.base import BenchSpec, error_text
from systems.peak import PeakModel

PCIE_BUFFER_BYTES = 256 << 20
MIN_ADAM_PARAMS = 1 << 22
"""Smallest buffer for the CPU optimizer measure (tiny shapes would otherwise sit in cache)."""


def measure_gpu_compute(spec: BenchSpec) -> dict[str, Any]:
    """Median seconds of the per-layer peak step at each batch size."""
    device = spec.torch_device
    stats = shapes.shape_stats(spec.model)
    peak = PeakModel(spec.model, device, kernels=spec.kernels)
    out: dict[str, Any] = {}
    for b in spec.batch_sizes:
        try:
            batch = shapes.random_batch(b, spec.seq_len, peak.vocab_size, device=device, seed=spec.seed)
            times = common.time_steps(
                lambda batch=batch: peak.step(batch),
                warmup=spec.warmup,
                steps=spec.steps,
                sync=lambda: common.synchronize(device),
            )
            t = times.median_s
            tps = b * spec.seq_len / t
            out[str(b)] = {
                "time_s": t,
                "times_s": times.times_s,
                "tokens_per_s": tps,
                "model_tflops": stats.flops_per_token(spec.seq_len) * tps / 1e12,
            }
        except Exception as exc:
            out[str(b)] = {"error": error_text(exc)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def measure_pcie(device: torch.device, nbytes: int = PCIE_BUFFER_BYTES, iters: int = 10) -> dict[str, Any]:
    """Pinned H2D, D2H and simultaneous both-ways bandwidth in GB/s (1e9 bytes/s)."""
    if device.type != "cuda":
        return {"error": "no GPU: PCIe not measured"}
    host_a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host_b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev_a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev_b = torch.empty(nbytes, dtype=torch.uint8, device=device)
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def sync() -> None:
        torch.cuda.synchronize(device)

    def h2d() -> None:
        with torch.cuda.stream(up):
            dev_a.copy_(host_a, non_blocking=True)

    def d2h() -> None:
        with torch.cuda.stream(down):
            host_b.copy_(dev_b, non_blocking=True)

    def both() -> None:
        h2d()
        d2h()

    t_up = common.time_callable(h2d, iters=iters, warmup=2, sync=sync)
    t_down = common.time_callable(d2h, iters=iters, warmup=2, sync=sync)
    t_both = common.time_callable(both, iters=iters, warmup=2, sync=sync)
    return {
        "buffer_bytes": nbytes,
        "h2d_gbs": nbytes / t_up / 1e9,
        "d2h_gbs": nbytes / t_down / 1e9,
        "both_gbs": 2 * nbytes / t_both / 1e9,
    }


def measure_torch_adamw(n: int, threads: int, iters: int = 5) -> dict[str, Any]:
    """``torch._fused_adamw_`` over one FP32 layer-sized buffer set: Gparam/s."""
    p = torch.randn(n)
    g = torch.randn(n)
    m = torch.zeros(n)
    v = torch.zeros(n)
    step = torch.zeros((), dtype=torch.float32)

    def run() -> None:
        step.add_(1)
        torch._fused_adamw_(
            [p],
            [g],
            [m],
            [v],
            [],
            [step],
            lr=1e-5,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.0,
            eps=1e-8,
            amsgrad=False,
            maximize=False,
        )

    t = common.time_callable(run, iters=iters, warmup=1, sync=lambda: None)
    return {
        "params": n,
        "threads": threads,
        "time_s": t,
        "gparam_s": n / t / 1e9,
        "what": "torch._fused_adamw_, fp32 p/g/m/v (no casts)",
    }


def measure_slideformer_adamw(n: int, threads: int, iters: int = 5) -> dict[str, Any]:
    """``slideformer.optim.cpu_adam.adamw_step`` (BF16 grad in, BF16 copy out): Gparam/s, if it exists."""
    try:
        from slideformer.optim import cpu_adam
    except Exception as exc:
        return {"error": f"slideformer.optim.cpu_adam not importable: {error_text(exc, 300)}"}
    fn = getattr(cpu_adam, "adamw_step", None)
    if fn is None:
        return {"error": "slideformer.optim.cpu_adam has no adamw_step"}
    p = torch.randn(n)
    grad = torch.randn(n).to(torch.bfloat16)
    m = torch.zeros(n)
    v = torch.zeros(n)
    out16 = torch.empty(n, dtype=torch.bfloat16)
    state = {"step": 0}

    def run() -> None:
        state["step"] += 1
        fn(
            p,
            grad,
            m,
            v,
            step=state["step"],
            lr=1e-5,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            out=out16,
            num_threads=threads,
            stream_out=True,  # as the engine writes the copy (optim/adamw.py), since session 6
        )

    try:
        t = common.time_callable(run, iters=iters, warmup=1, sync=lambda: None)
    except Exception as exc:
        return {"error": error_text(exc, 600), "signature": str(inspect.signature(fn))}
    return {
        "params": n,
        "threads": threads,
        "time_s": t,
        "gparam_s": n / t / 1e9,
        "what": "slideformer adamw_step, bf16 grad in, bf16 copy out (non-temporal stores)",
    }


def run(spec: BenchSpec, threads: int) -> dict[str, Any]:
    """All roofline terms; each section records its own error instead of failing the rest."""
    device = spec.torch_device
    common.cap_gpu_memory(device, spec.gpu_memory_gib)
    stats = shapes.shape_stats(spec.model)
    out: dict[str, Any] = {"kind": "roofline", "model": spec.model, "seq_len": spec.seq_len}
    try:
        out["gpu_compute"] = measure_gpu_compute(spec)
    except Exception as exc:
        out["gpu_compute"] = {"error": error_text(exc)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        out["pcie"] = measure_pcie(device)
    except Exception as exc:
        out["pcie"] = {"error": error_text(exc)}
    torch.set_num_threads(threads)
    n = max(stats.layer_params, MIN_ADAM_PARAMS)
    try:
        out["cpu_adam_torch"] = measure_torch_adamw(n, threads)
    except Exception as exc:
        out["cpu_adam_torch"] = {"error": error_text(exc)}
    out["cpu_adam_slideformer"] = measure_slideformer_adamw(n, threads)
    out["cpu_threads"] = threads
    out["cpu_count"] = os.cpu_count()
    return out
