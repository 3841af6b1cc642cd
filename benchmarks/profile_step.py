"""One slideformer step under ``torch.profiler``: a Chrome trace and a PNG timeline of the overlap.

The step is one steady-state period: three steps run under the profiler without a drain in between, and
the window is the middle one's start to the third one's start (the previous step's optimizer tail that
overlaps this forward is in it). ``--drain`` profiles one step followed by ``flush()`` instead.

    python benchmarks/profile_step.py --model llama3.2-3b --batch-size 4 --seq-len 1024 --out-dir DIR

Writes ``DIR/<name>.json.gz`` (open it in https://ui.perfetto.dev or chrome://tracing),
``DIR/<name>.png`` with one lane each for GPU compute (kernels), upload (H2D copies), download
(D2H copies), the host-side FP32->BF16 conversion on the upload threads, and the CPU optimizer, and
``DIR/<name>_summary.json`` with each lane's busy fraction and how much of the step the copies
and the optimizer overlap with compute.

Under ``torchrun --nproc-per-node N`` every rank runs one data-parallel engine and writes its own
``<name>_rank<r>.*`` files.

The engine's worker threads are profiled with ``profile_all_threads``. Host-side work is made
visible by wrapping, on this engine instance only, its optimizer and transfer entry points in
``record_function`` ranges (``sf/upload_host``, ``sf/grad_host``); ranges the engine emits itself are used as
they are: every host AdamW call is ``sf/cpu_adamw/<unit name>`` (``optim.adamw.adamw_range``; until session 7
this script wrapped the optimizer in a second, unnamed range nested in the engine's).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent / "src"))

import torch  # noqa: E402

import shapes  # noqa: E402
from timeline_read import add_marker_steps, compute_stream, length, read, union  # noqa: E402

LANES: tuple[tuple[str, str], ...] = (
    ("compute", "GPU compute"),
    ("upload", "upload H2D"),
    ("download", "download D2H"),
    ("upload_host", "host FP32->BF16\n(upload threads)"),
    ("cpu_adamw", "CPU optimizer"),
    ("gpu_adamw", "GPU AdamW\n(resident layers)"),
)
INSTRUMENT: tuple[tuple[str, str, str], ...] = (
    ("layer_up", "upload", "sf/upload_host"),
    ("vocab_up", "upload", "sf/upload_host"),
    ("drain", "drain", "sf/grad_host"),
)
"""(engine attribute, method, range name): instance methods wrapped in profiler ranges."""


def _ranged(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def instrument(engine: Any) -> list[str]:
    """Wrap the engine instance's host-side entry points in named ranges; returns what was wrapped."""
    done = []
    for attr, method, name in INSTRUMENT:
        obj = getattr(engine, attr, None)
        fn = getattr(obj, method, None) if obj is not None else None
        if callable(fn):
            setattr(obj, method, _ranged(fn, name))
            done.append(f"{attr}.{method} -> {name}")
    return done


MARK_CYCLES = 1000
"""The step marker's length in GPU clock cycles (~0.6 µs at 1.7 GHz)."""


CONVERT_OPS = ("aten::copy_", "aten::_to_copy")
"""CPU ops that, on an upload thread, are the FP32->BF16 conversion into staging (and the copy issue)."""


RESIDENT_KERNEL = "FusedAdamMathFunctor"
"""A kernel of the resident layers' AdamW (``torch._fused_adamw_``); the stream that runs it, when it is not the
compute stream, is the resident updates' own (``runtime/resident.py``, since session 16)."""


def resident_stream(events: list[dict[str, Any]], compute_tid: Any) -> Any:
    """The ``tid`` of the resident updates' stream: the other stream running fused AdamW kernels (None: none)."""
    return next((e.get("tid") for e in events if str(e.get("cat", "")).lower() == "kernel"
                 and RESIDENT_KERNEL in str(e.get("name", "")) and e.get("tid") != compute_tid), None)


def lane_of(event: dict[str, Any], upload_tids: set[Any], compute_tid: Any = None, side_tid: Any = None,
            main_tid: Any = None) -> str | None:
    """Which timeline lane a Chrome-trace event belongs to (None: not drawn).

    Host-side conversion is read from the upload threads (those that carry ``sf/upload_host``
    ranges): their ``aten::copy_`` ops, not the ranges, which also span the waits for updates.
    Kernels are compute on the compute stream (``compute_tid``; None: any stream); on the resident updates' stream
    (``side_tid``) their norm and AdamW; on another stream the uploaders' device-side casts, drawn as upload work.
    The main thread's (``main_tid``) ``_fused_adamw_`` calls launch the resident layers' GPU AdamW: not the CPU's.
    """
    cat = str(event.get("cat", "")).lower()
    name = str(event.get("name", ""))
    low = name.lower()
    if cat == "kernel":
        if compute_tid is None or event.get("tid") == compute_tid:
            return "compute"
        return "gpu_adamw" if side_tid is not None and event.get("tid") == side_tid else "upload"
    if cat == "gpu_memcpy":
        if "htod" in low:
            return "upload"
        if "dtoh" in low:
            return "download"
        return None
    if cat in ("user_annotation", "cpu_op", "python_function"):
        if low.startswith("sf/cpu_adamw") or ("fused_adamw" in low and (main_tid is None
                                                                         or event.get("tid") != main_tid)):
            return "cpu_adamw"
        if cat == "cpu_op" and name in CONVERT_OPS and event.get("tid") in upload_tids:
            return "upload_host"
    return None


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def timeline(trace: dict[str, Any], step_name: str,
             next_name: str | None = None) -> tuple[float, float, dict[str, list[tuple[float, float]]]]:
    """The profiled step's window (µs) and, per lane, the merged busy intervals inside it.

    With ``next_name`` (a range around the following step) the window is one steady-state period: from
    the step's start to the next step's start, lanes clipped to it (so the previous step's optimizer tail
    that overlaps this forward is in, and this step's tail that overlaps the next forward is not).
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    step = [e for e in events if e.get("ph") == "X" and e.get("name") == step_name]
    nxt = [e for e in events if e.get("ph") == "X" and e.get("name") == next_name] if next_name else []
    lanes: dict[str, list[tuple[float, float]]] = {k: [] for k, _ in LANES}
    upload_tids = {e.get("tid") for e in events if str(e.get("name", "")).startswith("sf/upload_host")}
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e]
    compute_tid = compute_stream(timed)
    side_tid = resident_stream(timed, compute_tid)
    main_tid = step[0].get("tid") if step else None
    spans = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        lane = lane_of(e, upload_tids, compute_tid, side_tid, main_tid)
        if lane is None:
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        lanes[lane].append((start, end))
        spans.append((start, end))
    if step:
        t0 = float(step[0]["ts"])
        t1 = t0 + float(step[0]["dur"])
    else:
        t0 = min(s for s, _ in spans) if spans else 0.0
        t1 = max(e for _, e in spans) if spans else 1.0
    if step and nxt:  # one period: [this step's start, the next step's start)
        t1 = float(nxt[0]["ts"])
        clipped = {k: [(max(s, t0), min(e, t1)) for s, e in v if e > t0 and s < t1] for k, v in lanes.items()}
        return t0, t1, {k: union(v) for k, v in clipped.items()}
    t1 = max([t1] + [e for _, e in spans])  # GPU work may finish after the host-side range closes
    return t0, t1, {k: union(v) for k, v in lanes.items()}


def summarize(t0: float, t1: float, lanes: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Busy fraction of every lane, and how much of each other lane runs while the GPU computes."""
    window = max(t1 - t0, 1e-9)
    out: dict[str, Any] = {"window_ms": window / 1e3, "busy_fraction": {}, "overlap_with_compute": {}}
    for key, _ in LANES:
        out["busy_fraction"][key] = length(lanes[key]) / window
        if key != "compute" and lanes[key]:
            out["overlap_with_compute"][key] = _intersection(lanes[key], lanes["compute"]) / length(lanes[key])
    return out


def plot(t0: float, t1: float, lanes: dict[str, list[tuple[float, float]]], title: str, path: Path) -> bool:
    """Draw the lanes as horizontal bars (milliseconds from the step start); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(14, 4.0))
    colors = ("tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:olive")
    for row, ((key, _label), color) in enumerate(zip(LANES, colors, strict=True)):
        bars = [((s - t0) / 1e3, max((e - s) / 1e3, 1e-3)) for s, e in lanes[key]]
        y = len(LANES) - 1 - row
        ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=color)
    ax.set_yticks(range(len(LANES)), [label for _, label in reversed(LANES)])
    ax.set_xlim(0, (t1 - t0) / 1e3)
    ax.set_xlabel("ms since the step started")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _profiler_kwargs(device: torch.device, threads: str = "all") -> dict[str, Any]:
    from torch.profiler import ProfilerActivity

    if threads == "none" and device.type == "cuda":
        return {"activities": [ProfilerActivity.CUDA], "record_shapes": False, "with_stack": False}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    kwargs: dict[str, Any] = {"activities": acts, "record_shapes": False, "with_stack": False}
    if threads != "all":
        return kwargs
    try:  # worker threads (uploads, gradient drain, CPU AdamW) exist before the profiler starts
        from torch._C._profiler import _ExperimentalConfig

        kwargs["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):
        pass
    return kwargs


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.2-3b", choices=sorted(shapes.CONFIGS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpu-memory-gib", type=float, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None, help="file stem (default: timeline_<model>_b<batch>)")
    p.add_argument("--drain", action="store_true",
                   help="profile one step followed by flush() (the optimizer's tail and the resident layers' copy "
                        "back to the host) instead of one steady-state period between two steps' starts")
    p.add_argument("--threads", choices=("all", "main", "none"), default="all",
                   help="'main': trace the issuing threads' ops only (the workers' upload, drain and AdamW lanes stay "
                        "empty). 'none': trace GPU work only, the steps marked by a tiny kernel on the compute stream "
                        "as each is called; no CPU lanes, but no tracing cost on the threads that issue the GPU's work "
                        "(~16,800 ops per 3B step cost ~0.12 s traced, session 17), and each compute-stream gap says "
                        "which copy or kernel it waited for (timeline_read.py)")
    p.add_argument("--unprofiled-steps", type=int, default=3,
                   help="steps timed without the profiler just before it, so the profiled period can be compared "
                        "with the step it stands for")
    args = p.parse_args(argv)
    if args.threads == "none" and args.drain:
        p.error("--threads none marks steady-state steps; it does not combine with --drain")

    import common
    from slideformer import Engine, EngineConfig, OptimConfig

    device = common.resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts = common.engine_options(args.engine_opt)
    if opts.get("resident_layers") == -1:  # as the step benchmark: the planner sizes residents for this batch and cap
        opts.setdefault("max_tokens_per_micro_batch", args.batch_size * args.seq_len)
        if args.gpu_memory_gib:
            opts.setdefault("gpu_memory_gib", args.gpu_memory_gib)
    ecfg = EngineConfig(device=str(device), window=args.window, **opts)
    ctx, rank = None, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun: one engine per GPU, every rank profiled, each writing <name>_rank<r>.*
        from slideformer.dist import DistContext

        ctx, ecfg = DistContext.from_env(ecfg)
        device, rank = torch.device(ecfg.device), ctx.rank
    common.cap_gpu_memory(device, args.gpu_memory_gib)
    engine = Engine.from_config(shapes.hf_config(args.model), ecfg, OptimConfig(lr=1e-5), seed=0, dist=ctx)
    wrapped = instrument(engine)
    batch = shapes.random_batch(args.batch_size, args.seq_len, shapes.hf_config(args.model).vocab_size, device="cpu",
                                seed=rank)
    for _ in range(args.warmup):
        engine.train_step(batch)
    if args.drain:
        engine.flush()
        common.synchronize(device)

    unprofiled = []
    common.synchronize(device)
    for _ in range(max(0, args.unprofiled_steps)):  # start to start, as the profiled period; the queue stays full
        began = time.perf_counter()
        engine.train_step(batch)
        unprofiled.append(time.perf_counter() - began)
    step_name, next_name = "sf/profiled_step", None if args.drain else "sf/next_step"
    marked = args.threads == "none" and device.type == "cuda"

    def mark() -> None:
        if marked:  # the step's start as the compute stream reaches it (the main thread's current stream)
            torch.cuda._sleep(MARK_CYCLES)

    with torch.profiler.profile(**_profiler_kwargs(device, args.threads)) as prof:
        if next_name is not None:  # steady state: the previous step's optimizer tail runs into this one
            with torch.profiler.record_function("sf/lead_step"):
                mark()
                engine.train_step(batch)
        with torch.profiler.record_function(step_name):
            mark()
            engine.train_step(batch)
            if args.drain:
                engine.flush()
                common.synchronize(device)
        if next_name is not None:  # its start closes the profiled period; its own work is cut off
            with torch.profiler.record_function(next_name):
                mark()
                engine.train_step(batch)
    engine.flush()  # outside the profile: wait for the last updates before the engine is read or closed
    common.synchronize(device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"timeline_{args.model}_b{args.batch_size}"
    if ctx is not None:
        stem += f"_rank{rank}"
    raw = args.out_dir / f"{stem}.json"
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    if marked and not add_marker_steps(trace, step_name, next_name):
        raise SystemExit("--threads none: the trace holds no step markers (spin_kernel)")
    with gzip.open(args.out_dir / f"{stem}.json.gz", "wt") as f:
        json.dump(trace, f)
    raw.unlink()
    t0, t1, lanes = timeline(trace, step_name, next_name)
    summary = summarize(t0, t1, lanes)
    summary.update(read(trace, step_name, next_name))  # the compute stream's gaps and the AdamW's units in them
    summary.update(
        model=args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        device=str(device),
        engine_options=opts,
        window=args.window,
        period="step + flush" if args.drain else "start of the step to start of the next",
        threads_traced=args.threads,
        unprofiled_step_ms=[round(t * 1e3, 1) for t in unprofiled],
        instrumented=wrapped,
        memory_report=engine.memory_report(),
    )
    title = (
        f"slideformer, {args.model}, batch {args.batch_size} x {args.seq_len}: "
        + (f"one step + flush ({summary['window_ms']:.0f} ms)" if args.drain
           else f"one steady-state step, start to next start ({summary['window_ms']:.0f} ms)")
        + (" [GPU work only: no CPU lanes]" if marked else "")
    )
    drew = plot(t0, t1, lanes, title, args.out_dir / f"{stem}.png")
    (args.out_dir / f"{stem}_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    engine.close()
    if ctx is not None:
        ctx.shutdown()
    print(json.dumps({k: summary[k] for k in ("window_ms", "unprofiled_step_ms", "busy_fraction",
                                              "overlap_with_compute", "idle_ended_by_ms")}, indent=1))
    print(f"wrote {args.out_dir / stem}.json.gz, {stem}_summary.json" + (f", {stem}.png" if drew else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
