"""Device slots: pre-allocated weight and gradient buffers that units are uploaded into.

A slot is a flat weight buffer and a flat gradient buffer of the compute dtype, allocated once. A
*use* of a slot is one compute on the unit(s) it holds (a layer's forward, its backward, the head).
Each use gets a release future, set (with a device event) by whoever finishes with the slot: the
main thread after a forward, the gradient worker after the gradient download. An upload into a slot
waits for every release since the previous upload, so nothing overwrites a slot still being read.

The main thread plans uses in program order, so every upload sees exactly the releases before it.

Invariant: the number and size of slots is fixed at construction; a unit is never uploaded into a
slot whose previous uses have not all been released, and never before its pending update landed.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from slideformer.memory.host_state import HostUnit
from slideformer.runtime.device import DeviceOps


@dataclass
class Segment:
    """A unit's place inside a slot: the unit's flat layout starts at ``offset``."""

    unit: HostUnit
    offset: int


@dataclass
class Slot:
    """One device slot: flat weights + flat gradients, and the bookkeeping of who holds it."""

    index: int
    weight: torch.Tensor
    grad: torch.Tensor
    content: tuple[tuple[int, int], ...] | None = None
    """(unit index, version) of what the slot holds once its planned uploads have run."""
    ready: Future | None = None
    """Future of the latest planned upload; its result is the device event of the finished copy."""
    releases: list[Future] = field(default_factory=list)
    """Release futures of the uses planned since the latest upload."""

    def views(self, segments: list[Segment], grads: bool = False) -> list[list[torch.Tensor]]:
        """Per segment, per parameter: views of the slot's weight (or gradient) buffer."""
        flat = self.grad if grads else self.weight
        return [[flat[s.offset + p.offset:s.offset + p.offset + p.numel].view(p.shape) for p in s.unit.params]
                for s in segments]


class SlotPool:
    """A fixed set of equally sized slots."""

    def __init__(self, ops: DeviceOps, count: int, numel: int, dtype: torch.dtype) -> None:
        self.slots = [Slot(i, ops.empty(numel, dtype), ops.empty(numel, dtype)) for i in range(count)]
        self.numel = numel


def wanted_content(segments: list[Segment]) -> tuple[tuple[int, int], ...]:
    return tuple((s.unit.index, s.unit.version) for s in segments)


@dataclass
class Use:
    """One planned compute on a slot."""

    slot: Slot
    segments: list[Segment]
    release: Future
    upload: Future | None
    """The upload this use waits for (None: the slot already holds the right weights)."""
    earlier_releases: list[Future]
    """Releases of earlier uses since the upload (a backward must wait for their downloads)."""


def plan_use(slot: Slot, segments: list[Segment], needs_weights: bool, submit_upload: Any) -> Use:
    """Plan a use of ``slot`` for ``segments``; schedules an upload when the slot holds something else.

    ``submit_upload(slot, segments, wait_releases)`` queues the upload and returns its future.
    """
    upload = None
    if needs_weights and slot.content != wanted_content(segments):
        waits, slot.releases = slot.releases, []
        upload = submit_upload(slot, segments, waits)
        slot.ready = upload
        slot.content = wanted_content(segments)
    elif needs_weights:
        upload = slot.ready
    earlier = list(slot.releases)
    release: Future = Future()
    slot.releases.append(release)
    return Use(slot, segments, release, upload, earlier)


def invalidate(slots: list[Slot]) -> None:
    """Forget what the slots hold (after weights changed outside the schedule, e.g. a state load)."""
    for s in slots:
        s.content = None
