"""Optimizer state on disk: a small ring of aligned host buffers, prefetched piece by piece ahead of the optimizer.

Owns *where a unit's AdamW moments (and, with ``engine.offload='all'``, its FP32 master) are* while they live
on disk: one file per unit in a ``DiskStore`` laid out ``[exp_avg | pad | exp_avg_sq | pad]``, or
``[exp_avg | pad | exp_avg_sq | pad | master | pad]`` for a unit whose master is on disk too (each part
ALIGN-padded; the moments sit at the same offsets either way), cut into *pieces* of ``piece`` elements, the
optimizer's chunk (so every chunk it updates lies in one piece), and a fixed ring of ``prefetch + 2``
page-aligned buffers of one piece's two moments (and master: three parts when any unit has its master on
disk) each, allocated once, holding a piece's parts in the file's order (exp_avg at 0, exp_avg_sq at
``voff``, master at ``2 * voff``, ``voff`` being the piece's length ALIGN-padded). The master of a unit
enters its file once, from the host buffer (``store_masters``), which is then freed; from then on the
optimizer reads and writes it through the ring with the moments, and checkpoints through mapped views. The optimizer
thread calls ``enter(unit, lo, hi, direction)`` before each chunk and ``leave(unit)`` after the unit:
``enter`` binds the piece holding ``[lo, hi)`` (writing back the piece bound before it), waiting for its
read if still in flight, and queues reads of the next ``prefetch`` pieces in the order the optimizer
consumes them (ascending within a unit; units in backward order, ``direction=-1``, for the overlap
schedule, forward order, ``+1``, for the deferred one, wrapping into the next step). A buffer keeps its
piece after the write-back, so a piece wanted again soon is not re-read.

Invariant: a piece's newest moments (and master) are in exactly one place every reader respects: the ring
buffer that holds it (bound, being written back, or cached), else its file. A read of a piece waits for that piece's
last write-back; a buffer is refilled only after its own write-back and read finished; a buffer is
rebound only after its previous write-back finished (no buffer is written to disk while it changes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from slideformer.errors import ConfigError, SlideformerError
from slideformer.memory.disk import DiskStore
from slideformer.memory.disk_io import ALIGN, AlignedBuffer, all_done, round_up
from slideformer.memory.host_state import HostUnit

Key = tuple[int, int]
"""(unit index, piece index)."""


@dataclass
class _Slot:
    buf: AlignedBuffer
    key: Key | None = None
    """Whose moments the buffer holds (or is reading), None when empty."""
    ready: Future | None = None
    """Completes when the read into the buffer has landed (None: nothing in flight)."""
    write: Future | None = None
    """The last write-back out of this buffer."""
    bound: bool = False


def key_of(unit: HostUnit) -> str:
    return f"unit{unit.index:04d}-moments"


def file_bytes(unit: HostUnit, with_master: bool = False) -> int:
    return (3 if with_master else 2) * round_up(4 * unit.numel)


class OffloadedMoments:
    """Per-unit AdamW moments (and chosen units' masters) in a ``DiskStore``, staged piece by piece through a
    prefetching ring. ``masters``: indices of the units whose master goes to disk (``store_masters``)."""

    def __init__(self, units: list[HostUnit], store: DiskStore, prefetch: int, piece: int,
                 masters: frozenset[int] = frozenset()) -> None:
        if piece % (ALIGN // 4):
            raise ConfigError(f"the disk tier needs the optimizer chunk ({piece} elements, engine.chunk_mib) to be a "
                              f"multiple of {ALIGN // 4} elements (4 KiB of FP32): use a power-of-two chunk_mib")
        self.units = units
        self.store = store
        self.prefetch = prefetch
        self.piece = min(piece, round_up(max(u.numel for u in units), ALIGN // 4))
        self.masters = masters
        self.parts = 3 if masters else 2
        self.slots = [_Slot(AlignedBuffer(self.parts * 4 * self.piece)) for _ in range(prefetch + 2)]
        self._last_write: dict[Key, Future] = {}
        self._lock = threading.Lock()
        self._bound: tuple[HostUnit, int] | None = None
        self.demand_reads = 0
        """Reads the optimizer had to wait for because the piece was not prefetched (a mispredicted order)."""
        self.error: BaseException | None = None

    # -- the optimizer thread's bracket -------------------------------------------------------------
    def enter(self, unit: HostUnit, lo: int, hi: int, direction: int, timeout: float | None = None) -> None:
        """Bind the piece of ``unit`` holding ``[lo, hi)`` (``direction``: the order units are consumed in)."""
        p = lo // self.piece
        if hi > (p + 1) * self.piece:
            raise SlideformerError(f"offload: {unit.name}[{lo}:{hi}] straddles two pieces of {self.piece}")
        if self._bound is not None and self._bound[0] is unit and self._bound[1] == p:
            return
        self.leave()
        self._begin(unit, p, direction, timeout)

    def leave(self, unit: HostUnit | None = None) -> None:
        """Unbind the bound piece and write it back (asynchronously; the buffer keeps the data)."""
        if self._bound is None:
            return
        bound, p = self._bound
        self._bound = None
        bound.moments = None
        n, _ = self._span(bound, p)
        with self._lock:
            slot = self._holding((bound.index, p))
            if slot is None or not slot.bound:
                raise SlideformerError(f"offload: piece {p} of {bound.name} is not bound")
            slot.bound = False
            slot.write = all_done([self.store.write(key_of(bound), slot.buf, 4 * n, offset=at, buf_offset=b_at)
                                   for at, b_at in self._parts(bound, p)])
            self._last_write[(bound.index, p)] = slot.write
            slot.write.add_done_callback(self._note_error)

    def _span(self, unit: HostUnit, p: int) -> tuple[int, int]:
        """(elements in piece ``p`` of ``unit``, element offset of its exp_avg_sq in the buffer)."""
        n = min(self.piece, unit.numel - p * self.piece)
        return n, round_up(4 * n) // 4

    def _parts(self, unit: HostUnit, p: int) -> list[tuple[int, int]]:
        """(file byte offset, buffer byte offset) of each part of piece ``p``: exp_avg, exp_avg_sq[, master]."""
        _, voff = self._span(unit, p)
        third, at = round_up(4 * unit.numel), 4 * p * self.piece
        k = 3 if unit.index in self.masters else 2
        return [(j * third + at, j * 4 * voff) for j in range(k)]

    def _upcoming(self, unit: HostUnit, p: int, direction: int) -> list[Key]:
        out: list[Key] = []
        i = unit.index
        while len(out) < self.prefetch:
            p += 1
            if p * self.piece >= self.units[i].numel:
                i, p = (i + direction) % len(self.units), 0
            if (i, p) == (unit.index, 0) and out:
                break  # wrapped all the way round a model smaller than the ring
            out.append((i, p))
        return out

    def _begin(self, unit: HostUnit, p: int, direction: int, timeout: float | None) -> None:
        key = (unit.index, p)
        with self._lock:
            self._raise_if_failed()
            slot = self._holding(key)
            if slot is None:
                self.demand_reads += 1
                slot = self._fill(key, keep=set())
            slot.bound = True
            upcoming = self._upcoming(unit, p, direction)
            for k in upcoming:
                if k != key and self._holding(k) is None:
                    self._fill(k, keep={key, *upcoming})
            ready, write = slot.ready, slot.write
        if ready is not None:
            ready.result(timeout)  # this piece's moments must have landed before AdamW reads them
        if write is not None:
            write.result(timeout)  # its last write-back still reads this buffer: do not change it under it
        n, voff = self._span(unit, p)
        unit.moments = slot.buf.view(torch.float32, self.parts * self.piece)
        unit.moments_lo, unit.moments_n, unit.moments_voff, unit.master_off = p * self.piece, n, voff, 2 * voff
        self._bound = (unit, p)

    # -- ring management (under the lock) -------------------------------------------------------------
    def _holding(self, key: Key) -> _Slot | None:
        return next((s for s in self.slots if s.key == key), None)

    def _fill(self, key: Key, keep: set[Key]) -> _Slot:
        """Start reading piece ``key`` into a buffer that is not bound and holds nothing in ``keep``."""
        free = [s for s in self.slots if not s.bound and s.key not in keep]
        if not free:
            raise SlideformerError("offload ring exhausted (internal error: more pieces bound than buffers)")
        # Prefer an empty buffer, then one whose write-back is done, then any (its read waits for the write).
        slot = min(free, key=lambda s: (s.key is not None, s.write is not None and not s.write.done()))
        # The buffer's own write-back (and a read still landing in it) must finish before it is refilled, and
        # the piece's newest moments must be on disk before they are read.
        after = [f for f in (slot.ready, slot.write, self._last_write.get(key)) if f is not None]
        unit = self.units[key[0]]
        n, _ = self._span(unit, key[1])
        slot.key = key
        slot.ready = all_done([self.store.read(key_of(unit), slot.buf, 4 * n, after, offset=at, buf_offset=b_at)
                               for at, b_at in self._parts(unit, key[1])])
        slot.ready.add_done_callback(self._note_error)
        return slot

    def _note_error(self, fut: Future) -> None:
        if fut.exception() is not None and self.error is None:
            self.error = fut.exception()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise SlideformerError(f"offload I/O failed: {self.error}") from self.error

    # -- whole-state access ---------------------------------------------------------------------------
    def sync(self, timeout: float | None = None) -> None:
        """Wait for every transfer, then forget the ring's cached copies (the files hold the truth)."""
        with self._lock:
            if any(s.bound for s in self.slots):
                raise SlideformerError("offload: sync() while an update is running")
            pending = [f for s in self.slots for f in (s.ready, s.write) if f is not None]
            for s in self.slots:
                s.key, s.ready, s.write = None, None, None
            self._last_write.clear()
        for f in pending:
            f.exception(timeout)  # every read and write-back has finished (errors are recorded below)
        self._raise_if_failed()

    def wait_writes(self, timeout: float | None = None) -> None:
        """Wait until every write-back queued so far is on disk."""
        with self._lock:
            pending = list(self._last_write.values())
        for f in pending:
            f.exception(timeout)  # a write-back still in flight
        self._raise_if_failed()

    def mapped(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """(exp_avg, exp_avg_sq) of every unit as tensors over its file (after ``sync``); writes into them
        reach the file once ``commit_mapped`` runs."""
        out = {}
        for u in self.units:
            raw = self.store.map(key_of(u))
            v_at = round_up(4 * u.numel)
            out[u.index] = (raw[:4 * u.numel].view(torch.float32), raw[v_at:v_at + 4 * u.numel].view(torch.float32))
        return out

    def mapped_masters(self) -> dict[int, torch.Tensor]:
        """The FP32 master of every unit whose master is on disk, as a tensor over its file (after ``sync``);
        writes into it reach the file once ``commit_mapped`` runs."""
        out = {}
        for u in self.units:
            if u.index in self.masters:
                raw = self.store.map(key_of(u))
                at = 2 * round_up(4 * u.numel)
                out[u.index] = raw[at:at + 4 * u.numel].view(torch.float32)
        return out

    def commit_mapped(self) -> None:
        self.store.sync_maps()

    def store_masters(self, placeholder: torch.Tensor, timeout: float | None = None,
                      before: Callable[[HostUnit], object] | None = None) -> None:
        """Write the host master of every unit in ``masters`` not yet on disk to its file (``store_master``)."""
        for u in self.units:
            if u.index in self.masters and not u.master_on_disk:
                self.store_master(u, placeholder, timeout, before)

    def store_master(self, u: HostUnit, placeholder: torch.Tensor, timeout: float | None = None,
                     before: Callable[[HostUnit], object] | None = None) -> None:
        """Write ``u``'s host master to its file, piece by piece through a ring buffer, then free it
        (``HostUnit.release_master``), after ``before(u)`` (which builds its upload copy from it). Only
        before the first update (the ring is idle): at start-up, as each unit's initial weights are complete."""
        if u.index not in self.masters:
            raise SlideformerError(f"offload: {u.name} keeps its master in RAM")
        with self._lock:
            if any(s.bound or s.key is not None for s in self.slots):
                raise SlideformerError("offload: store_master() after the ring was used")
        buf = self.slots[0].buf
        if before is not None:
            before(u)
        master = u.master
        for p in range(-(-u.numel // self.piece)):
            lo = p * self.piece
            n = min(self.piece, u.numel - lo)
            buf.view(torch.float32, n).copy_(master[lo:lo + n])
            at = 2 * round_up(4 * u.numel) + 4 * lo
            # The buffer is refilled for the next piece: this write must have read it first.
            self.store.write(key_of(u), buf, 4 * n, offset=at).result(timeout)
        u.release_master(placeholder)

    def host_bytes(self) -> int:
        return sum(s.buf.nbytes for s in self.slots)

    def stats(self) -> dict[str, Any]:
        return {**self.store.stats(), "ring_buffers": len(self.slots), "ring_bytes": self.host_bytes(),
                "demand_reads": self.demand_reads}

    def close(self) -> None:
        self.store.close()


def open_offload(cfg: Any, units: list[HostUnit], device: torch.device, piece: int,
                 masters: frozenset[int] = frozenset(), resident: int = 0) -> OffloadedMoments:
    """The disk store and ring for ``EngineConfig`` ``cfg`` (directory claimed, space checked, speed probed);
    ``masters``: the units whose master goes to disk too; ``resident``: the resolved resident-layer count."""
    from slideformer.memory.disk_io import resolve_backend

    if not cfg.offload_dir:
        raise ConfigError("engine.offload needs engine.offload_dir (a directory on a local NVMe disk)")
    if cfg.resident_layers > 0 or resident > 0:
        raise ConfigError("engine.resident_layers keeps those layers' moments on the device; it cannot be combined "
                          "with engine.offload (set one of them to 0/'none')")
    store = DiskStore(cfg.offload_dir, {key_of(u): file_bytes(u, u.index in masters) for u in units},
                      resolve_backend(cfg.offload_io, device), cfg.offload_io_threads)
    try:
        return OffloadedMoments(units, store, cfg.offload_prefetch, piece, masters)
    except BaseException:
        store.close()
        raise
