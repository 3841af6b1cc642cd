"""Upload workers (FP32 master -> compute dtype -> device slot) and the drain actions.

Each worker is a single thread with its own stream and its own small ring of staging chunks, and runs
its tasks in submission order. An upload DMAs the unit's pinned compute-dtype copy as is when it has
one (``engine.host_copy``, written by the optimizer), else DMAs a page-locked FP32 master and casts on
the device, or casts on the CPU one chunk while the previous chunk's copy is in flight. Tasks return futures; an
exception in a worker reaches the main thread through the future it is waiting on. The gradient side
lives in ``grad_pipeline``.

Invariant: a staging chunk is overwritten only after the copy that last read it has finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import record_function

from slideformer.memory.host_state import HostUnit
from slideformer.optim.adamw import UpdateSpec
from slideformer.runtime import waits
from slideformer.runtime.device import DeviceOps
from slideformer.runtime.window import Segment, Slot


def _result(fut: Future | None) -> Any:
    return None if fut is None else fut.result()


class _Worker:
    """One thread, one stream, one staging ring."""

    def __init__(self, ops: DeviceOps, name: str, chunk: int, count: int, dtype: torch.dtype) -> None:
        self.ops = ops
        self.stream = ops.new_stream()
        self.chunk = chunk
        self.ring = [ops.host_empty(chunk, dtype) for _ in range(count)]
        self.ring_events: list[Any] = [None] * count
        self._next = 0
        self.busy = threading.Event()
        self.last_progress = ""
        device = ops.device

        def _init() -> None:
            if ops.is_cuda:
                torch.cuda.set_device(device)

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_init)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.pool.submit(fn, *args)

    def take_chunk(self) -> tuple[int, torch.Tensor]:
        k = self._next
        self._next = (k + 1) % len(self.ring)
        return k, self.ring[k]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Uploader(_Worker):
    """Uploads units into slots, converting FP32 master weights chunk by chunk.

    A unit whose master is page-locked goes up as FP32 through a two-chunk device ring and is cast on
    the device (no CPU work, no host waits: the ring is reused in stream order). Any other unit is cast
    on the CPU into the pinned staging ring while the previous chunk is on the wire.
    """

    _gather_event: Any = None
    device_ring: list[torch.Tensor] = []
    gather: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    """Data-parallel runs (``slideformer.dist``): ``gather(whole, own)`` all-gathers a sharded unit's
    compute-dtype weights into the slot, ``own`` being this rank's part of ``whole``, on the current stream."""

    def enable_device_cast(self) -> None:
        """Allocate the FP32 device ring used for units with a page-locked master."""
        if not self.device_ring:
            self.device_ring = [self.ops.empty(self.chunk, torch.float32) for _ in range(2)]

    def upload(self, slot: Slot, segments: list[Segment], update_futs: list[Future],
               slot_waits: list[Future]) -> Any:
        """Queued by ``submit``: returns the device event at which the slot's weights are in place.

        Each segment's copy is queued as soon as its own update has landed, in slot order: the tied head's slot
        holds the embedding matrix (updated first) and then the final norm (updated last: the optimizer's highest
        unit index). Waiting for both before any copy put the matrix's 788 MB (Llama-3.2-3B) behind every layer
        upload of the forward (copies to the device run one at a time on this box), and the compute stream then
        waited for it: 11.5 ms of session 9's 3B timeline."""
        for r in slot_waits:
            # Earlier uses of the slot (compute, gradient download) must finish before we overwrite it.
            self.ops.wait(self.stream, waits.result(r, "slot release"))
        for seg, f in zip(segments, update_futs):
            # The unit's pending AdamW update must have landed before we read its master.
            waits.result(f, f"update of {seg.unit.name}")
            with self.ops.on(self.stream), record_function("sf/upload_host"):
                # This rank's part of the unit (all of it unless data-parallel sharding is on).
                u = seg.unit
                dst = slot.weight[seg.offset + u.shard_lo:seg.offset + u.shard_lo + u.shard_len]
                if u.upload_copy is not None:
                    # The optimizer's compute-dtype copy (same pass as the update): one DMA, no cast. It is
                    # rewritten only by the unit's next update, which follows this slot use's compute.
                    self.ops.copy(dst, u.upload_copy)
                elif u.registered and self.device_ring:
                    src = u.master
                    for i, lo in enumerate(range(0, u.shard_len, self.chunk)):
                        hi = min(lo + self.chunk, u.shard_len)
                        ring = self.device_ring[i % 2][:hi - lo]
                        self.ops.copy(ring, src[lo:hi])  # FP32 DMA straight from the page-locked master
                        dst[lo:hi].copy_(ring)  # cast on the device, in stream order after the copy
                else:
                    src = u.master  # (a master on disk, engine.offload='all', always has an upload copy)
                    for lo in range(0, u.shard_len, self.chunk):
                        hi = min(lo + self.chunk, u.shard_len)
                        k, stage = self.take_chunk()
                        # The copy that last read this staging chunk must be done before we refill it.
                        self.ops.host_wait(self.ring_events[k])
                        stage = stage[:hi - lo]
                        stage.copy_(src[lo:hi])  # FP32 -> compute dtype on the CPU, overlapping the last copy
                        self.ops.copy(dst[lo:hi], stage)
                        self.ring_events[k] = self.ops.record(self.stream)
                if u.sharded and self.gather is not None:
                    # Collective on this stream, after our shard's copy: every rank's shard -> the whole unit.
                    self.gather(slot.weight[seg.offset:seg.offset + u.padded], dst)
        return self.ops.record(self.stream)

    def gather_rows(self, unit: HostUnit, rows: int, ids: torch.Tensor, out: torch.Tensor,
                    scratch: torch.Tensor, stage: torch.Tensor, update_fut: Future, slot_waits: list[Future]) -> Any:
        """Embedding forward on the host: gather the rows of ``ids`` into ``out``, from the unit's compute-dtype
        upload copy when it has one (a tied embedding with ``engine.host_copy``), else from the FP32 master."""
        waits.result(update_fut, f"update of {unit.name}")  # the embedding's update must have landed
        for r in slot_waits:
            # The previous micro-batch's compute must be done reading ``out``.
            self.ops.wait(self.stream, waits.result(r, "embedding rows release"))
        n = ids.numel()
        width = unit.numel // rows
        copy = unit.upload_copy
        if copy is not None and copy.dtype == out.dtype and copy.numel() == unit.numel:
            # Bitwise the master's cast once the update landed (host_state's invariant): one pass over half the
            # bytes into the pinned stage, where the master's path reads FP32, writes it and casts it again. The
            # gather opens every step, on the compute stream's path (session 9's 3B timeline: 19.5 ms).
            return self._send_rows(out, stage, n * width, lambda st: torch.index_select(
                copy.view(rows, width), 0, ids, out=st.view(n, width)))
        table = unit.master.view(rows, width)
        picked = scratch[:n * width].view(n, width)
        torch.index_select(table, 0, ids, out=picked)
        if picked.data_ptr() == out.data_ptr():
            return self.ops.record(self.stream)  # gathered straight into the compute buffer
        if not self.ops.is_cuda:
            out[:n * width].copy_(picked.view(-1))  # the CPU plays the device: cast in place
            return None
        return self._send_rows(out, stage, n * width, lambda st: st.copy_(picked.view(-1)))

    def _send_rows(self, out: torch.Tensor, stage: torch.Tensor, numel: int,
                   fill: Callable[[torch.Tensor], Any]) -> Any:
        """``fill`` the pinned stage's first ``numel`` elements and queue their copy into ``out``: the device event
        of the copy."""
        # The previous gather's copy out of ``stage`` must be done before we refill it.
        self.ops.host_wait(self._gather_event)
        st = stage[:numel]
        fill(st)
        if st.data_ptr() == out.data_ptr():
            return self.ops.record(self.stream)  # the CPU plays the device: the stage is the compute buffer
        with self.ops.on(self.stream):
            self.ops.copy(out[:numel], st)
            self._gather_event = self.ops.record(self.stream)
        return self._gather_event


@dataclass
class Accumulate:
    """Drain action of the deferred schedule: add into the FP32 accumulator."""

    first: bool
    last: bool
    host_norm: bool = True
    """Compute the accumulated gradient's norm on the host (needed when several micro-batches add up;
    with one micro-batch the device already measured it)."""


@dataclass
class Update:
    """Drain action of the overlap schedule: run AdamW on the chunks as they land."""

    specs: dict[int, UpdateSpec]
    apply: dict[int, Callable[[int, int, torch.Tensor], None]] = field(default_factory=dict)
    """Units whose chunks ``[lo, hi)`` are applied by ``fn(lo, hi, grad)`` instead of AdamW over every element
    (the split embedding update's early part skips the batch's rows: ``runtime/embedding_split.py``)."""
