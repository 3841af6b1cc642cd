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

from typing import Any

import torch
import torch.distributed as dist

from slideformer.dist.group import collective
from slideformer.memory.host_state import HostUnit
from slideformer.optim.adamw import FlatAdamW
from slideformer.runtime.device import DeviceOps
from slideformer.runtime.grad_pipeline import GradPipeline, _Parked
from slideformer.runtime.transfer import Update

# torch >= 2.13 renames reduce_scatter_tensor / all_gather_into_tensor (deprecated there) to
# reduce_scatter_single / all_gather_single, same signatures; torch 2.11 has only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
            _all_gather(whole, own, group=group)
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

    def reduce(self, unit: HostUnit, grad: torch.Tensor) -> torch.Tensor:
        """Sum ``grad`` (the unit's padded slot gradient) over the ranks; return this rank's shard of it.

        Runs on the downloader thread inside its stream: the collective waits for the compute event the
        downloader already waited on, and the shard's copies queue behind it.
        """
        if unit.numel != unit.padded:
            grad[unit.numel:unit.padded].zero_()  # the padding may hold a neighbour's gradient: adds nothing
        with collective(f"reducing the gradient of {unit.name}"):
            if not unit.sharded:
                dist.all_reduce(grad, group=self.grad_group)  # replicated unit: every rank needs the whole sum
                return grad[:unit.numel]
            if self.shard_buf is None:
                # gloo: all_reduce + slice (the sum of reduce-scatter at `world` times the bytes; CPU only).
                dist.all_reduce(grad, group=self.grad_group)
                return grad[unit.shard_lo:unit.shard_lo + unit.shard_len]
            out = self.shard_buf[:unit.shard_len]
            _reduce_scatter(out, grad, group=self.grad_group)  # downloader stream, after the compute event
            return out

    def _apply(self, it: _Parked, lo: int, hi: int, grad: torch.Tensor) -> None:
        if isinstance(it.action, Update):
            # The overlap schedule never accumulates: measure the shard's norm as it is consumed.
            if lo == 0:
                it.unit.sq_norm = 0.0
            it.unit.sq_norm += float(torch.linalg.vector_norm(grad, dtype=torch.float32)) ** 2
        super()._apply(it, lo, hi, grad)

    def global_sq(self, units: list[HostUnit]) -> float:
        """Sum over ranks of the shards' squared norms; a replicated unit counts on rank 0 only."""
        local = sum(u.sq_norm for u in units if u.sharded or self.rank == 0)
        t = torch.tensor([local], dtype=torch.float64)
        with collective("summing the gradient norm"):
            dist.all_reduce(t, group=self.optim_group)  # the optimizer thread's own group: same order everywhere
        return float(t[0])
