"""Process groups of a data-parallel run: start from torchrun's environment, topology, backends.

Owns ``init_process_group`` and the groups the engine's threads use. Collectives of one communicator
must be issued in the same order on every rank, and the engine issues them from several threads
(uploaders, gradient downloader, optimizer, main thread: host scalars on gloo, the resident layers' sums
on the device backend), so each thread gets a group of its own per backend and
issues its collectives in its own task order, which the schedule makes identical on every rank.

Invariant: the device groups (gradients, weights) use NCCL on GPUs and gloo on the CPU; the scalar
groups (token counts, flags, norms, checkpoint gathers) always use gloo on host tensors, so they never
synchronise a CUDA stream. Every group's timeout is the engine watchdog's, so a dead rank ends the
others with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from slideformer.errors import ConfigError, DistError


@dataclass(frozen=True)
class Topology:
    """Where this process sits: global rank and world, rank and process count on its node."""

    rank: int
    world: int
    local_rank: int
    local_world: int

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))


def env_topology() -> Topology | None:
    """The topology torchrun (or any launcher setting RANK/WORLD_SIZE) describes; None for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    try:
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or malformed ({e}); "
                          "launch with torchrun") from None
    return Topology(rank, world, local, local_world)


@dataclass
class Groups:
    """One communicator per issuing thread (see the module docstring)."""

    backend: str
    grads: Any
    """Gradient reduce-scatter: the downloader thread (device backend)."""
    layer_up: Any
    """All-gather of sharded layers: the layer upload thread (device backend)."""
    vocab_up: Any
    """All-gather of the sharded head: the vocabulary upload thread (device backend)."""
    main: Any
    """Host scalars, barriers and checkpoint gathers: the main thread (gloo)."""
    optim: Any
    """The global gradient norm: the optimizer thread (gloo)."""
    resident: Any
    """The resident layers' gradient sums and start-up gathers, on the compute stream: the main thread
    (device backend)."""


def init_from_env(device_type: str, timeout_s: float) -> tuple[Topology, Groups]:
    """Join the run torchrun started; ``device_type`` 'cuda' selects NCCL and the LOCAL_RANK GPU."""
    topo = env_topology()
    if topo is None:
        raise ConfigError("init_from_env needs WORLD_SIZE > 1 (launch with torchrun --nproc-per-node N)")
    backend = "gloo"
    if device_type == "cuda":
        if torch.cuda.device_count() <= topo.local_rank:
            raise ConfigError(f"LOCAL_RANK={topo.local_rank} but only {torch.cuda.device_count()} GPUs are "
                              "visible; use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(topo.local_rank)
        backend = "nccl"
    timeout = dt.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kw: dict[str, Any] = {}
        if backend == "nccl":
            kw["device_id"] = torch.device("cuda", topo.local_rank)
        dist.init_process_group(backend, timeout=timeout, **kw)
    # Same creation order on every rank (new_group is itself collective).
    groups = Groups(backend, dist.new_group(backend=backend, timeout=timeout),
                    dist.new_group(backend=backend, timeout=timeout),
                    dist.new_group(backend=backend, timeout=timeout),
                    dist.new_group(backend="gloo", timeout=timeout),
                    dist.new_group(backend="gloo", timeout=timeout),
                    dist.new_group(backend=backend, timeout=timeout))
    warm_up(groups, device_type)
    return topo, groups


def warm_up(groups: Groups, device_type: str) -> None:
    """One tiny collective per group, from this (main) thread, in the same order on every rank.

    NCCL creates a communicator on its first collective, and that creation is itself a blocking collective:
    left to the worker threads, several communicators of one GPU would be created concurrently, in an
    order that differs between ranks, which can deadlock. Creating them here, one after the other, leaves
    the threads only ordinary collectives.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    for g in (groups.grads, groups.layer_up, groups.vocab_up, groups.resident):
        with collective("creating the device communicators"):
            dist.all_reduce(torch.zeros(1, device=device), group=g)  # creates g's communicator on every rank
    if device_type == "cuda":
        torch.cuda.synchronize()  # start-up only: the communicators exist before any worker thread uses one
    for g in (groups.main, groups.optim):
        with collective("creating the host groups"):
            dist.all_reduce(torch.zeros(1), group=g)


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective into a ``DistError`` that says what this rank was doing and why it failed."""
    try:
        yield
    except DistError:
        raise
    except (RuntimeError, OSError) as e:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistError(f"rank {rank}: {what} with the other ranks failed ({first}); another rank most likely "
                        "exited or crashed (its log has the cause) or stalled past engine.watchdog_s") from e


def all_sum(value: float, group: Any) -> float:
    """Sum of ``value`` over the ranks of ``group`` (float64 on the host; blocks this thread)."""
    t = torch.tensor([value], dtype=torch.float64)
    with collective("a sum of host scalars"):
        dist.all_reduce(t, group=group)  # a host scalar: returns when every rank contributed
    return float(t[0])


def any_true(flag: bool, group: Any) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    with collective("agreeing on a flag"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # every rank must reach the same decision
    return bool(t[0])


def barrier(group: Any) -> None:
    """Wait for every rank (a gloo group: no device sync)."""
    with collective("a barrier"):
        dist.barrier(group=group)  # e.g. rank 0 finished writing a checkpoint the others will read


def broadcast_str(value: str, group: Any) -> str:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    with collective("a broadcast from rank 0"):
        dist.broadcast_object_list(box, src=0, group=group)  # every rank leaves with rank 0's string
    return str(box[0])


def shutdown() -> None:
    """Destroy the process groups (end of run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
