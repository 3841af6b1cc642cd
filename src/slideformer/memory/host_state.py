"""Host-side training state: one flat FP32 buffer per unit holding master weights and AdamW moments.

A *unit* is what slides through the device as one piece: the embedding, one decoder layer, or the
head (final norm, plus the LM head when it is not tied). Its buffer is ``[params | exp_avg |
exp_avg_sq]``; inside each third, parameters that get weight decay come first, so that every AdamW
call sees at most two contiguous segments. The HF ``nn.Parameter`` objects are re-pointed at views of
the master third, so the HF model *is* the FP32 master model whenever it is on the host.

With the moments offloaded to disk (``memory/offload.py``) the buffer is only ``[params]``, and one
piece of the moments at a time is reachable through ``moment_slices`` while the optimizer has it bound
to a ring buffer. With the masters offloaded too (``engine.offload='all'``, streamed decoder layers only)
there is no buffer at all once the master is on disk (``release_master``): the HF parameters point at a
zero-byte placeholder between slot bindings, and ``master_slice`` reaches the bound piece of the master in
the same ring buffer; everything else reads the master through the offload files.

With ``engine.host_copy`` a streamed unit also keeps ``upload_copy``: its master (this rank's shard) in
the compute dtype, in pinned memory, allocated once. The CPU AdamW writes it in the same pass as the
update; anything else that writes the master calls ``refresh_upload_copies``.

Invariant: 12 bytes per parameter (4 with the moments on disk, 0 with the master on disk too; plus 4,
or 2 in BF16, for the gradient buffer of the deferred schedule; plus 2 for the upload copy); no BF16 copy
of a unit's weights lives on the host outside the shared staging pools and the upload copies. Whenever a
unit's update future is done, its ``upload_copy`` is bitwise ``master.to(copy dtype)`` (round to nearest
even).

Data-parallel runs (``slideformer.dist``) *shard* a unit: its flat layout is padded to a multiple of
the world size and this rank keeps only ``[shard_lo, shard_lo + shard_len)`` of it, so the thirds and
the gradient buffer are ``shard_len`` long and every optimizer offset is shard-local. Unsharded,
``shard_lo = 0`` and ``shard_len = padded = numel``. (Sharding and the disk tier are not combined yet.)
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from slideformer.errors import SlideformerError


@dataclass
class ParamSpec:
    """One parameter's place inside its unit's flat buffer."""

    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    decay: bool


def _done_future() -> Future:
    fut: Future = Future()
    fut.set_result(None)
    return fut


class HostUnit:
    """Flat FP32 master weights + AdamW moments (+ optional gradient accumulator) for one unit."""

    def __init__(self, index: int, name: str, params: list[tuple[str, nn.Parameter]]) -> None:
        self.index = index
        self.name = name
        ordered = [p for p in params if p[1].dim() >= 2] + [p for p in params if p[1].dim() < 2]
        self.params: list[ParamSpec] = []
        offset = 0
        for pname, p in ordered:
            self.params.append(ParamSpec(pname, p, offset, p.numel(), p.shape, p.dim() >= 2))
            offset += p.numel()
        self.numel = offset
        self.n_decay = sum(s.numel for s in self.params if s.decay)
        self.flat: torch.Tensor | None = None
        self.grad_acc: torch.Tensor | None = None
        self.step = 0
        self.version = 0
        """Bumped (by the main thread) each time an update of this unit is scheduled."""
        self.update_future: Future = _done_future()
        """Completes when the most recently scheduled update has been applied."""
        self.registered = False
        """True when the master third is page-locked in place (uploads DMA it as FP32; the GPU casts)."""
        self.upload_copy: torch.Tensor | None = None
        """``engine.host_copy``: the master (``shard_len`` elements) in the compute dtype, pinned; uploads DMA
        it as is. Written by the optimizer with each update, rebuilt by ``refresh_upload_copies``."""
        self.sq_norm = 0.0
        """Squared L2 norm of this unit's gradient for the step (written by the gradient worker)."""
        self.shard_lo = 0
        """First element of the flat (padded) layout this rank owns (0 unless sharded)."""
        self.shard_len = self.numel
        """Elements this rank owns: the length of each third and of the gradient buffer."""
        self.padded = self.numel
        """The flat length padded to a multiple of the world size (``numel`` unless sharded)."""
        self.moments_on_disk = False
        self.moments: torch.Tensor | None = None
        """With the moments on disk: the ring buffer holding the bound piece, ``exp_avg`` of elements
        ``[moments_lo, moments_lo + moments_n)`` at 0 and their ``exp_avg_sq`` at ``moments_voff``."""
        self.moments_lo = 0
        self.moments_n = 0
        self.moments_voff = 0
        self.master_on_disk = False
        """``engine.offload='all'``: the FP32 master lives in the offload file; while a piece is bound, its
        master is in ``moments`` at ``master_off`` (``master_slice``)."""
        self.master_off = 0

    @property
    def sharded(self) -> bool:
        """True when this rank holds only a shard of the unit (data-parallel runs)."""
        return self.shard_len != self.numel or self.padded != self.numel

    # -- allocation -----------------------------------------------------------------------------
    def allocate(self, with_grad_acc: bool, master_only: bool = False, moments_on_disk: bool = False) -> None:
        """Allocate the flat buffer (moments zeroed, or left to the disk) and, if asked, the FP32 gradient
        accumulator.

        ``master_only``: just the full master third, to be initialised and then sharded (``shard``).
        """
        self.moments_on_disk = moments_on_disk
        self.flat = torch.empty((1 if master_only or moments_on_disk else 3) * self.numel, dtype=torch.float32)
        self.flat[self.numel:].zero_()
        if with_grad_acc:
            self.grad_acc = torch.zeros(self.numel, dtype=torch.float32)

    def ensure_grad_acc(self, dtype: torch.dtype = torch.float32) -> None:
        """Allocate the gradient accumulator (of ``dtype``) the first time the deferred schedule needs it."""
        if self.grad_acc is None or self.grad_acc.dtype != dtype:
            self.grad_acc = None
            self.grad_acc = torch.zeros(self.shard_len, dtype=dtype)

    @property
    def master(self) -> torch.Tensor:
        if self.master_on_disk:
            raise SlideformerError(f"the master weights of {self.name} are on disk: use master_slice (bound pieces), "
                                   "Engine.state_dict or Engine.hf_model (the files)")
        return self._third(0)

    @property
    def exp_avg(self) -> torch.Tensor:
        return self._third(1)

    @property
    def exp_avg_sq(self) -> torch.Tensor:
        return self._third(2)

    def _third(self, k: int) -> torch.Tensor:
        if self.flat is None:
            raise RuntimeError(f"unit {self.name} is not allocated")
        if k > 0 and self.moments_on_disk:
            raise SlideformerError(f"the moments of {self.name} are on disk: use moment_slices (bound pieces) or "
                                   "Engine.state_dict (the files)")
        return self.flat[k * self.shard_len:(k + 1) * self.shard_len]

    def moment_slices(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of elements ``[lo, hi)``: views of the flat buffer, or of the bound ring piece."""
        if not self.moments_on_disk:
            return self.exp_avg[lo:hi], self.exp_avg_sq[lo:hi]
        a, b = lo - self.moments_lo, hi - self.moments_lo
        if self.moments is None or a < 0 or b > self.moments_n:
            raise SlideformerError(f"{self.name}[{lo}:{hi}]: its moments are on disk and not bound")
        v = self.moments_voff
        return self.moments[a:b], self.moments[v + a:v + b]

    def master_slice(self, lo: int, hi: int) -> torch.Tensor:
        """Master elements ``[lo, hi)``: a view of the flat buffer, or of the bound ring piece (master on disk)."""
        if not self.master_on_disk:
            return self.master[lo:hi]
        a, b = lo - self.moments_lo, hi - self.moments_lo
        if self.moments is None or a < 0 or b > self.moments_n:
            raise SlideformerError(f"{self.name}[{lo}:{hi}]: its master is on disk and not bound")
        return self.moments[self.master_off + a:self.master_off + b]

    def release_master(self, placeholder: torch.Tensor) -> None:
        """The master is in its offload file now (``memory/offload.py``): free the host buffer and point the
        HF parameters at ``placeholder`` (expanded, no bytes) until a slot or a file view is bound to them."""
        if not self.moments_on_disk or self.sharded:
            raise SlideformerError(f"{self.name}: only an unsharded unit with its moments on disk can put its "
                                   "master on disk")
        self.master_on_disk = True
        self.flat = None
        for spec in self.params:
            spec.param.data = placeholder.expand(spec.shape)

    def view(self, flat: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
        """The view of ``spec`` inside a flat tensor laid out like this unit."""
        return flat[spec.offset:spec.offset + spec.numel].view(spec.shape)

    def point_params_to_master(self, master: torch.Tensor | None = None) -> None:
        """Make the HF parameters alias this unit's FP32 master weights (a shard has no full view: no-op);
        ``master``: the master's flat tensor when it is not the host buffer (a view of its offload file)."""
        if self.sharded or (master is None and self.master_on_disk):
            return
        for spec in self.params:
            spec.param.data = self.view(self.master if master is None else master, spec)

    def host_bytes(self) -> int:
        extra = self.grad_acc.numel() * self.grad_acc.element_size() if self.grad_acc is not None else 0
        if self.upload_copy is not None:
            extra += self.upload_copy.numel() * self.upload_copy.element_size()
        return (self.flat.numel() * 4 if self.flat is not None else 0) + extra

    def decay_segments(self, lo: int, hi: int) -> list[tuple[int, int, bool]]:
        """Split ``[lo, hi)`` (shard-local) at the decay boundary: [(lo, hi, decay), ...]."""
        out = []
        n_decay = min(max(self.n_decay - self.shard_lo, 0), self.shard_len)
        if lo < n_decay:
            out.append((lo, min(hi, n_decay), True))
        if hi > n_decay:
            out.append((max(lo, n_decay), hi, False))
        return [s for s in out if s[1] > s[0]]


    def shard(self, rank: int, world: int, placeholder: torch.Tensor) -> None:
        """Keep only this rank's shard of the (initialised) master; moments start at zero.

        The layout is padded to ``world * ceil(numel / world)``; the padding is zero and stays zero (its
        gradient is zeroed before every reduction, and it gets no weight decay). The HF parameters are
        re-pointed at ``placeholder`` (expanded, no bytes): only device slot views are ever bound to them.
        """
        if self.flat is None:
            raise RuntimeError(f"unit {self.name} is not allocated")
        size = -(-self.numel // world)
        lo = rank * size
        own = max(0, min(size, self.numel - lo))
        flat = torch.zeros(3 * size, dtype=torch.float32)
        flat[:own].copy_(self.flat[lo:lo + own])
        self.flat = flat
        self.shard_lo, self.shard_len, self.padded = lo, size, size * world
        self.grad_acc = None
        for spec in self.params:
            spec.param.data = placeholder.expand(spec.shape)


def attach_upload_copies(units: list[HostUnit], alloc: Callable[[int, torch.dtype], torch.Tensor],
                         dtype: torch.dtype) -> int:
    """Give each of ``units`` its upload copy (``alloc(numel, dtype)``: pinned with a pageable fallback) built
    from its master; returns the bytes allocated."""
    total = 0
    for u in units:
        if u.upload_copy is None or u.upload_copy.numel() != u.shard_len or u.upload_copy.dtype != dtype:
            u.upload_copy = None
            u.upload_copy = alloc(u.shard_len, dtype)
        total += u.upload_copy.numel() * u.upload_copy.element_size()
    refresh_upload_copies(units)
    return total


def refresh_upload_copies(units: list[HostUnit], masters: dict[int, torch.Tensor] | None = None) -> None:
    """Rebuild every upload copy from its master (after a write to the masters outside the optimizer: init,
    load, ``load_state_dict``); the cast is round-to-nearest-even, as the optimizer kernel's. ``masters``:
    the flat master per unit index where it is not the host buffer (a view of its offload file)."""
    for u in units:
        if u.upload_copy is not None:
            u.upload_copy.copy_(masters[u.index] if masters is not None and u.index in masters else u.master)


def build_units(embed_params: list[tuple[str, nn.Parameter]], layer_params: list[list[tuple[str, nn.Parameter]]],
                head_params: list[tuple[str, nn.Parameter]]) -> list[HostUnit]:
    """Units in sliding order: embedding, decoder layers, head."""
    units = [HostUnit(0, "embed", embed_params)]
    for i, params in enumerate(layer_params):
        units.append(HostUnit(i + 1, f"layer{i}", params))
    units.append(HostUnit(len(units), "head", head_params))
    return units
