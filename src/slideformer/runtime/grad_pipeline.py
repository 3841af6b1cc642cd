"""The gradient pipeline: a downloader thread parks gradients on the host, an optimizer thread consumes them.

The downloader copies each unit's gradient out of its device slot, chunk by chunk, into a fixed pool of
pinned *parking* chunks, and releases the slot as soon as the last copy is queued: the GPU never waits
for AdamW. The optimizer thread consumes what ``runtime/grad_order.pick`` chooses, a chunk per turn: by
when the next forward needs the weights (the lowest unit first among landed units and *background* work, the
split embedding update's early part, ``runtime/embedding_split.py``), only chunks whose copy has completed,
landed units first when fewer than a quarter of the pool's chunks are free (consuming them frees the chunks
the downloader, and so the GPU's slot release, waits for). Backward produces units top-down, so what is left
when it ends is the top layers, whose updates overlap the next forward; a lower unit landing mid-unit (the
embedding's gradient, the last of backward) waits one chunk. With nothing ready it polls for the next copy.
With the moments on disk (``memory/offload.py``) it consumes whole units in submission order instead
(backward order, or forward order for the deferred updates), the order the disk ring prefetches in, and
binds each chunk's moments (and master, ``engine.offload='all'``) with the ring's ``enter`` (``leave`` after
the unit). A unit with an upload copy (``engine.host_copy``) gets it written by AdamW in the same pass, in
both schedules.

Ordering rules (the invariant):
  * items of the same unit are consumed in submission order (accumulation adds in micro-batch order);
  * a *task* (norm, deferred update) runs only after every item submitted before it, and nothing
    submitted after it runs before it; a *background* task or drain does not hold back later items of
    other units, but later items of its own unit and later tasks wait for it;
  * a parking chunk is reused only after its consumer finished with it;
  * the optimizer never blocks on a copy in flight (it polls; with the disk tier it waits only for the unit
    being downloaded), so every parked chunk is eventually consumed and the pool cannot deadlock.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import torch
from torch.profiler import record_function

from slideformer.memory.host_state import HostUnit
from slideformer.memory.offload import OffloadedMoments
from slideformer.optim.adamw import FlatAdamW, UpdateSpec, adamw_range
from slideformer.runtime.device import DeviceOps
from slideformer.runtime.embedding_split import RowUpdate
from slideformer.runtime.grad_order import POLL_S, Parked, Task, pick
from slideformer.runtime.staged import StagedReady
from slideformer.runtime.transfer import Accumulate, Update, _Worker


def _copy_of(unit: HostUnit, lo: int, hi: int) -> torch.Tensor | None:
    """Elements ``[lo, hi)`` of the unit's upload copy (``engine.host_copy``), None without one."""
    return None if unit.upload_copy is None else unit.upload_copy[lo:hi]


class GradPipeline:
    """Downloader + optimizer threads over a pinned parking pool."""

    def __init__(self, ops: DeviceOps, chunk: int, pool_chunks: int, dtype: torch.dtype, adam: FlatAdamW,
                 offload: OffloadedMoments | None = None) -> None:
        self.ops = ops
        self.offload = offload
        self.chunk = chunk
        self.adam = adam
        self.down = _Worker(ops, "sf-grad-down", chunk, 0, dtype)
        self.pool = [ops.host_empty(chunk, dtype) for _ in range(pool_chunks)]
        self._free = list(range(pool_chunks))
        self.reserve = max(1, pool_chunks // 4)
        """Free parking chunks below which fully landed units go before background work (module docstring)."""
        self._in_flight = False  # a parked chunk's copy is still running: the optimizer polls (``_run``)
        self._cv = threading.Condition()
        self._pending: list[Parked | Task] = []
        self._seq = itertools.count()
        self._closed = False
        self._error: BaseException | None = None
        self.last_progress = ""
        self._thread = threading.Thread(target=self._run, name="sf-optim", daemon=True)
        self._thread.start()

    # -- submission (main thread) ----------------------------------------------------------------
    def submit_drain(self, sources: list[tuple[HostUnit, torch.Tensor]], compute_event: Any,
                     release: Future | None, action: Accumulate | Update | RowUpdate,
                     background: frozenset[int] = frozenset()) -> dict[int, Future]:
        """Queue the download of ``sources`` (unit, flat gradient view); returns a future per unit that
        completes when the optimizer has consumed that unit's gradient. Units in ``background`` are consumed
        as background work (module docstring). ``compute_event``: after which the gradients are final, or a
        ``StagedReady`` for one source final in parts."""
        with self._cv:
            items = []
            for u, _ in sources:
                n = action.numel if isinstance(action, RowUpdate) else u.shard_len
                items.append(Parked(next(self._seq), u, action, n, -(-n // self.chunk),
                                    background=u.index in background))
            self._pending.extend(items)
        self.down.submit(self._download, items, [src for _, src in sources], compute_event, release)
        return {it.unit.index: it.future for it in items}

    def submit_task(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the optimizer thread after everything submitted so far."""
        with self._cv:
            task = Task(next(self._seq), fn, args)
            self._pending.append(task)
            self._cv.notify_all()
        return task.future

    def submit_background(self, unit: HostUnit, fn: Callable[..., Iterator[Any]], *args: Any) -> Future:
        """Run ``fn(*args)`` (an iterator, one chunk of work per step, each yielding what it did) as background
        work of ``unit``: after the earlier items of that unit and tasks, one step per turn, ordered with the
        landed gradients by unit index (module docstring)."""
        with self._cv:
            task = Task(next(self._seq), fn, args, background=True, unit_index=unit.index)
            self._pending.append(task)
            self._cv.notify_all()
        return task.future

    # -- downloader thread -----------------------------------------------------------------------
    def _take_chunk(self) -> int:
        with self._cv:
            while not self._free:
                if self._closed:
                    raise RuntimeError("gradient pipeline closed")
                self._cv.wait(0.1)  # the optimizer frees parking chunks as it consumes them
            return self._free.pop()

    def _download(self, items: list[Parked], sources: list[torch.Tensor], compute_event: Any,
                  release: Future | None) -> None:
        staged = compute_event if isinstance(compute_event, StagedReady) else None
        ring = staged.ring if staged is not None else None
        try:
            if staged is not None and len(items) != 1:
                raise ValueError("a staged gradient is one source")
            if staged is None:
                # The gradients are produced by the compute stream: copy only after it wrote them.
                self.ops.wait(self.down.stream, compute_event)
            with self.ops.on(self.down.stream), record_function("sf/grad_download"):
                for it, src in zip(items, sources):
                    if self.down.stream is not None:
                        # The copies below read src on this stream after the caller may have dropped it (a
                        # buffer replaced by a larger one): the allocator must not reuse it before they ran.
                        src.record_stream(self.down.stream)
                    src = self.reduce(it.unit, src, isinstance(it.action, Update))
                    with self._cv:
                        it.started = True
                    for lo in range(0, it.length, self.chunk):
                        hi = min(lo + self.chunk, it.length)
                        if staged is not None and ring is None:
                            # This chunk's rows are written by one block of the head: copy only after that block.
                            self.ops.wait(self.down.stream, staged.event_for(hi))
                        k = self._take_chunk()
                        if ring is None:
                            self.ops.copy(self.pool[k][:hi - lo], src[lo:hi])
                        else:  # the chunk's rows, a block's piece at a time from its ring slot
                            for a, b, piece in ring.pieces(lo, hi):
                                # The piece's block must be written first; the main thread waits for this copy
                                # before writing the slot's next block, so a chunk never waits for a later block.
                                self.ops.wait(self.down.stream, staged.event_for(b))
                                self.ops.copy(self.pool[k][a - lo:b - lo], piece)
                                ring.copies.mark(b, self.ops.record(self.down.stream))
                        event = self.ops.record(self.down.stream)
                        with self._cv:
                            it.chunks.append((k, lo, hi, event))
                            self._cv.notify_all()
                    with self._cv:
                        it.landed = True
                        self._cv.notify_all()
                if release is not None:
                    # Every copy out of the slot is queued: it is free once the last one has run.
                    release.set_result(self.ops.record(self.down.stream))
                    release = None
        except BaseException as exc:
            if ring is not None:
                ring.copies.abort(exc)  # the main thread may be waiting for a ring slot
            if release is not None:
                release.set_exception(exc)
            with self._cv:
                for it in items:
                    it.error = it.error or exc
                    it.started = it.landed = True
                self._cv.notify_all()
            raise

    def reduce(self, unit: HostUnit, grad: torch.Tensor, measure: bool) -> torch.Tensor:
        """The part of ``grad`` (the unit's flat gradient in its slot) this rank's optimizer consumes.

        Single process: all of it. Data-parallel runs (``slideformer.dist``) override this with the
        cross-rank reduction, issued on the downloader's stream, and measure the reduced part's norm
        there when ``measure`` (the overlap schedule's gradients, consumed as they land).
        """
        return grad

    def end_step(self) -> None:
        """Main thread, after a step's last drain: the step's gradients are all queued (data-parallel runs
        close the step's device-side norm here)."""

    # -- optimizer thread ------------------------------------------------------------------------
    def global_sq(self, units: list[HostUnit]) -> float:
        """Squared global gradient norm from the units' ``sq_norm`` (data-parallel runs sum over ranks)."""
        return sum(u.sq_norm for u in units)

    def _eligible(self) -> Parked | Task | None:
        """The next item to consume (``grad_order.pick``; called under the lock)."""
        item, self._in_flight = pick(self._pending, self.ops.done, short=len(self._free) < self.reserve,
                                     in_submission_order=self.offload is not None)
        return item

    def _run(self) -> None:
        while True:
            with self._cv:
                item = self._eligible()
                while item is None:
                    if self._closed:
                        return
                    # New gradients or tasks arrive from the downloader / main thread (they notify); a copy
                    # still running on the device does not: poll for it every half millisecond.
                    self._cv.wait(POLL_S if self._in_flight else 0.1)
                    item = self._eligible()
            if isinstance(item, Task):
                done = self._run_background_step(item) if item.background else self._run_task(item)
            elif self.offload is not None:
                done = self._consume(item)  # the disk ring binds one unit's pieces from enter to leave
            else:
                done = self._consume_one(item)  # a chunk per turn: a lower unit landing meanwhile goes next
            with self._cv:
                if done:
                    self._pending.remove(item)
                self._cv.notify_all()

    def _run_task(self, task: Task) -> bool:
        if self._error is not None:
            task.future.set_exception(self._error)
            return True
        try:
            task.future.set_result(task.fn(*task.args))
        except BaseException as exc:
            self._error = exc
            task.future.set_exception(exc)
        return True

    def _run_background_step(self, task: Task) -> bool:
        """One step of a background task; True when it is finished (or failed)."""
        if self._error is not None:
            task.future.set_exception(self._error)
            return True
        try:
            if task.steps is None:
                task.steps = iter(task.fn(*task.args))
            self.last_progress = f"background: {next(task.steps)}"
            return False
        except StopIteration:
            task.future.set_result(None)
        except BaseException as exc:
            self._error = exc
            task.future.set_exception(exc)
        return True

    def _consume(self, it: Parked) -> bool:
        """Consume ``it`` whole (the disk tier), chunk by chunk as its copies land, freeing each parking chunk."""
        while it.consumed < it.n_chunks:
            if not self._consume_chunk(it):
                break
        self._finish(it)
        return True

    def _consume_one(self, it: Parked) -> bool:
        """The drain's next chunk (once its copy landed); True when the drain is finished."""
        if self._consume_chunk(it) and it.consumed < it.n_chunks:
            return False
        self._finish(it)
        return True

    def _consume_chunk(self, it: Parked) -> bool:
        """Apply chunk ``it.consumed`` once it landed and free its parking chunk; False if it never will."""
        i = it.consumed
        with self._cv:
            while len(it.chunks) <= i and it.error is None:
                self._cv.wait(0.1)  # the downloader is still copying this unit
            if len(it.chunks) <= i:
                return False
            k, lo, hi, event = it.chunks[i]
        try:
            if self._error is None and it.error is None:
                self.ops.host_wait(event)  # this chunk's device-to-host copy has landed
                if self.offload is not None and isinstance(it.action, Update):
                    self.last_progress = f"disk read of {it.unit.name}[{lo}:{hi}] state"
                    self.offload.enter(it.unit, lo, hi, -1)  # moments (+ master) from disk; then units below
                self._apply(it, lo, hi, self.pool[k][:hi - lo])
        except BaseException as exc:
            self._error = exc
        finally:
            it.consumed += 1
            with self._cv:
                self._free.append(k)
                self._cv.notify_all()
        return True

    def _finish(self, it: Parked) -> None:
        """After a drain's last chunk: the disk ring's last piece, the future."""
        on_disk = self.offload is not None and isinstance(it.action, Update)
        if on_disk:
            try:
                self.offload.leave()  # the last piece is written back asynchronously
            except BaseException as exc:
                self._error = self._error or exc
        err = it.error or self._error
        if err is not None:
            it.future.set_exception(err)
        else:
            it.future.set_result(None)

    def _apply(self, it: Parked, lo: int, hi: int, grad: torch.Tensor) -> None:
        unit, action = it.unit, it.action
        if isinstance(action, RowUpdate):
            self.last_progress = f"{unit.name} batch rows [{lo}:{hi}]"
            with record_function(adamw_range(unit)):
                action.split.update_rows(action.job, lo, hi, grad)
            return
        self.last_progress = f"{unit.name}[{lo}:{hi}]"
        if isinstance(action, Update):
            # AdamW reads the compute-dtype gradient as it landed (the kernel upcasts in registers) and writes
            # the upload copy, if the unit has one, in the same pass.
            apply = action.apply.get(unit.index)
            with record_function(adamw_range(unit)):
                if apply is not None:
                    apply(lo, hi, grad)
                else:
                    self.adam.update(unit, lo, hi, grad, action.specs[unit.index], out=_copy_of(unit, lo, hi))
            return
        acc = unit.grad_acc[lo:hi]
        if action.first:
            if lo == 0:
                unit.sq_norm = 0.0
            acc.copy_(grad)
        else:
            acc.add_(grad)
        if action.last and action.host_norm:
            unit.sq_norm += float(torch.dot(acc, acc))

    def apply_accumulated(self, unit: HostUnit, spec_fut: Future, step: int, lr: float) -> None:
        """Deferred schedule: AdamW on the unit's accumulated gradient, scaled by the clip coefficient."""
        _, coef = spec_fut.result()
        spec = UpdateSpec(step=step, lr=lr, grad_scale=coef)
        try:
            for lo in range(0, unit.shard_len, self.chunk):
                hi = min(lo + self.chunk, unit.shard_len)
                self.last_progress = f"update {unit.name}[{lo}:{hi}]"
                if self.offload is not None:
                    self.last_progress = f"disk read of {unit.name}[{lo}:{hi}] state"
                    self.offload.enter(unit, lo, hi, +1)  # moments (+ master) from disk; then units above
                with record_function(adamw_range(unit)):
                    self.adam.update(unit, lo, hi, unit.grad_acc[lo:hi], spec, out=_copy_of(unit, lo, hi))
        finally:
            if self.offload is not None:
                self.offload.leave()  # the last piece is written back asynchronously

    def staging_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool)

    def close(self) -> None:
        self.down.close()
        with self._cv:
            self._closed = True
            for item in self._pending:
                if isinstance(item, Parked) and not item.landed:
                    item.error = item.error or RuntimeError("gradient pipeline closed")
            self._cv.notify_all()
        self._thread.join(timeout=30)
