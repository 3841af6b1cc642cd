"""Step benchmark: slideformer vs resident PyTorch vs DeepSpeed ZeRO-2/3 offload, same model, same run.

    python benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \\
        --systems slideformer,resident,zero2,zero3 [--gpu-memory-gib 24] [--steps 5 --warmup 2] \\
        --out benchmarks/results/NAME.json

The parent process runs the roofline and then each system in its own child process (this same
script with ``--child``), reads their JSON result lines, and records a child that crashes, runs
out of host memory or overruns its time as an error of that system. After every child it rewrites
the JSON, markdown, CSV and plots (``report.py``), so an interrupted run still leaves its results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _ensure_src_on_path() -> None:
    """Let ``import slideformer`` work from a plain checkout (the box sets PYTHONPATH=src too)."""
    src = str(REPO / "src")
    if src not in sys.path:
        sys.path.append(src)


_ensure_src_on_path()

import psutil  # noqa: E402

import bench_env  # noqa: E402
import common  # noqa: E402
import report  # noqa: E402
import shapes  # noqa: E402
from systems import FACTORIES  # noqa: E402
from systems.base import BenchSpec  # noqa: E402

ROOFLINE = "roofline"
HOST_LOW_GRACE_S = 5.0
"""How long available host RAM must stay under the reserve before a child is killed for it."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(shapes.CONFIGS))
    p.add_argument("--batch-size", default="8", help="one batch size or several, comma-separated (8,16,32)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument(
        "--systems",
        default="slideformer,resident,zero2,zero3",
        help=f"comma-separated subset of {','.join(FACTORIES)}",
    )
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="cap every system's GPU allocator")
    p.add_argument("--steps", type=int, default=5, help="measured steps per batch size (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke tests)")
    p.add_argument("--window", type=int, default=2, help="slideformer: decoder-layer slots on the GPU")
    p.add_argument(
        "--engine-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="slideformer: extra EngineConfig field (repeatable; VALUE parsed as JSON if it can be)",
    )
    p.add_argument(
        "--kernels",
        choices=("torch", "liger"),
        default="torch",
        help="decoder-layer kernels of every system alike: HF's torch modules or Liger-Kernel's Triton "
        "RMSNorm/SwiGLU/RoPE (slideformer: engine.kernels; resident, zero2/3 and the roofline: the same "
        "instance patch on their HF model)",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline child")
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="threads for the roofline's CPU optimizer measure",
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=560.0,
        help="wall budget of the whole run; children that would start past it are skipped",
    )
    p.add_argument("--child-timeout-s", type=float, default=300.0, help="wall limit of one child")
    p.add_argument(
        "--host-reserve-gib",
        type=float,
        default=3.0,
        help="kill a child (recorded as host RAM exhausted) when available host RAM drops below this",
    )
    p.add_argument(
        "--engine-src",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a system 'slideformer@LABEL' imports slideformer from DIR (a source tree's src/, e.g. "
        "'git archive REF src | tar -x -C /tmp/ref': an earlier engine against this one, same run)",
    )
    p.add_argument("--out", type=Path, default=None, help="results JSON (markdown, CSV, PNGs are written beside it)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = tuple(int(x) for x in str(args.batch_size).split(",") if x.strip())
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    # A variant "slideformer+key=value+..." runs the engine with extra engine options (same run, own row);
    # "slideformer@LABEL..." runs the engine of --engine-src LABEL=DIR.
    unknown = [s for s in args.system_list if s.split("+")[0].split("@")[0] not in FACTORIES]
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {list(FACTORIES)}")
    pairs, args.engine_src = args.engine_src, {}
    for pair in pairs:
        label, _, path = pair.partition("=")
        if not path or not (Path(path) / "slideformer").is_dir():
            p.error(f"--engine-src {pair!r}: expected LABEL=DIR with DIR/slideformer a package directory")
        args.engine_src[label.strip()] = str(Path(path).resolve())
    labels = {s.split("+")[0].partition("@")[2] for s in args.system_list if "@" in s.split("+")[0]}
    if labels - set(args.engine_src):
        p.error(f"systems name engine sources {sorted(labels - set(args.engine_src))} without --engine-src")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def make_spec(args: argparse.Namespace) -> BenchSpec:
    return BenchSpec(
        model=args.model,
        batch_sizes=args.batch_sizes,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        gpu_memory_gib=args.gpu_memory_gib,
        seed=args.seed,
        lr=args.lr,
        window=args.window,
        engine_options=common.engine_options(args.engine_opt),
        kernels=args.kernels,
    )


# ---------------------------------------------------------------- child side


def child_main(name: str, spec: BenchSpec, cpu_threads: int) -> int:
    """Run one system (or the roofline) and print its result lines."""
    if name == ROOFLINE:
        import roofline

        common.emit(roofline.run(spec, cpu_threads))
        return 0
    from systems.base import drive

    base, *variant = name.split("+")
    base, _, label = base.partition("@")
    if label:
        import slideformer

        src = os.environ.get("SF_BENCH_ENGINE_SRC", "")
        if not src or not str(Path(slideformer.__file__).resolve()).startswith(src):
            raise SystemExit(f"{name}: imported slideformer from {slideformer.__file__}, not from {src!r}")
    if variant:
        spec = dataclasses.replace(spec, engine_options={**spec.engine_options, **common.engine_options(variant)})
    module_name, _, func = FACTORIES[base].partition(":")
    try:
        make = getattr(importlib.import_module(module_name), func)
    except Exception as exc:  # e.g. deepspeed or slideformer not installed
        from systems.base import error_text

        for b in spec.batch_sizes:
            common.emit(
                {
                    "system": name,
                    "model": spec.model,
                    "seq_len": spec.seq_len,
                    "batch_size": b,
                    "tokens_per_step": b * spec.seq_len,
                    "status": "error",
                    "phase": "import",
                    "error": error_text(exc),
                }
            )
        return 0
    drive(name, spec, make)
    return 0


# ---------------------------------------------------------------- parent side


class ChildRun:
    """One child process: its result records, log tail, RSS peak (seen from here) and why it was killed."""

    def __init__(self, name: str, cmd: list[str], src: str | None = None) -> None:
        self.name = name
        self.records: list[dict[str, Any]] = []
        self.tail: deque[str] = deque(maxlen=40)
        self.killed: str | None = None
        self.rss_peak = 0
        self.returncode: int | None = None
        self.wall_s = 0.0
        self._t0 = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if src is not None:  # an earlier engine (--engine-src): its package first on the path
            env.update(SF_BENCH_ENGINE_SRC=src, PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def wait(self, timeout_s: float, host_reserve_bytes: int) -> None:
        """Watch the child until it exits (killing it on timeout or host-RAM exhaustion)."""
        self._watch(timeout_s, host_reserve_bytes)
        self._reader.join(timeout=10)
        self.returncode = self.proc.returncode
        self.wall_s = time.perf_counter() - self._t0

    def _read(self) -> None:
        if self.proc.stdout is None:
            return
        for line in self.proc.stdout:
            rec = common.parse_result_line(line)
            if rec is not None:
                self.records.append(rec)
                continue
            self.tail.append(line.rstrip("\n"))
            sys.stderr.write(f"[{self.name}] {line}")
            sys.stderr.flush()

    def _tree_rss(self) -> int:
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _watch(self, timeout_s: float, host_reserve_bytes: int) -> None:
        deadline = time.perf_counter() + timeout_s
        low_since: float | None = None  # host RAM must stay low a while: some VMs grow their RAM on demand
        while self.proc.poll() is None:
            self.rss_peak = max(self.rss_peak, self._tree_rss())
            now = time.perf_counter()
            low = common.host_available_bytes() < host_reserve_bytes
            low_since = (low_since or now) if low else None
            if low_since is not None and now - low_since > HOST_LOW_GRACE_S:
                self._kill(
                    f"host RAM exhausted: available < {host_reserve_bytes / common.GIB:.1f} GiB with the "
                    f"child at {self.rss_peak / common.GIB:.1f} GiB RSS"
                )
            elif now > deadline:
                self._kill(f"timed out after {timeout_s:.0f} s")
            time.sleep(0.1)

    def kill(self, reason: str) -> None:
        """Kill the child and its process group now (the parent is being stopped)."""
        self._kill(reason)

    def _kill(self, reason: str) -> None:
        self.killed = reason
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the child's own session: it and its compilers
        except ProcessLookupError:
            pass
        self.proc.wait()

    def summary(self) -> dict[str, Any]:
        return {
            "returncode": self.returncode,
            "wall_s": self.wall_s,
            "killed": self.killed,
            "rss_peak_bytes": self.rss_peak,
            "log_tail": list(self.tail)[-15:],
        }

    def failure_text(self) -> str:
        if self.killed:
            head = f"killed by the benchmark: {self.killed}"
        elif self.returncode and self.returncode < 0:
            sig = signal.Signals(-self.returncode).name
            head = f"child died of {sig}" + (" (likely the kernel OOM killer: host RAM)" if sig == "SIGKILL" else "")
        else:
            head = f"child exited with code {self.returncode} before reporting"
        tail = "\n".join(list(self.tail)[-12:])
        return f"{head}; host RSS peak seen {self.rss_peak / common.GIB:.1f} GiB\n{tail}"


def run_parent(args: argparse.Namespace, argv: list[str]) -> int:
    spec = make_spec(args)
    t_start = time.perf_counter()
    stats = shapes.shape_stats(args.model)
    out = args.out or default_out(args)
    results: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_step.py " + " ".join(shlex.quote(a) for a in argv),
            "environment": bench_env.environment(REPO),
        },
        "args": {
            "model": args.model,
            "batch_sizes": list(args.batch_sizes),
            "seq_len": args.seq_len,
            "systems": args.system_list,
            "gpu_memory_gib": args.gpu_memory_gib,
            "steps": args.steps,
            "warmup": args.warmup,
            "device": args.device,
            "window": args.window,
            "engine_options": spec.engine_options,
            "engine_src": args.engine_src,
            "kernels": spec.kernels,
            "cpu_threads": args.cpu_threads,
        },
        "shape": stats.as_dict(),
        "records": [],
        "roofline": None,
        "children": {},
    }
    children = ([] if args.no_roofline else [ROOFLINE]) + args.system_list
    current: list[ChildRun | None] = [None]

    def stop(signum: int, _frame: Any) -> None:
        # Children run in their own sessions: take the running one down with us, then write what we have.
        run = current[0]
        if run is not None:
            run.kill(f"benchmark stopped by {signal.Signals(signum).name}")
            run.returncode = run.proc.returncode
            _collect(results, spec, run)
        report.write_all(results, out)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for name in children:
        remaining = args.time_budget_s - (time.perf_counter() - t_start)
        if remaining < 30:
            reason = f"time budget of {args.time_budget_s:.0f} s used up"
            if name == ROOFLINE:
                results["roofline"] = {"error": reason}
            else:
                results["records"] += [_missing(spec, name, b, "skipped", reason) for b in spec.batch_sizes]
            continue
        cmd = [
            sys.executable,
            "-u",
            str(Path(__file__).resolve()),
            "--model",
            args.model,
            "--child",
            name,
            "--spec",
            spec.to_json(),
            "--cpu-threads",
            str(args.cpu_threads),
        ]
        print(f"== {name}: starting (budget left {remaining:.0f} s)", file=sys.stderr, flush=True)
        run = ChildRun(name, cmd, args.engine_src.get(name.split("+")[0].partition("@")[2]))
        current[0] = run
        run.wait(min(args.child_timeout_s, remaining - 10), int(args.host_reserve_gib * common.GIB))
        current[0] = None
        print(
            f"== {name}: done in {run.wall_s:.0f} s, exit {run.returncode}" + (f", {run.killed}" if run.killed else ""),
            file=sys.stderr,
            flush=True,
        )
        _collect(results, spec, run)
        report.write_all(results, out)
    paths = report.write_all(results, out)
    print(report.markdown(results))
    print("wrote: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def _collect(results: dict[str, Any], spec: BenchSpec, run: ChildRun) -> None:
    """File a finished (or killed) child's records; batch sizes it never reported become its error."""
    results["children"][run.name] = run.summary()
    if run.name == ROOFLINE:
        results["roofline"] = run.records[0] if run.records else {"error": run.failure_text()}
        return
    got = {r.get("batch_size") for r in run.records}
    results["records"] += run.records
    results["records"] += [
        _missing(spec, run.name, b, "error", run.failure_text(), rss=run.rss_peak)
        for b in spec.batch_sizes
        if b not in got
    ]


def _missing(spec: BenchSpec, name: str, b: int, status: str, error: str, rss: int | None = None) -> dict[str, Any]:
    return {
        "system": name,
        "model": spec.model,
        "seq_len": spec.seq_len,
        "batch_size": b,
        "tokens_per_step": b * spec.seq_len,
        "status": status,
        "error": error,
        "host_rss_peak_bytes": rss,
    }


def default_out(args: argparse.Namespace) -> Path:
    """``benchmarks/results/<model>_<gpu>_<yyyymm>_<who>.json`` (the folder's naming rule)."""
    gpu = "cpu"
    if args.device.startswith("cuda"):
        name = bench_env.gpu_name() or "gpu"
        gpu = name.lower().replace("nvidia", "").strip().split()[0]
    who = os.environ.get("BENCH_WHO") or os.environ.get("USER") or "bench"
    cap = f"_cap{args.gpu_memory_gib:g}g" if args.gpu_memory_gib else ""
    return HERE / "results" / f"{args.model}{cap}_{gpu}_{dt.date.today():%Y%m}_{who}.json"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, BenchSpec.from_json(args.spec), args.cpu_threads)
    return run_parent(args, argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
