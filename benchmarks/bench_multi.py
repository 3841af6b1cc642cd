"""Data-parallel scaling: slideformer on 1 GPU, on N GPUs (torchrun), and DeepSpeed ZeRO-3 + CPU offload on
the same N GPUs; each system in its own process group (its own torchrun), all in one invocation.

Reports per system: median step time, tokens/s (all ranks), the scaling ratio against slideformer on one
GPU (ideal: N), host RSS per node (sum over the node's ranks, peak during the measured steps), GPU peak
per rank. Writes ``<out>.json`` and ``<out>.md``. Never run by pytest.

On the 2-GPU H100 box (about 8 minutes: each 8B build is about a minute, steps are few):
    python benchmarks/bench_multi.py --model llama3.1-8b --seq-len 1024 --batch-size 16 --gpus 2 \\
        --out benchmarks/results/multi_llama3.1-8b_2xh100
CPU smoke (gloo, the tiny shape; DeepSpeed is reported as an error where it is not installed):
    python benchmarks/bench_multi.py --device cpu --model tiny --seq-len 64 --batch-size 2 --gpus 2 \\
        --out /tmp/multi_smoke
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import common  # noqa: E402
import shapes  # noqa: E402

SYSTEMS = ("slideformer", "zero3")


def _worker(args: argparse.Namespace) -> None:
    """One rank of one system: build, warm up, time ``--steps`` steps, rank 0 emits the record."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local}" if args.device == "cuda" else "cpu"
    # A run that outlives its time prints every thread's stack first, so a timeout says where it stood.
    faulthandler.dump_traceback_later(max(10.0, args.timeout - 20.0), exit=False)
    rss = common.RssSampler().start()
    t0 = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[bench_multi rank {os.environ.get('RANK', '0')}] {time.perf_counter() - t0:7.1f} s: {what}",
              file=sys.stderr, flush=True)

    hf = shapes.hf_config(args.model)
    batch = shapes.random_batch(args.batch_size, args.seq_len, hf.vocab_size, device="cpu", seed=local)
    ctx = None
    extra: dict[str, Any] = {}  # what the system reports about itself (slideformer: its resident layers)
    if args.system == "slideformer":
        from slideformer import Engine, EngineConfig, OptimConfig

        opts = common.engine_options(args.engine_opt)
        if opts.get("resident_layers") == -1:  # as the step benchmark: residents sized for this micro-batch
            opts.setdefault("max_tokens_per_micro_batch", args.batch_size * args.seq_len)
        ecfg = EngineConfig(device=device, check_host_memory=False, **opts)
        if world > 1:
            from slideformer.dist import DistContext

            ctx, ecfg = DistContext.from_env(ecfg)
        engine = Engine.from_config(hf, ecfg, OptimConfig(lr=1e-5), dist=ctx)

        def step() -> None:
            engine.train_step(batch)

        def finish() -> None:
            engine.flush()
            extra["resident_layers"] = engine.memory_report().get("resident_layers", 0)
    else:
        from systems.base import BenchSpec
        from systems.deepspeed_zero import DeepSpeedZero

        spec = BenchSpec(model=args.model, batch_sizes=(args.batch_size,), seq_len=args.seq_len, device=device)
        system = DeepSpeedZero(spec, stage=3)
        ds_step = system.prepare(args.batch_size)

        def step() -> None:
            ds_step()

        def finish() -> None:
            system.sync()
    setup_s = time.perf_counter() - t0
    progress(f"set up in {setup_s:.1f} s; {torch.get_num_threads()} CPU threads, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")

    def sync_all() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        if dist.is_initialized():
            dist.barrier()  # step boundaries aligned over ranks: the slowest rank sets the time

    for i in range(args.warmup):
        step()
        sync_all()
        progress(f"warm-up step {i + 1} done")
    rss.reset_peak()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync_all()
        times.append(time.perf_counter() - t)
        progress(f"step {len(times)}: {times[-1]:.3f} s")
    if args.profile:
        _profiled_step(step, sync_all, args.profile)
    finish()
    peak = rss.peak_bytes
    node_rss = peak
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else 0
    if dist.is_initialized():
        t = torch.tensor([float(peak)], dtype=torch.float64)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        # Sum of RSS over all ranks / nodes = per-node RSS on a homogeneous run.
        g = dist.new_group(backend="gloo")
        dist.all_reduce(t, group=g)
        node_rss = float(t[0]) * local_ranks / world
    median = statistics.median(times)
    if int(os.environ.get("RANK", "0")) == 0:
        common.emit({"system": args.system, "gpus": world, "model": args.model, "seq_len": args.seq_len,
                     "batch_per_gpu": args.batch_size, "step_s": median, "times_s": times,
                     "tokens_per_s": args.batch_size * args.seq_len * world / median, "setup_s": setup_s,
                     "cpu_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                     "host_rss_node_gib": node_rss / common.GIB, "gpu_peak_gib": gpu_peak / common.GIB,
                     "status": "ok", **extra})
    if ctx is not None:
        ctx.shutdown()


def _profiled_step(step: Any, sync_all: Any, path: str) -> None:
    """One more step, every rank; rank 0 under the torch profiler, its op table written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    if int(os.environ.get("RANK", "0")) != 0:
        step()
        sync_all()
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step()
        sync_all()
        wall = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60)
    Path(path).write_text(f"profiled step: {wall:.3f} s (world {os.environ.get('WORLD_SIZE', '1')})\n\n"
                          f"{table}\n\n{cpu}\n")


def _launch(args: argparse.Namespace, system: str, gpus: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           str(Path(__file__).resolve()), "--worker", "--system", system, "--device", args.device,
           "--model", args.model, "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.profile:
        cmd += ["--profile", f"{args.profile}_{system}{gpus}.txt"]
    for opt in args.engine_opt:
        cmd += ["--engine-opt", opt]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), str(HERE),
                                                        os.environ.get("PYTHONPATH", "")]))
    # torchrun gives every rank OMP_NUM_THREADS=1 unless it is set, which starves any CPU optimizer
    # (DeepSpeed's CPU Adam is OpenMP); every system gets the node's cores split evenly over its ranks.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // gpus)))
    print(f"[bench_multi] {system} on {gpus} {'GPU' if args.device == 'cuda' else 'process'}(s) ...", flush=True)
    # Own process group: on a timeout the workers die with torchrun instead of holding the GPUs.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        # The ranks' progress lines and the stacks faulthandler dumped say how far each rank got.
        lines = (out + err).splitlines()
        tail = "\n".join([ln for ln in lines if ln.startswith("[bench_multi rank")][-8:] + lines[-40:])
        return {"system": system, "gpus": gpus, "status": "error", "error": f"timeout after {args.timeout} s; {tail}"}
    for line in out.splitlines():
        rec = common.parse_result_line(line)
        if rec is not None:
            return rec
    text = err or out
    causes = [ln for ln in text.splitlines() if "Error" in ln and "elastic" not in ln]  # the worker's, not torchrun's
    return {"system": system, "gpus": gpus, "status": "error", "error": "\n".join(causes[-4:]) or text[-1500:]}


def _markdown(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"# Data-parallel scaling: {args.model}, seq {args.seq_len}, batch {args.batch_size} per GPU",
             "", "| system | GPUs | step (s) | tokens/s | scaling vs slideformer x1 | host RSS per node (GiB) | "
             "GPU peak per rank (GiB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {r['system']} | {r['gpus']} | error | | | | |")
            continue
        name = r["system"] + (f" ({r['resident_layers']} resident)" if r.get("resident_layers") else "")
        lines.append(f"| {name} | {r['gpus']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r.get('scaling', float('nan')):.2f} | {r['host_rss_node_gib']:.1f} | {r['gpu_peak_gib']:.1f} |")
    errors = [r for r in records if r.get("status") != "ok"]
    for r in errors:
        lines += ["", f"**{r['system']} x{r['gpus']} failed:**", "```", str(r.get("error", ""))[-1200:], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--system", choices=SYSTEMS, default="slideformer", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per GPU per step")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=360.0, help="seconds per system before it is recorded as failed")
    ap.add_argument("--systems", default="slideformer1,slideformerN,zero3N",
                    help="comma list of slideformer1, slideformerN, zero3N")
    ap.add_argument("--out", default="benchmarks/results/multi")
    ap.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="engine option for the slideformer systems (repeatable)")
    ap.add_argument("--profile", default=None,
                    help="rank 0 profiles one extra step (torch profiler) and writes its op table to this path")
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    plan = {"slideformer1": ("slideformer", 1), "slideformerN": ("slideformer", args.gpus),
            "zero3N": ("zero3", args.gpus)}
    records = [_launch(args, *plan[name]) for name in args.systems.split(",")]
    base = next((r for r in records if r["system"] == "slideformer" and r["gpus"] == 1 and r["status"] == "ok"), None)
    for r in records:
        if base is not None and r.get("status") == "ok":
            r["scaling"] = r["tokens_per_s"] / base["tokens_per_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Suffixes appended, not replaced: a stem like "multi_llama3.1-8b" has a dot of its own.
    stem = str(out).removesuffix(".json")
    Path(stem + ".json").write_text(json.dumps({"args": vars(args), "records": records}, indent=1) + "\n")
    Path(stem + ".md").write_text(_markdown(records, args))
    print(_markdown(records, args))


if __name__ == "__main__":
    main()
