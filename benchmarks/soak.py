"""Soak: many steps of a small model at window depths 1-3; host RSS, pinned bytes and GPU memory must stay
flat after warm-up (within 1%), and nothing may hang (the engine's watchdog turns a stall into an error).

Usage:
  python benchmarks/soak.py --steps 1000 --out soak.json            # on the GPU box (issue 6)
  python benchmarks/soak.py --device cpu --steps 300 --out soak.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import psutil
import torch
import transformers

from shapes import hf_config
from slideformer import Engine, EngineConfig, OptimConfig

VARIANTS = [  # (window, schedule, clip, resident layers)
    (1, "auto", None, 0),
    (2, "deferred", 1.0, 0),
    (3, "auto", None, 0),
    (2, "auto", None, 2),
]


def _sample(engine: Engine, device: str) -> dict[str, float]:
    gc.collect()
    rep = engine.memory_report()
    return {
        "rss_mib": psutil.Process().memory_info().rss / 2**20,
        "pinned_mib": rep["pinned_bytes"] / 2**20,
        "gpu_allocated_mib": torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else 0.0,
        "gpu_reserved_mib": torch.cuda.memory_reserved() / 2**20 if device.startswith("cuda") else 0.0,
    }


def _flat(series: list[float], tolerance: float) -> bool:
    return not series or max(series) <= min(series) * (1 + tolerance) + 1.0  # +1 MiB for sampling noise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cfg = hf_config(args.model)
    results = []
    ok = True
    for window, schedule, clip, resident in VARIANTS:
        engine = Engine.from_config(cfg, EngineConfig(device=args.device, window=window, schedule=schedule,
                                                      resident_layers=resident, watchdog_s=120),
                                    OptimConfig(lr=1e-5, max_grad_norm=clip))
        gen = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen)}
                   for _ in range(8)]
        samples, losses = [], []
        t0 = time.perf_counter()
        for i in range(args.steps):
            res = engine.train_step(batches[i % len(batches)])
            losses.append(res.loss)
            if i + 1 >= args.warmup and (i + 1) % args.every == 0:
                _ = res.grad_norm  # the step's gradients were all processed
                samples.append({"step": i + 1, **_sample(engine, args.device)})
        engine.flush()
        wall = time.perf_counter() - t0
        engine.close()
        flat = {k: _flat([s[k] for s in samples], args.tolerance)
                for k in ("rss_mib", "pinned_mib", "gpu_allocated_mib", "gpu_reserved_mib")}
        ok &= all(flat.values())
        results.append({"window": window, "schedule": schedule, "clip": clip, "resident_layers": resident,
                        "steps": args.steps, "wall_s": wall, "flat": flat, "samples": samples,
                        "first_loss": losses[0], "last_loss": losses[-1]})
        print(f"window {window} {schedule:8s} clip={clip} resident={resident}: {args.steps} steps in {wall:.0f} s, "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, flat {flat}", flush=True)
    out = {
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "tolerance": args.tolerance, "all_flat": ok, "variants": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print("all flat" if ok else "NOT flat", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
