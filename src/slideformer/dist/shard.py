"""Flat shard math and the per-unit collectives of a data-parallel run.

A unit's flat layout (``memory.host_state``) is padded to ``world * ceil(numel / world)``; rank r owns
``[r * size, (r + 1) * size)``. Gradients: the downloader thread reduces each unit's slot gradient over
the ranks on its own stream (NCCL ``reduce_scatter_tensor``; gloo, which lacks a reduce-scatter on the
torch versions we support, does ``all_reduce`` + slice: same sum, ``world`` times the bytes, CPU CI only)
and downloads only this rank's shard. Weights: the upload thread copies this rank's shard into the slot
and ``all_gather_into_tensor`` fills in the rest (gloo: same call, run on the host).

Every unit is sharded, the embedding too: its forward selects the batch's rows on the device from the
whole matrix, uploaded and all-gathered into the vocabulary slot like any unit (``runtime/step.py``), so
no rank keeps more than 1/N of the vocabulary's state or repeats its AdamW. (``shard_units`` can still
keep units whole on every rank: their gradient is then all-reduced and every rank applies the same update.)

Invariant: the padding of a sharded unit is zero in the slot gradient before every reduction (so it adds
nothing to the norm and its master stays zero); the shard buffer on the device is reused only in the
downloader stream's order after the previous shard's copies.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist

from slideformer.dist.group import collective
from slideformer.memory.host_state import HostUnit
from slideformer.optim.adamw import FlatAdamW
from slideformer.runtime.device import DeviceOps, add_squared_norm
from slideformer.runtime.grad_order import Parked
from slideformer.runtime.grad_pipeline import GradPipeline
from slideformer.runtime.transfer import Update

# torch >= 2.13 renames reduce_scatter_tensor / all_gather_into_tensor (deprecated there) to
# reduce_scatter_single / all_gather_single, same signatures; torch 2.11 has only the old names.
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_size(numel: int, world: int) -> int:
    """Elements per rank of a unit of ``numel`` elements (its padded length is ``world`` times this)."""
    return -(-numel // world)


def shard_units(units: list[HostUnit], rank: int, world: int, replicated: set[int]) -> None:
    """Shard every unit except those in ``replicated`` (unit indices), which get their whole state on
    every rank; frees each full master as it goes."""
    placeholder = torch.zeros(1)
    for u in units:
        if u.index in replicated:
            u.shard(0, 1, placeholder)  # the whole unit: master + zero moments
            u.point_params_to_master()
        else:
            u.shard(rank, world, placeholder)


def make_gather(group: Any, world: int) -> Any:
    """``gather(whole, own)``: all-gather ``own`` (this rank's part of ``whole``) into ``whole``, on the
    caller's current stream (the upload stream), in place."""
    def gather(whole: torch.Tensor, own: torch.Tensor) -> None:
        if whole.numel() != own.numel() * world:
            raise RuntimeError(f"all-gather of {own.numel()} x {world} into {whole.numel()} elements")
        with collective("all-gathering a unit's weights"):
            # In place (own is a view of whole): NCCL reads it before any rank's output lands there.
            all_gather(whole, own, group=group)
    return gather


class ShardedGradPipeline(GradPipeline):
    """The gradient pipeline with a cross-rank reduction before the download (see the module docstring).

    Also measures each consumed shard's squared norm for the overlap schedule, and sums the step's
    squared norm over the ranks (the replicated embedding counted once).
    """

    def __init__(self, ops: DeviceOps, chunk: int, pool_chunks: int, dtype: torch.dtype, adam: FlatAdamW, *,
                 rank: int, world: int, backend: str, grad_group: Any, optim_group: Any, max_shard: int) -> None:
        super().__init__(ops, chunk, pool_chunks, dtype, adam)
        self.rank, self.world, self.backend = rank, world, backend
        self.grad_group, self.optim_group = grad_group, optim_group
        # Reduce-scatter output, allocated once; reused in downloader-stream order.
        self.shard_buf = ops.empty(max_shard, dtype) if backend == "nccl" else None
        # The overlap schedule's squared norm of this rank's reduced shards, summed on the device in the
        # downloader's stream (a host pass over every gradient would cost the optimizer thread as much
        # memory bandwidth as a third of AdamW), and a ring of pinned host slots it is copied out to.
        self.sq_acc = torch.zeros(1, dtype=torch.float32, device=ops.device)
        self.norm_scratch = torch.zeros(2, dtype=torch.float32, device=ops.device)  # downloader-stream order
        self.sq_host = ops.host_empty(4, torch.float32)
        self._sq_next = 0
        self._sq_ready: deque[Future] = deque()

    def reduce(self, unit: HostUnit, grad: torch.Tensor, measure: bool) -> torch.Tensor:
        """Sum ``grad`` (the unit's padded slot gradient) over the ranks; return this rank's shard of it.

        Runs on the downloader thread inside its stream: the collective waits for the compute event the
        downloader already waited on, and the shard's copies queue behind it.
        """
        if unit.numel != unit.padded:
            grad[unit.numel:unit.padded].zero_()  # the padding may hold a neighbour's gradient: adds nothing
        with collective(f"reducing the gradient of {unit.name}"):
            if not unit.sharded:
                dist.all_reduce(grad, group=self.grad_group)  # replicated unit: every rank needs the whole sum
                out = grad[:unit.numel]
            elif self.shard_buf is None:
                # gloo: all_reduce + slice (the sum of reduce-scatter at `world` times the bytes; CPU only).
                dist.all_reduce(grad, group=self.grad_group)
                out = grad[unit.shard_lo:unit.shard_lo + unit.shard_len]
            else:
                out = self.shard_buf[:unit.shard_len]
                reduce_scatter(out, grad, group=self.grad_group)  # downloader stream, after the compute event
        if measure and (unit.sharded or self.rank == 0):  # a replicated unit counts once, on rank 0
            add_squared_norm(self.sq_acc[0], out, self.norm_scratch)  # downloader stream
        return out

    def end_step(self) -> None:
        # Queued behind the step's downloads on the downloader thread, so the copy follows every addition
        # of this step and the reset precedes every addition of the next.
        self._sq_ready.append(self.down.submit(self._close_norm))

    def _close_norm(self) -> tuple[int, Any]:
        k = self._sq_next
        self._sq_next = (k + 1) % self.sq_host.numel()  # a step is read before the next but one is closed
        with self.ops.on(self.down.stream):
            self.ops.copy(self.sq_host[k:k + 1], self.sq_acc)
            event = self.ops.record(self.down.stream)
            self.sq_acc.zero_()  # stream order: after the copy above read it
        return k, event

    def _apply(self, it: Parked, lo: int, hi: int, grad: torch.Tensor) -> None:
        if isinstance(it.action, Update) and lo == 0:
            it.unit.sq_norm = 0.0  # measured on the device (reduce); the host part is the deferred schedule's
        super()._apply(it, lo, hi, grad)

    def global_sq(self, units: list[HostUnit]) -> float:
        """Sum over ranks of the step's squared norm: the device-measured shards of the overlap schedule plus
        the host-measured accumulations of the deferred one; a replicated unit counts on rank 0 only."""
        k, event = self._sq_ready.popleft().result()  # end_step queued it before this task was submitted
        self.ops.host_wait(event)  # the copy of the device-side sum has landed
        local = float(self.sq_host[k]) + sum(u.sq_norm for u in units if u.sharded or self.rank == 0)
        t = torch.tensor([local], dtype=torch.float64)
        with collective("summing the gradient norm"):
            dist.all_reduce(t, group=self.optim_group)  # the optimizer thread's own group: same order everywhere
        return float(t[0])
