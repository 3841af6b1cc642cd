"""Worker side of the data-parallel CPU tests: ``python -m tests.dist_harness SCENARIO JSON`` as one rank.

The environment carries RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun would set
them. Every rank draws the same global batches (seeded) and trains on its own slice; rank 0 writes what
the test compares (losses, gathered parameters and moments) to ``out`` with ``torch.save``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from tests.reference import make_model, random_batch, tiny_config

from slideformer import Engine, EngineConfig, OptimConfig
from slideformer.dist import DistContext
from slideformer.train import checkpoint

LR, WD = 1e-4, 0.1
ROWS = 3
SEQ = 11


def global_batches(vocab: int, steps: int, world: int, accumulate: int, seed: int = 1) -> list[list[list[dict]]]:
    """[step][rank][micro-batch] batches, identical on every rank (and in the test process)."""
    gen = torch.Generator().manual_seed(seed)
    return [[[random_batch(vocab, ROWS, SEQ, gen) for _ in range(accumulate)] for _ in range(world)]
            for _ in range(steps)]


def engine_configs(args: dict[str, Any]) -> tuple[EngineConfig, OptimConfig]:
    return (EngineConfig(device=args.get("device", "cpu"), compute_dtype=args.get("dtype", "float32"),
                         schedule=args["schedule"],
                         chunk_mib=args.get("chunk_mib", 1 / 16), staging_chunks=2, loss_chunk_tokens=16,
                         watchdog_s=args.get("watchdog_s", 60.0), window=args.get("window", 2),
                         host_copy=args.get("host_copy", "none"), resident_layers=args.get("resident", 0)),
            OptimConfig(lr=LR, weight_decay=WD, max_grad_norm=args.get("max_norm")))


def main(scenario: str, args: dict[str, Any]) -> None:
    """``suite``: every run of ``args['runs']`` in turn in the same process group; else one run."""
    runs = args["runs"] if scenario == "suite" else [dict(args, scenario=scenario)]
    ctx = None
    for r in runs:
        ctx = run(r["scenario"], r)
    if ctx is not None:
        ctx.shutdown()


def run(scenario: str, args: dict[str, Any]) -> DistContext:
    cfg = tiny_config(args["family"], layers=args.get("layers", 3))
    ecfg, ocfg = engine_configs(args)
    ctx, ecfg = DistContext.from_env(ecfg)
    if args.get("init") == "random":  # streamed, sharded initialisation (runtime/build.py)
        engine = Engine.from_config(cfg, ecfg, ocfg, seed=3, dist=ctx)
    elif args.get("init") == "load":
        engine = Engine.from_pretrained(args["model_dir"], ecfg, ocfg, dist=ctx)
    else:
        engine = Engine(make_model(cfg), ecfg, ocfg, dist=ctx)
    steps, acc = args["steps"], args["accumulate"]
    first = 0
    if args.get("resume"):  # continue a checkpoint saved by any number of ranks, from its step on
        sd = engine.state_dict()
        state = checkpoint.load(checkpoint.latest(Path(args["resume"])), sd)
        first = int(state["engine_step"])
        sd["step"], sd["unit_steps"] = first, None
        engine.load_state_dict(sd)
    batches = global_batches(cfg.vocab_size, first + steps, ctx.world, acc)[first:]
    losses, norms = [], []
    for s in range(steps):
        if scenario == "fail" and s == 1 and ctx.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        mbs = batches[s][ctx.rank]
        res = engine.train_step(mbs if acc > 1 else mbs[0])
        losses.append(res.loss)
        norms.append(res.grad_norm)
    out: dict[str, Any] = {"losses": losses, "norms": norms}
    if steps:  # forward-only through the sharded window (every rank evaluates its own first batch)
        out["eval"] = engine.eval_loss(batches[0][ctx.rank][0])
    if scenario == "checkpoint":
        sd = engine.state_dict()
        if ctx.is_main:
            checkpoint.save(Path(args["ckpt"]), steps, sd, {"note": "dist test"})
        else:
            from slideformer.dist import state

            state.drain(sd)
        ctx.barrier()  # rank 0's checkpoint is complete before anyone reads or exits
    for part in ("params", "exp_avg", "exp_avg_sq"):
        out[part] = ctx.full_params(engine, part)
    out["memory"] = engine.memory_report()
    engine.close()
    if ctx.is_main:
        torch.save(out, args["out"])
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(scenario: str, args: dict[str, Any], world: int = 2, timeout: float = 120.0) -> list[subprocess.Popen]:
    """Start ``world`` ranks of ``scenario`` as subprocesses (what torchrun does); returns them running."""
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="2", PYTHONPATH=f"{root / 'src'}{os.pathsep}{root}")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.dist_harness", scenario, json.dumps(args)],
                                      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(sys.argv[1], json.loads(sys.argv[2]))
