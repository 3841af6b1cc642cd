"""Checkpoints of a data-parallel run in the single-process format: gathered to rank 0, sliced on load.

``Engine.state_dict()`` of a sharded engine maps each HF parameter name to a ``ShardedTensor`` per part
(master, exp_avg, exp_avg_sq). Saving: ``checkpoint.save`` asks each one for its values in file order;
the first parameter of a unit gathers that unit's part to rank 0 (one unit at a time, never the whole
model twice), the unit's other parameters are views of that buffer. The other ranks make the same
calls (``drain``) and contribute their shards. Loading: ``tensor_io.read_into`` hands each full tensor
from the file to ``copy_``, which keeps this rank's slice. So N-rank checkpoints load on M ranks.

Invariant: every rank requests the gathers in the same order (the state dict's order); a unit's
gathered buffer is dropped as soon as the next unit is requested.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from slideformer.errors import ConfigError
from slideformer.memory.host_state import HostUnit, ParamSpec
from slideformer.train.tensor_io import TensorSpec

PARTS = ("params", "exp_avg", "exp_avg_sq")


class _UnitGatherer:
    """Gathers one part of one unit at a time to rank 0 (over the main thread's gloo group)."""

    def __init__(self, rank: int, world: int, group: Any) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.key: tuple[int, str] | None = None
        self.full: torch.Tensor | None = None

    def get(self, unit: HostUnit, part: str) -> torch.Tensor:
        """The whole FP32 ``part`` of ``unit`` (flat, unpadded) on rank 0; a placeholder elsewhere."""
        if self.key != (unit.index, part):
            self.key, self.full = (unit.index, part), None  # drop the previous unit before gathering
            own = _third(unit, part)
            if not unit.sharded:
                self.full = own
            else:
                out = [torch.empty_like(own) for _ in range(self.world)] if self.rank == 0 else None
                dist.gather(own, out, dst=0, group=self.group)  # every rank calls this in state-dict order
                self.full = torch.cat(out)[:unit.numel] if out is not None else own
        if self.full is None:
            raise RuntimeError("gather produced nothing")
        return self.full


def _third(unit: HostUnit, part: str) -> torch.Tensor:
    return {"params": unit.master, "exp_avg": unit.exp_avg, "exp_avg_sq": unit.exp_avg_sq}[part]


class ShardedTensor:
    """One parameter's part in a sharded engine: full ``shape`` for the file, this rank's slice in memory."""

    def __init__(self, unit: HostUnit, spec: ParamSpec, part: str, gatherer: _UnitGatherer) -> None:
        self.unit, self.spec, self.part, self.gatherer = unit, spec, part, gatherer
        self.shape = spec.shape
        self.dtype = torch.float32

    def value(self) -> torch.Tensor:
        """The full tensor on rank 0 (collective: every rank calls it, in state-dict order)."""
        full = self.gatherer.get(self.unit, self.part)
        if self.gatherer.rank != 0:
            return torch.zeros(()).expand(self.shape)  # not written anywhere: no bytes
        return full[self.spec.offset:self.spec.offset + self.spec.numel].view(self.shape)

    def spec_for(self, name: str, dtype: torch.dtype | None = None) -> TensorSpec:
        """The ``tensor_io`` spec that writes this parameter as ``dtype`` (default FP32; values gathered when due)."""
        return TensorSpec(name, tuple(self.shape), dtype or torch.float32, self.value)

    def copy_(self, src: torch.Tensor) -> ShardedTensor:
        """Keep this rank's slice of the full tensor ``src`` (loading: no collective)."""
        u, s = self.unit, self.spec
        lo = max(s.offset, u.shard_lo)
        hi = min(s.offset + s.numel, u.shard_lo + u.shard_len)
        if hi > lo:
            flat = src.reshape(-1)
            _third(u, self.part)[lo - u.shard_lo:hi - u.shard_lo].copy_(flat[lo - s.offset:hi - s.offset])
        return self


def state_dict(units: list[HostUnit], rank: int, world: int, group: Any, step: int) -> dict[str, Any]:
    """``Engine.state_dict()`` of a sharded engine (see the module docstring)."""
    gatherer = _UnitGatherer(rank, world, group)
    out: dict[str, Any] = {part: {} for part in PARTS}
    for part in PARTS:
        for u in units:
            for spec in u.params:
                out[part][spec.name] = ShardedTensor(u, spec, part, gatherer)
    out["step"] = step
    out["unit_steps"] = [u.step for u in units]
    return out


def drain(state: dict[str, Any]) -> None:
    """What ranks other than 0 do while rank 0 writes ``state``: the same gathers, in file order
    (``checkpoint._engine_specs``: params, then exp_avg, then exp_avg_sq)."""
    for part in PARTS:
        for t in state[part].values():
            t.value()


def load_state_dict(units: list[HostUnit], state: dict[str, Any]) -> None:
    """Load a state dict whose values are full tensors or this engine's own ``ShardedTensor`` handles
    (already filled in place by ``checkpoint.load``)."""
    for part in PARTS:
        values = state.get(part, {})
        for u in units:
            for spec in u.params:
                src = values.get(spec.name)
                if src is None:
                    if part == "params":
                        raise ConfigError(f"state dict is missing parameter {spec.name}")
                    ShardedTensor(u, spec, part, _UnitGatherer(0, 1, None)).copy_(torch.zeros(spec.shape))
                elif isinstance(src, torch.Tensor):
                    ShardedTensor(u, spec, part, _UnitGatherer(0, 1, None)).copy_(src)
    steps = state.get("unit_steps") or [int(state.get("step", 0))] * len(units)
    for u, s in zip(units, steps):
        u.step = int(s)
        u.version += 1


def full_state(units: list[HostUnit], world: int, group: Any, part: str = "params") -> dict[str, torch.Tensor]:
    """Every parameter's full ``part`` on every rank (all-gather; for tests and small models)."""
    out: dict[str, torch.Tensor] = {}
    for u in units:
        own = _third(u, part)
        if u.sharded:
            parts = [torch.empty_like(own) for _ in range(world)]
            dist.all_gather(parts, own.contiguous(), group=group)  # every rank, unit by unit
            full = torch.cat(parts)[:u.numel]
        else:
            full = own
        for spec in u.params:
            out[spec.name] = full[spec.offset:spec.offset + spec.numel].view(spec.shape).clone()
    return out
