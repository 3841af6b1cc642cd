"""What the gradient pipeline's optimizer thread consumes next: the items it holds and the order rule.

``Parked`` is one unit's gradient on its way from a device slot through the pinned parking pool, ``Task`` a
function for the optimizer thread (a barrier, or *background* work run a chunk per turn). ``pick`` chooses,
by when the next forward needs the weights: the lowest unit index first among landed units and background
work, a chunk per turn; landed units before background work when the parking pool runs short. A unit
*lands* when its copies are queued, which is as soon as the main thread queued its backward, well before the
GPU ran it: so only chunks whose copy has *completed* are candidates, and with none ready ``pick`` says so
and the thread polls (session 8's 8B timeline had it blocked on such copies ~300 ms of the backward, with the
split embedding's early part ready, and that part was left for the next step's gather). With the moments on
disk the order is submission order (the order the disk ring prefetches in).

Invariant (with ``runtime/grad_pipeline.py``): items of one unit are consumed in submission order; a task
runs only after every item submitted before it and before anything submitted after it (a background one
holds back only its own unit's later items); ``pick`` never returns a chunk whose copy is still running,
except in submission order (the disk tier), where the consumer waits for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from slideformer.memory.host_state import HostUnit
from slideformer.runtime.embedding_split import RowUpdate
from slideformer.runtime.transfer import Accumulate, Update

POLL_S = 0.0005
"""How often the optimizer thread, with nothing else to do, checks whether a parked chunk's copy completed."""


@dataclass
class Parked:
    """One unit's gradient on its way from a slot to the optimizer."""

    seq: int
    unit: HostUnit
    action: Accumulate | Update | RowUpdate
    length: int
    """Elements to download and consume: the unit's (this rank's shard), or a ``RowUpdate``'s compact rows."""
    n_chunks: int
    future: Future = field(default_factory=Future)
    chunks: list[tuple[int, int, int, Any]] = field(default_factory=list)
    started: bool = False
    landed: bool = False
    error: BaseException | None = None
    background: bool = False
    consumed: int = 0
    """Chunks applied so far (drains are consumed a chunk per turn; whole, in turn, with the disk tier)."""


@dataclass
class Task:
    seq: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: Future = field(default_factory=Future)
    background: bool = False
    """``fn`` returns an iterator; each step of it is one chunk of work, run when nothing else is ready."""
    steps: Iterator[Any] | None = None
    unit_index: int = -1



def chunk_ready(it: Parked, done: Callable[[Any], bool]) -> bool:
    """Its next chunk's copy has completed (``done(event)``), or its download failed: consuming it now does
    not block."""
    if it.error is not None:
        return it.landed
    return len(it.chunks) > it.consumed and done(it.chunks[it.consumed][3])


def pick(pending: list[Parked | Task], done: Callable[[Any], bool], *, short: bool,
         in_submission_order: bool) -> tuple[Parked | Task | None, bool]:
    """The next item to consume from ``pending`` (submission order), and whether a parked chunk's copy is
    still in flight (worth polling for when the item is None). ``short``: the parking pool runs short."""
    seen_units: set[int] = set()
    streaming: Parked | None = None  # a unit still being downloaded whose next chunk's copy completed
    ready: Parked | None = None  # the lowest landed unit whose next chunk's copy has completed
    background: tuple[int, Parked | Task] | None = None  # the lowest background work with a chunk ready
    in_flight = False
    for pos, item in enumerate(pending):
        if isinstance(item, Task):
            if item.background:
                if item.unit_index not in seen_units and (background is None or item.unit_index < background[0]):
                    background = (item.unit_index, item)
                seen_units.add(item.unit_index)  # later items of its unit come after it
                continue
            if pos == 0:
                return item, in_flight
            break  # nothing after a pending task may run before it
        if in_submission_order:
            return (item if item.started else None), in_flight
        if item.unit.index in seen_units:
            continue  # an earlier item of the same unit comes first
        seen_units.add(item.unit.index)
        if not chunk_ready(item, done):
            in_flight = in_flight or len(item.chunks) > item.consumed
        elif item.background:
            if background is None or item.unit.index < background[0]:
                background = (item.unit.index, item)
        elif item.landed:
            if ready is None or item.unit.index < ready.unit.index:
                ready = item
        else:
            streaming = item
    if ready is not None and (background is None or ready.unit.index < background[0] or short):
        return ready, in_flight  # the lowest landed unit that can be consumed without waiting
    if background is not None:
        return background[1], in_flight  # lower, or rather than wait for a landed unit's copy still in flight
    return streaming, in_flight  # or None: nothing can run without waiting for a copy
