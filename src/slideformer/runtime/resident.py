"""Resident layers: decoder layers that never leave the device, with their optimizer on the device.

On a GPU with room to spare, some layers keep compute-dtype weights plus FP32 master weights and AdamW
moments on the device (14 bytes/param of device memory). They are never uploaded, their gradients never
cross PCIe, and their AdamW runs on the device right after their backward, in stream order; the host's
memory bandwidth and the PCIe link are left to the streamed layers. The host keeps its flat buffers for
these units too (checkpoints and ``hf_model`` read them): ``sync_to_host`` refreshes them, on ``flush``.

Under the deferred schedule (clipping, accumulation) a resident unit's gradients are summed on the device
in an FP32 accumulator (4 more bytes/param, allocated on first use); the update waits for the step's clip
coefficient and runs, in stream order, before the unit's next forward (or on ``flush``).

Data-parallel: every rank keeps the whole resident unit on its GPU and updates it identically from the
gradient summed over the ranks (``reduce``, on the compute stream); its host buffers stay this rank's shard
like any unit's (``load_from_host`` gathers the others' parts on the device; ``sync_to_host`` writes back
this rank's part), so host memory per node does not grow with resident layers.

With ``cast`` (``engine.resident_weights``) no compute-dtype weights are kept (12 instead of 14 bytes/param):
``stage`` casts a unit's FP32 master into one buffer shared by all resident units, on the compute stream, right
before the unit's forward or backward binds it; stream order keeps the next unit's cast behind this unit's use.

The overlap schedule's update reads each unit's gradient through one FP32 scratch of the largest unit (the fused
AdamW takes FP32 gradients for FP32 masters). It needs no memory of its own where the vocabulary slot's weights are
large enough (``scratch_fits``): from the head's last read of them to their next upload, which waits for the step's
embedding backward (after every layer's backward in compute-stream order), no one touches them, and the step runner
forgets what the slot holds once a scratch update ran (``StepRunner``). 0.38 GiB on Llama-3.2-3B, 0.81 on
Llama-3.1-8B.

The overlap schedule's AdamW runs on a stream of its own (``side``, one process): the compute stream copies a unit's
gradient into the scratch right after its backward and goes on with the next layer, while the side stream takes the
norm and the update (18 of the ~25 ms a step of the 3B headline spends on them, session 16); the next unit's copy into
the scratch waits for that update, and ``join`` puts the compute stream behind every update queued (before the
embedding's backward, whose release the vocabulary slot's next upload waits for: the scratch may be its weights).

Invariant: a resident unit's device state is the truth between ``load_from_host`` and ``sync_to_host``;
its update uses ``torch._fused_adamw_`` with the same arithmetic as the host kernel, so results do not
depend on which layers are resident (CPU parity tests hold that).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slideformer.config import OptimConfig
from slideformer.memory.host_state import HostUnit
from slideformer.runtime.device import DeviceOps, add_squared_norm


def pick_resident(num_layers: int, count: int, placement: str = "first") -> list[int]:
    """``count`` layer indices: the lowest (``first``), spread evenly over the depth (``spread``), the streamed
    layers spread evenly down from the top layer so the lowest ones stay resident (``spread_top``), or ``auto``:
    spread_top when resident layers outnumber the streamed ones, else first.

    Why ``auto`` decides so (measured on the H100 box, performance_h100_202611.md): with few resident layers
    the host's AdamW bounds the step, and streamed layers at the top give it the most slack (their gradients
    come first in backward, their weights are needed last in forward): 3B on 24 GiB, 8 of 28 resident, first
    0.804 s vs spread 0.833. With most layers resident the streamed stretch at the top is bound by its uploads,
    which spreading hides behind resident layers' compute: 8B b8 on 80 GB, 21 of 32 resident, first 1.415 s vs
    spread 1.207 s (same run).

    ``spread_top`` keeps spread's spacing but moves every streamed layer as high as it goes: the lowest streamed
    layer's gradient lands last in backward and its weights are needed first in the next forward, so the
    resident layers below it are the host's time to update it (spread puts a streamed layer at index 1). 8B b8,
    22 of 32 resident, same run (session 7): spread_top 1.262 s vs spread 1.365 (whole embedding update), 1.193 vs
    1.241 (split).
    """
    count = max(0, min(count, num_layers))
    where = resolve_placement(num_layers, count, placement)
    if where == "first":
        return list(range(count))
    if where == "spread_top":
        streamed = num_layers - count
        down = {num_layers - 1 - (j * num_layers) // streamed for j in range(streamed)}
        return [i for i in range(num_layers) if i not in down]
    return sorted({min(num_layers - 1, int((i + 0.5) * num_layers / count)) for i in range(count)})


def resolve_placement(num_layers: int, count: int, placement: str) -> str:
    """``first``, ``spread`` or ``spread_top``: ``auto`` is spread_top when resident layers outnumber the streamed
    ones, else first."""
    if placement != "auto":
        return placement
    return "spread_top" if count > num_layers - count else "first"


class ResidentLayers:
    """Device-side weights, master weights and AdamW state of the resident units."""

    def __init__(self, ops: DeviceOps, units: list[HostUnit], dtype: torch.dtype, optim: OptimConfig, *,
                 cast: bool = False, reduce: Callable[[torch.Tensor], None] | None = None,
                 gather: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                 idle_scratch: torch.Tensor | None = None) -> None:
        """``reduce`` / ``gather`` (data-parallel): sum a gradient over the ranks in place; fill a whole
        third from this rank's part of it (``gather(whole, own)``, in place), both in compute-stream order.
        ``idle_scratch``: device memory no one reads or writes while the overlap schedule's updates run (``update``,
        in the layers' backward), at least 4 bytes per element of the largest unit: the FP32 gradient scratch lives
        there instead of in a buffer of its own (``scratch_alias``)."""
        self.ops = ops
        self.optim = optim
        self.reduce, self.gather = reduce, gather
        self.units = {u.index: u for u in units}
        # The whole unit on the device, data-parallel too ([master | exp_avg | exp_avg_sq], each ``padded``
        # long; padded == numel in one process); the host keeps this rank's shard of it.
        self.flat = {u.index: ops.empty(3 * u.padded, torch.float32).zero_() for u in units}  # padding stays 0
        self.cast = cast
        largest = max(u.numel for u in units)
        # Kept weights, one buffer per unit; or (cast) one buffer every unit's views share.
        self.shared = ops.empty(largest, dtype) if cast else None
        self.weight = {u.index: self.shared[:u.numel] if self.shared is not None else ops.empty(u.numel, dtype)
                       for u in units}
        # The FP32 gradient scratch of ``update``: in the idle memory when given (no bytes of its own), else a buffer.
        # The deferred schedule's clipped update runs in the next forward, where that memory is in use: it gets a
        # buffer of its own at its first step (``accumulate``).
        self.aliased = idle_scratch is not None
        self.grad32 = (scratch_alias(idle_scratch, largest) if idle_scratch is not None
                       else ops.empty(largest, torch.float32))
        self.deferred32: torch.Tensor | None = None if self.aliased else self.grad32
        self.step_t = {u.index: torch.zeros((), dtype=torch.float32, device=ops.device) for u in units}
        self.views = {u.index: [self.weight[u.index][s.offset:s.offset + s.numel].view(s.shape) for s in u.params]
                      for u in units}
        # The FP32 gradient scratch laid out as each unit's parameters, built once (not per backward).
        self.grad_views = {u.index: [self.grad32[s.offset:s.offset + s.numel].view(s.shape) for s in u.params]
                           for u in units}
        self.acc: dict[int, torch.Tensor] = {}
        self.acc_views: dict[int, list[torch.Tensor]] = {}
        # add_squared_norm's scratch, in compute-stream order (a scalar pair, like step_t outside device_bytes)
        self.norm_scratch = torch.zeros(2, dtype=torch.float32, device=ops.device)
        # The overlap schedule's updates on their own stream (None: in compute-stream order; data-parallel, whose
        # reduce is the compute stream's collective, and the synchronous debugging mode keep them there). On the CPU
        # the same path runs, its streams and events None.
        self.overlap = reduce is None and not ops.sync_copies
        self.side = ops.new_stream() if self.overlap else None
        self.side_scratch = torch.zeros(2, dtype=torch.float32, device=ops.device)
        self.sq_side = torch.zeros((), dtype=torch.float32, device=ops.device)
        """The side stream's squared norms since the last ``join``, which adds them to ``sq_target``."""
        self.sq_target: torch.Tensor | None = None
        self.scratch_free: object = None
        """Side-stream event: the last update queued there has read the scratch (None: nothing queued since join)."""
        self.side_delay_cycles = 0
        """Tests only: the side stream spins this many cycles before each update (a race amplifier)."""
        self.load_from_host()

    def load_from_host(self) -> None:
        """Copy the host state (master, moments, step) of every resident unit to the device (data-parallel:
        this rank's shard of each third, then the other ranks' parts gathered)."""
        self.join()
        for i, u in self.units.items():
            if u.sharded:
                for k in range(3):
                    whole = self.flat[i][k * u.padded:(k + 1) * u.padded]
                    own = whole[u.shard_lo:u.shard_lo + u.shard_len]
                    own.copy_(u.flat[k * u.shard_len:(k + 1) * u.shard_len])
                    if self.gather is None:
                        raise RuntimeError(f"{u.name} is sharded but the resident layers have no gather")
                    self.gather(whole, own)
            else:
                self._copy_thirds(self.flat[i], u.flat, u.numel)
            if not self.cast:
                self.weight[i].copy_(self.flat[i][:u.numel])
            self.step_t[i].fill_(float(u.step))

    def stage(self, index: int) -> None:
        """Before unit ``index``'s forward or backward binds its views: with ``cast``, its weights from its FP32
        master into the shared buffer, on the current (compute) stream; kept weights are already current."""
        if self.cast:
            u = self.units[index]
            self.weight[index].copy_(self.flat[index][:u.numel])

    def sync_to_host(self) -> None:
        """Copy the device state back into the host buffers (a blocking copy: used by ``flush``); data-parallel:
        this rank's shard of each third (every rank holds the same whole state on its device)."""
        self.join()
        for i, u in self.units.items():
            if u.sharded:
                for k in range(3):
                    lo = k * u.padded + u.shard_lo
                    u.flat[k * u.shard_len:(k + 1) * u.shard_len].copy_(self.flat[i][lo:lo + u.shard_len])
            else:
                self._copy_thirds(u.flat, self.flat[i], u.numel)

    @staticmethod
    def _copy_thirds(dst: torch.Tensor, src: torch.Tensor, n: int) -> None:
        # One copy per third: a CUDA copy whose host range is only partly page-locked (a master third
        # registered for uploads, moments not) fails with cudaErrorInvalidValue.
        for k in range(3):
            dst[k * n:(k + 1) * n].copy_(src[k * n:(k + 1) * n])

    def update(self, unit: HostUnit, grads: list[torch.Tensor], lr: float, sq_norm: torch.Tensor) -> None:
        """AdamW for ``unit`` from its fresh gradients, then refresh its weights: the gradient's copy into the scratch
        on the compute stream, the norm and the update on the side stream (``overlap``; ``join`` before anything
        reads the result), or all on the compute stream."""
        n = unit.numel
        g = self.grad32[:n]
        cs = self.ops.compute_stream()
        if self.overlap:
            self.ops.wait(cs, self.scratch_free)  # the previous unit's update (side stream) has read the scratch
        torch._foreach_copy_(self.grad_views[unit.index], grads)
        unit.step += 1
        if not self.overlap:
            if self.reduce is not None:
                self.reduce(g)  # data-parallel: every rank's gradient summed before the norm and the update
            add_squared_norm(sq_norm, g, self.norm_scratch)
            self.step_t[unit.index] += 1
            self._adamw(unit, g, lr)
            return
        copied = self.ops.record(cs)
        with self.ops.on(self.side):
            self.ops.wait(self.side, copied)  # the scratch holds this unit's gradient (and its forward read the master)
            if self.side_delay_cycles:
                torch.cuda._sleep(self.side_delay_cycles)
            add_squared_norm(self.sq_side, g, self.side_scratch)
            self.step_t[unit.index] += 1
            self._adamw(unit, g, lr)
            self.scratch_free = self.ops.record(self.side)
        self.sq_target = sq_norm

    def join(self) -> None:
        """Put the compute stream behind every update queued on the side stream, and add their squared norms to the
        step's (``update``'s ``sq_norm``), in compute-stream order."""
        if not self.overlap or self.sq_target is None:
            return
        self.ops.wait(self.ops.compute_stream(), self.scratch_free)  # the side stream's updates are all done
        self.sq_target.add_(self.sq_side)
        self.sq_side.zero_()
        self.sq_target, self.scratch_free = None, None

    def accumulate(self, unit: HostUnit, grads: list[torch.Tensor], first: bool, last: bool,
                   sq_norm: torch.Tensor | None) -> None:
        """Deferred schedule: add a micro-batch's gradients into the unit's FP32 accumulator (``first``:
        overwrite it); after the step's ``last`` micro-batch, sum it over the ranks (data-parallel) and add
        its squared norm to ``sq_norm``."""
        i = unit.index
        if self.deferred32 is None:  # once per engine: the clipped update's scratch (__init__)
            self.deferred32 = self.ops.empty(self.grad32.numel(), torch.float32)
        if i not in self.acc:  # once per engine: the deferred schedule's first step
            self.acc[i] = self.ops.empty(unit.numel, torch.float32)
            self.acc_views[i] = [self.acc[i][s.offset:s.offset + s.numel].view(s.shape) for s in unit.params]
        if first:
            torch._foreach_copy_(self.acc_views[i], grads)
        else:
            torch._foreach_add_(self.acc_views[i], grads)
        if last and self.reduce is not None:
            self.reduce(self.acc[i])  # data-parallel: the whole step's gradient, summed once
        if last and sq_norm is not None:
            add_squared_norm(sq_norm, self.acc[i], self.norm_scratch)

    def apply_accumulated(self, unit: HostUnit, step: int, lr: float, grad_scale: float) -> None:
        """Deferred schedule: AdamW from the accumulated gradient times the clip coefficient (``step`` is
        the unit's step count after this update, already advanced by the schedule)."""
        g = self.acc[unit.index]
        if grad_scale != 1.0:
            if self.deferred32 is None:
                raise RuntimeError(f"{unit.name}: a deferred update with no accumulated gradient (accumulate first)")
            g = torch.mul(g, grad_scale, out=self.deferred32[:unit.numel])
        self.step_t[unit.index].fill_(float(step))
        self._adamw(unit, g, lr)

    def _adamw(self, unit: HostUnit, g: torch.Tensor, lr: float) -> None:
        n = unit.numel
        flat = self.flat[unit.index]
        b1, b2 = self.optim.betas
        # The whole unit's decay boundary (HostUnit.decay_segments is shard-local; this state is the whole unit).
        for lo, hi, decay in ((0, min(n, unit.n_decay), True), (unit.n_decay, n, False)):
            if hi <= lo:
                continue
            torch._fused_adamw_([flat[lo:hi]], [g[lo:hi]], [flat[n + lo:n + hi]], [flat[2 * n + lo:2 * n + hi]], [],
                                [self.step_t[unit.index]], lr=lr, beta1=b1, beta2=b2,
                                weight_decay=self.optim.weight_decay if decay else 0.0, eps=self.optim.eps,
                                amsgrad=False, maximize=False)
        if not self.cast:  # cast: the next use casts the new master (stage)
            self.weight[unit.index].copy_(flat[:n])

    def device_bytes(self) -> int:
        weights = [self.shared] if self.shared is not None else list(self.weight.values())
        own = [self.deferred32] if self.deferred32 is not None else []  # (the aliased scratch is not ours)
        return sum(t.numel() * t.element_size() for t in [*self.flat.values(), *weights, *self.acc.values(), *own])


def scratch_alias(idle: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` FP32 elements of the contiguous device buffer ``idle`` (any dtype), as a view."""
    nbytes = numel * 4
    if not idle.is_contiguous() or idle.numel() * idle.element_size() < nbytes:
        raise ValueError(f"the idle buffer ({idle.numel() * idle.element_size()} bytes) cannot hold a {numel}-element "
                         "FP32 scratch")
    raw = idle.view(torch.uint8)[:nbytes]
    if raw.data_ptr() % 4:
        raise ValueError("the idle buffer is not 4-byte aligned")
    return raw.view(torch.float32)


def scratch_fits(idle_bytes: int, largest_layer: int) -> bool:
    """Whether ``idle_bytes`` of idle device memory hold the FP32 gradient scratch of a ``largest_layer`` unit (the
    engine's rule for aliasing it into the vocabulary slot's weights, and the planner's)."""
    return idle_bytes >= 4 * largest_layer
