"""Micro-benchmark of the host AdamW step (issue 3, target 6: >= 3 Gparam/s, BF16 grads in, BF16 copy out).

Times, on flat buffers the size of one Llama-3.1-8B decoder layer (218,112,000 parameters) and at
several thread counts, in the same process:

* ``torch_fused_fp32``: ``torch._fused_adamw_`` on FP32 param/grad/moments (torch's best CPU AdamW;
  it rejects BF16 gradients and writes no BF16 copy).
* ``fallback_bf16``: slideformer's pure-torch fallback: BF16 grad -> FP32 scratch, the fused step,
  FP32 -> BF16 copy (three passes).
* ``ext_bf16``: the C++ kernel, BF16 grad in and BF16 copy out in one pass.
* ``ext_bf16_nt``: the same with non-temporal stores for the copy (``stream_out=True``).
* ``ext_fp32``: the C++ kernel on FP32 grads without a copy (the same work as ``torch_fused_fp32``).
* ``copy_fp32``: ``dst.copy_(src)`` of FP32 buffers, the machine's streaming bandwidth for reference.

Gparam/s is parameters / median time; GB/s is that times the bytes one ideal pass must move
(28 per parameter for the AdamW variants: read p, m, v, g; write p, m, v and the copy; 8 for copy).

``--dma h2d,d2h,both`` (CUDA only) repeats every cell while a background thread keeps pinned-host <-> GPU
copies running (256 MiB buffers, back to back), the traffic the engine's uploads and gradient downloads put
on the same host memory while its optimizer runs; each row then records the copies' GB/s during that cell.

    python benchmarks/bench_cpu_adam.py --out benchmarks/results/cpu_adam.json
    python benchmarks/bench_cpu_adam.py --sizes 16777216 --threads 1,2 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slideformer.optim import cpu_adam

LLAMA8B_LAYER = 218_112_000  # q, k, v, o + gate, up, down + 2 RMSNorm weights of Llama-3.1-8B
VARIANTS = ("torch_fused_fp32", "fallback_bf16", "ext_bf16", "ext_bf16_nt", "ext_fp32", "copy_fp32")
IDEAL_BYTES = {"copy_fp32": 8}  # 28 for every AdamW variant
HP = {"lr": 1e-5, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _default_threads() -> list[int]:
    cores = os.cpu_count() or 1
    ts = {1, torch.get_num_threads(), cores}
    t = 2
    while t < cores:
        ts.add(t)
        t *= 2
    return sorted(x for x in ts if x <= cores)


class Buffers:
    """One layer's host state plus the extra buffers the variants need, allocated and touched once."""

    def __init__(self, n: int, pin: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        self.p = torch.randn(n, generator=gen) * 0.02
        self.m = torch.zeros(n)
        self.v = torch.zeros(n)
        self.g32 = torch.randn(n, generator=gen) * 1e-3
        self.g16 = self.g32.to(torch.bfloat16)
        self.out = torch.empty(n, dtype=torch.bfloat16, pin_memory=pin).fill_(0)
        self.scratch = torch.zeros(n)
        self.step = 0

    def next_step(self) -> int:
        self.step += 1
        return self.step


DMA_MODES = ("none", "h2d", "d2h", "both")


class DmaLoad:
    """Back-to-back pinned-host <-> GPU copies on side streams, from a background thread, while a cell runs.

    Each direction has its own stream and 256 MiB buffers; the thread queues one copy per direction and then
    waits for them (the wait releases the GIL), so the link stays busy and the queue stays one copy deep.
    """

    def __init__(self, mode: str, mib: int = 256) -> None:
        n = mib * 2**20
        self.mode = mode
        self.dirs = [d for d in ("h2d", "d2h") if mode in (d, "both")]
        self.host = {d: torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1) for d in self.dirs}
        self.dev = {d: torch.empty(n, dtype=torch.uint8, device="cuda").fill_(2) for d in self.dirs}
        self.streams = {d: torch.cuda.Stream() for d in self.dirs}
        self.bytes = 0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.t0 = 0.0
        self.elapsed = 0.0

    def _loop(self) -> None:
        while not self.stop.is_set():
            for d in self.dirs:
                with torch.cuda.stream(self.streams[d]):
                    if d == "h2d":
                        self.dev[d].copy_(self.host[d], non_blocking=True)
                    else:
                        self.host[d].copy_(self.dev[d], non_blocking=True)
            for d in self.dirs:
                self.streams[d].synchronize()  # reason: keep one copy per direction in flight, count it done
                self.bytes += self.host[d].numel()

    def __enter__(self) -> DmaLoad:
        self.bytes, self.t0 = 0, time.perf_counter()
        self.stop.clear()
        self.thread = threading.Thread(target=self._loop, name="dma-load", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()  # reason: the copies' byte count is final only once the loop has returned
        self.elapsed = time.perf_counter() - self.t0

    @property
    def gbps(self) -> float:
        return self.bytes / self.elapsed / 1e9 if self.elapsed > 0 else 0.0


def _runner(variant: str, b: Buffers, threads: int) -> Callable[[], None]:
    if variant == "torch_fused_fp32":
        st = torch.zeros(())

        def fused() -> None:
            st.fill_(float(b.next_step()))
            torch._fused_adamw_([b.p], [b.g32], [b.m], [b.v], [], [st], amsgrad=False, maximize=False, **HP)

        return fused
    if variant == "fallback_bf16":

        def fallback() -> None:
            cpu_adam._torch_step(
                b.p, b.g16, b.m, b.v, step=b.next_step(), grad_scale=1.0, out=b.out, scratch=b.scratch, **HP
            )

        return fallback
    if variant in ("ext_bf16", "ext_bf16_nt", "ext_fp32"):
        grad, out = (b.g32, None) if variant == "ext_fp32" else (b.g16, b.out)
        stream = variant == "ext_bf16_nt"

        def ext() -> None:
            cpu_adam.adamw_step(
                b.p, grad, b.m, b.v, step=b.next_step(), out=out, num_threads=threads, stream_out=stream, **HP
            )

        return ext
    if variant == "copy_fp32":
        return lambda: b.scratch.copy_(b.p)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _time_interleaved(runners: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Round-robin over the variants so that drift (other load, clocks) hits them alike."""
    for fn in runners.values():
        fn()  # warm-up: page faults, thread pools
    times: dict[str, list[float]] = {v: [] for v in runners}
    for _ in range(repeats):
        for v, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[v].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=str(LLAMA8B_LAYER), help="comma-separated parameter counts")
    ap.add_argument("--threads", default=",".join(map(str, _default_threads())), help="comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per cell (after one warm-up)")
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=torch.cuda.is_available(),
        help="pin the BF16 copy buffer, as the engine does (default: when CUDA is present)",
    )
    ap.add_argument("--dma", default="none",
                    help=f"comma-separated subset of {','.join(DMA_MODES)}: host<->GPU copies running meanwhile")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    dma_modes = [d for d in args.dma.split(",") if d]
    for d in dma_modes:
        if d not in DMA_MODES:
            ap.error(f"unknown --dma mode {d!r}; choose from {', '.join(DMA_MODES)}")
    if any(d != "none" for d in dma_modes) and not torch.cuda.is_available():
        ap.error("--dma with copies needs a CUDA device")
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")

    has_ext = cpu_adam.extension_available()  # builds or loads the kernel before any timing
    info = cpu_adam.build_info()
    if not has_ext:
        variants = [v for v in variants if not v.startswith("ext_")]
    default_threads = torch.get_num_threads()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": default_threads,
        "python": platform.python_version(),
        "build_info": info,
        "pin": args.pin,
    }
    print(
        f"# {meta['cpu']} ({meta['cores']} cores), torch {torch.__version__} "
        f"({info['torch_cpu_capability']}), backend {info['backend']}"
        + (f", simd {info.get('simd')}" if has_ext else f" ({info['reason']})")
    )
    head = ("size", 12), ("threads", 7), ("dma", 5), ("variant", 17), ("median ms", 10), ("min ms", 9),
    head += (("Gparam/s", 9),)
    print(" ".join(f"{name:>{width}}" for name, width in head) + f" {'GB/s':>7} {'DMA GB/s':>9}")
    rows = []
    loads = {d: DmaLoad(d) for d in dma_modes if d != "none"}
    try:
        for n in sizes:
            b = Buffers(n, args.pin)
            for t in threads:
                torch.set_num_threads(t)
                for d in dma_modes:
                    runners = {v: _runner(v, b, t) for v in variants}
                    if d == "none":
                        cell, dma_gbps = _time_interleaved(runners, args.repeats), None
                    else:
                        with loads[d] as load:
                            cell = _time_interleaved(runners, args.repeats)
                        dma_gbps = load.gbps
                    for v, times in cell.items():
                        med = statistics.median(times)
                        row = {
                            "size": n,
                            "threads": t,
                            "dma": d,
                            "dma_gbps": dma_gbps,
                            "variant": v,
                            "median_s": med,
                            "min_s": min(times),
                            "times_s": times,
                            "gparam_s": n / med / 1e9,
                            "gbps": n * IDEAL_BYTES.get(v, 28) / med / 1e9,
                        }
                        rows.append(row)
                        print(
                            f"{n:>12} {t:>7} {d:>5} {v:>17} {med * 1e3:>10.2f} {min(times) * 1e3:>9.2f} "
                            f"{row['gparam_s']:>9.3f} {row['gbps']:>7.1f} "
                            f"{'-' if dma_gbps is None else f'{dma_gbps:.1f}':>9}",
                            flush=True,
                        )
            del b
    finally:
        torch.set_num_threads(default_threads)
    best = {v: max((r["gparam_s"] for r in rows if r["variant"] == v and r["dma"] == "none"), default=None)
            for v in variants}
    under = {d: {v: max((r["gparam_s"] for r in rows if r["variant"] == v and r["dma"] == d), default=None)
                 for v in variants} for d in loads}
    for d, rates in under.items():
        print(f"best Gparam/s with {d} copies running: "
              + ", ".join(f"{v} {x:.3f}" for v, x in rates.items() if x is not None))
    print("best Gparam/s: " + ", ".join(f"{v} {x:.3f}" for v, x in best.items() if x is not None))
    ext_best = max((best[v] for v in ("ext_bf16", "ext_bf16_nt") if best.get(v) is not None), default=None)
    if ext_best is not None:
        print(
            f"target 6 (BF16 in + BF16 copy out >= 3.0 Gparam/s): {ext_best:.3f}, "
            f"{'met' if ext_best >= 3.0 else 'missed'}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"meta": meta, "best_gparam_s": best, "best_gparam_s_dma": under, "results": rows}
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
