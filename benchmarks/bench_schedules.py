"""Step time of the two schedules on one model, and the engine's host bytes per parameter.

Schedules compared in one process on one engine (same weights, batch and kernels):
  overlap          AdamW of each layer inside backward (no clipping, no accumulation)
  deferred         gradients accumulated on the host, updates during the next step's forward
  deferred+clip    the same with global-norm clipping at 1.0 (exact)
  deferred+accum   two micro-batches of half the batch, with clipping

Usage (on the GPU box):
  python benchmarks/bench_schedules.py --model llama3.2-1b --batch-size 8 --seq-len 1024 --out r.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import psutil
import torch
import transformers

from shapes import CONFIGS, hf_config
from slideformer import Engine, EngineConfig, OptimConfig


def _time_steps(engine: Engine, batches: list, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        res = engine.train_step(batches[i % len(batches)])
        _ = res.grad_norm  # include the gradient processing of this step
        times.append(time.perf_counter() - t0)
    engine.flush()
    return times[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3.2-1b", choices=sorted(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    cfg = hf_config(args.model)
    t0 = time.perf_counter()
    engine = Engine.from_config(cfg, EngineConfig(window=args.window), OptimConfig(lr=1e-5, weight_decay=0.1))
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    bsz, seq = args.batch_size, args.seq_len
    full = [{"input_ids": torch.randint(0, cfg.vocab_size, (bsz, seq), generator=gen)} for _ in range(2)]
    half = [
        [{"input_ids": b["input_ids"][: bsz // 2]}, {"input_ids": b["input_ids"][bsz // 2 :]}] for b in full
    ]
    results = {}
    variants = [
        ("overlap", "overlap", None, full),
        ("deferred", "deferred", None, full),
        ("deferred+clip", "deferred", 1.0, full),
        ("deferred+accum2+clip", "deferred", 1.0, half),
    ]
    for name, schedule, clip, batches in variants:
        engine.cfg = dataclasses.replace(engine.cfg, schedule=schedule)
        engine.optim_cfg = dataclasses.replace(engine.optim_cfg, max_grad_norm=clip)
        times = _time_steps(engine, batches, args.steps, args.warmup)
        med = statistics.median(times)
        results[name] = {"median_step_s": med, "tokens_per_s": bsz * seq / med, "step_times_s": times}
        print(f"{name:24s} median step {med:.3f} s  {bsz * seq / med:,.0f} tokens/s", flush=True)
    mem = engine.memory_report()
    out = {
        "command": "python benchmarks/bench_schedules.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": args.model,
        "num_params": engine.num_params,
        "batch_size": bsz,
        "seq_len": seq,
        "window": args.window,
        "build_s": build_s,
        "results": results,
        "memory_report": mem,
        "host_rss_bytes": psutil.Process().memory_info().rss,
        "gpu_max_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        "gpu_max_reserved_bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_count": psutil.cpu_count(),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=1, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
    engine.close()


if __name__ == "__main__":
    main()
