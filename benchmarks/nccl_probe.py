"""What the GPUs of one box give a data-parallel run: NCCL all-gather / reduce-scatter bandwidth between
ranks, alone and while every rank also uploads from pinned host memory (the slideformer pattern).

Run under torchrun (one process per GPU):
    PYTHONPATH=src torchrun --standalone --nproc-per-node 2 benchmarks/nccl_probe.py --out probe.json
Rank 0 prints one JSON line and writes ``--out``. Sizes are per rank (the gathered tensor is world x size).
Run with ``NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT`` to see which transport (P2P/NVLink, SHM, NET) NCCL chose.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch
import torch.distributed as dist

from slideformer.dist.shard import all_gather, reduce_scatter  # the engine's (torch 2.11 and 2.13 names)


def _timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256, help="BF16 MiB per rank per collective")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    n = args.mib * 2**20 // 2
    own = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    whole = torch.empty(n * world, device="cuda", dtype=torch.bfloat16)
    res: dict[str, float | int | str] = {"world": world, "mib_per_rank": args.mib}

    ag = _timed(lambda: all_gather(whole, own), args.reps)
    rs = _timed(lambda: reduce_scatter(own, whole), args.reps)
    moved = n * 2 * (world - 1)  # bytes each rank receives (all-gather) or sends (reduce-scatter)
    res["all_gather_gbs"] = moved / ag / 1e9
    res["reduce_scatter_gbs"] = moved / rs / 1e9

    host = torch.empty(4 * n, dtype=torch.bfloat16, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    up = torch.cuda.Stream()

    def upload() -> None:
        with torch.cuda.stream(up):
            dev.copy_(host, non_blocking=True)
        up.synchronize()

    h2d = _timed(upload, args.reps)
    res["h2d_alone_gbs"] = host.numel() * 2 / h2d / 1e9

    # Both at once: an upload thread streams host -> GPU while the main thread all-gathers.
    stop = threading.Event()
    count = [0]

    def uploader() -> None:
        torch.cuda.set_device(local)
        while not stop.is_set():
            upload()
            count[0] += 1

    th = threading.Thread(target=uploader)
    th.start()
    time.sleep(0.2)
    c0, t0 = count[0], time.perf_counter()
    ag2 = _timed(lambda: all_gather(whole, own), args.reps)
    c1, t1 = count[0], time.perf_counter()
    stop.set()
    th.join()
    res["all_gather_during_h2d_gbs"] = moved / ag2 / 1e9
    res["h2d_during_all_gather_gbs"] = (c1 - c0) * host.numel() * 2 / (t1 - t0) / 1e9
    res["device"] = torch.cuda.get_device_name()
    if dist.get_rank() == 0:
        line = json.dumps(res)
        print("RESULT " + line, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(line + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
