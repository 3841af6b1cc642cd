"""Disk-tier benchmark: raw disk speed through our store, then a step with the AdamW moments on disk vs in RAM.

    python benchmarks/bench_disk.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \\
        --dir /path/on/nvme --out benchmarks/results/disk_llama3.2-3b_h100_202611.json
    python benchmarks/bench_disk.py --device cpu --model tiny --raw-gib 0.25 --out /tmp/disk_smoke.json  # smoke

1. Raw: ``--raw-gib`` GiB written then read sequentially with ``memory.disk.DiskStore`` (O_DIRECT
   pwritev/preadv from its thread pool, files of 256 MiB, all queued at once: what the engine's ring
   sees at best), and the same through kvikio when it imports.
2. Training: the ``slideformer`` system of ``bench_step.py`` in two child processes of that script, the
   same shape, batch and tokens: ``ram`` (all state in RAM) and ``disk`` (``engine.offload='moments'``
   under ``--dir``). Reported: median step time, host RSS peak, the engine's disk bytes per step and its
   I/O throughput (bytes / seconds the disk had a transfer in flight) against the raw speed, and the disk
   roofline (bytes per step at the raw speeds) with how close the step comes to it.
Writes JSON and a short markdown report beside it (``--out``). Never part of pytest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import bench_env
import bench_step  # noqa: F401  (puts src/ on sys.path)
import common
import shapes
from bench_step import ChildRun, _collect, make_spec
from slideformer.memory.disk import DiskStore
from slideformer.memory.disk_io import AlignedBuffer, kvikio_available

HERE = Path(__file__).resolve().parent
FILE_BYTES = 256 << 20


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.2-3b", choices=sorted(shapes.CONFIGS))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke test)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/slideformer-bench-disk"),
                   help="directory on the disk under test (emptied by the store when it exits)")
    p.add_argument("--raw-gib", type=float, default=3.0, help="GiB written then read for the raw speed")
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=1, help="engine.offload_prefetch of the disk run")
    p.add_argument("--child-timeout-s", type=float, default=330.0)
    p.add_argument("--host-reserve-gib", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "disk_bench.json")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def raw_speed(directory: Path, gib: float, backend: str, threads: int) -> dict[str, Any]:
    """Sequential write then read of ``gib`` GiB in 256 MiB files through a ``DiskStore``."""
    n_files = max(1, round(gib * (1 << 30) / FILE_BYTES))
    store = DiskStore(directory, {f"raw{i:03d}": FILE_BYTES for i in range(n_files)}, backend, threads, probe=False)
    buf = AlignedBuffer(FILE_BYTES)
    buf.bytes.fill_(1)
    try:
        t0 = time.perf_counter()
        for f in [store.write(f"raw{i:03d}", buf, FILE_BYTES) for i in range(n_files)]:
            f.result()  # every write landed
        t1 = time.perf_counter()
        for f in [store.read(f"raw{i:03d}", buf, FILE_BYTES) for i in range(n_files)]:
            f.result()  # every read landed
        t2 = time.perf_counter()
    finally:
        store.close()
    total = n_files * FILE_BYTES
    return {"backend": backend, "o_direct": store.direct, "bytes": total,
            "write_gbs": total / (t1 - t0) / 1e9, "read_gbs": total / (t2 - t1) / 1e9}


def run_child(args: argparse.Namespace, name: str, engine_options: dict[str, Any]) -> ChildRun:
    ns = argparse.Namespace(model=args.model, batch_sizes=(args.batch_size,), seq_len=args.seq_len, steps=args.steps,
                            warmup=args.warmup, device=args.device, gpu_memory_gib=None, seed=0, lr=1e-5,
                            window=args.window, engine_opt=[f"{k}={json.dumps(v)}" for k, v in engine_options.items()])
    spec = make_spec(ns)
    cmd = [sys.executable, "-u", str(HERE / "bench_step.py"), "--model", args.model, "--child", "slideformer",
           "--spec", spec.to_json()]
    print(f"== {name}: starting", file=sys.stderr, flush=True)
    run = ChildRun(name, cmd)
    run.wait(args.child_timeout_s, int(args.host_reserve_gib * common.GIB))
    results: dict[str, Any] = {"records": [], "children": {}}
    _collect(results, spec, run)
    run.records = results["records"]
    return run


def summarize(rec: dict[str, Any], raw: dict[str, Any], steps_run: int) -> dict[str, Any]:
    """Step time, RSS and, for the disk run, bytes per step, I/O throughput and the disk roofline."""
    out = {k: rec.get(k) for k in ("status", "error", "step_time_s", "tokens_per_s", "host_rss_peak_bytes",
                                   "gpu_peak_allocated_bytes")}
    disk = (rec.get("engine_memory_report") or {}).get("disk")
    if rec.get("status") != "ok" or not disk:
        return out
    read_b, write_b = disk["bytes_read"] / steps_run, disk["bytes_written"] / steps_run
    roofline = read_b / (raw["read_gbs"] * 1e9) + write_b / (raw["write_gbs"] * 1e9)
    io_gbs = (disk["bytes_read"] + disk["bytes_written"]) / max(disk["busy_s"], 1e-9) / 1e9
    raw_gbs = (read_b + write_b) / roofline / 1e9  # the raw mix at this read/write ratio
    out.update(bytes_read_per_step=read_b, bytes_written_per_step=write_b,
               io_busy_s_per_step=disk["busy_s"] / steps_run, engine_io_gbs=io_gbs, raw_io_gbs=raw_gbs,
               io_vs_raw=io_gbs / raw_gbs, disk_roofline_s=roofline,
               roofline_efficiency=roofline / rec["step_time_s"], o_direct=disk["o_direct"], backend=disk["backend"],
               probe_write_gbs=disk.get("probe_write_gbs"), probe_read_gbs=disk.get("probe_read_gbs"),
               ring_bytes=disk.get("ring_bytes"), demand_reads=disk.get("demand_reads"))
    return out


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    lines = [f"# Disk tier: {a['model']}, batch {a['batch_size']} x {a['seq_len']}, {a['device']}", "",
             f"`{res['meta']['command']}` ({res['meta']['date']})", "", "## Raw disk (our store)", "",
             "| backend | O_DIRECT | GiB | write GB/s | read GB/s |", "| --- | --- | --- | --- | --- |"]
    for r in res["raw"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | - | - | error: {r['error']} | |")
        else:
            lines.append(f"| {r['backend']} | {r['o_direct']} | {r['bytes'] / common.GIB:.2f} | "
                         f"{r['write_gbs']:.2f} | {r['read_gbs']:.2f} |")
    lines += ["", "## Training step", "", "| run | step s | tokens/s | host RSS GiB | disk GB/step (r+w) | "
              "engine I/O GB/s | vs raw | disk roofline s | roofline / step |", "| --- " * 9 + "|"]
    for name, s in res["runs"].items():
        if s.get("status") != "ok":
            lines.append(f"| {name} | error: {str(s.get('error'))[:200]} |" + " |" * 7)
            continue
        disk = "bytes_read_per_step" in s
        gb = (s["bytes_read_per_step"] + s["bytes_written_per_step"]) / 1e9 if disk else None
        cells = [f"{s['step_time_s']:.3f}", f"{s['tokens_per_s']:,.0f}", f"{s['host_rss_peak_bytes'] / common.GIB:.2f}"]
        cells += ([f"{gb:.2f}", f"{s['engine_io_gbs']:.2f}", f"{s['io_vs_raw']:.0%}", f"{s['disk_roofline_s']:.3f}",
                   f"{s['roofline_efficiency']:.0%}"] if disk else ["-"] * 5)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Engine I/O GB/s: bytes read + written / seconds with a transfer in flight. Disk roofline: the "
              "step's bytes at the raw read and write speeds (one disk: the two add up). Bytes per step are the "
              "engine's counters over warm-up + measured steps (the ring's prefetch for the next step included)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    res: dict[str, Any] = {
        "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python benchmarks/bench_disk.py " + " ".join(shlex.quote(a) for a in argv),
                 "environment": bench_env.environment(HERE.parent)},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shape": shapes.shape_stats(args.model).as_dict(), "raw": [], "runs": {}, "records": []}
    backends = ["posix"] + (["kvikio"] if kvikio_available() else [])
    for backend in backends:
        try:
            res["raw"].append(raw_speed(args.dir / "raw", args.raw_gib, backend, args.io_threads))
        except Exception as exc:  # a kvikio without GDS/compat support must not lose the posix numbers
            res["raw"].append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"})
        print(f"== raw {backend}: {res['raw'][-1]}", file=sys.stderr, flush=True)
    raw = next(r for r in res["raw"] if "error" not in r)
    disk_opts = {"offload": "moments", "offload_dir": str(args.dir / "engine"), "offload_prefetch": args.prefetch,
                 "offload_io_threads": args.io_threads}
    for name, opts in (("ram", {}), ("disk", disk_opts)):
        run = run_child(args, name, opts)
        rec = run.records[0]
        res["records"].append(rec)
        res["runs"][name] = summarize(rec, raw, args.steps + args.warmup)
        res["runs"][name]["child"] = run.summary()
        print(f"== {name}: {res['runs'][name].get('step_time_s')} s/step", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote: {args.out}, {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
