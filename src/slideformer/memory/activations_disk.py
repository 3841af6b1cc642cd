"""Activation checkpoints on disk: each decoder layer's input in one file, staged through a small host ring.

Same interface as ``memory.activations.ActivationStore`` (``ensure``/``save``/``prefetch``/``get``/``release``,
``stream``, ``host_bytes``, ``pinned_bytes``), selected by ``engine.offload_activations``. Owns one file
(``activations`` + ``SUFFIX``) in a ``DiskStore`` under ``engine.offload_dir`` (the moments' store when that
tier is on, so both share the directory and its owner file; else a store of its own), layer j's input at
``j * stride`` (``stride``: the largest micro-batch's input, ALIGN-rounded), and a ring of ``RING``
page-aligned host buffers (page-locked in place on CUDA), allocated in ``ensure``.

Forward: ``save(j)`` copies layer j's input into a ring buffer on the activation stream; the ``sf-acts``
thread waits for that copy's event, then the DiskStore pool writes the buffer at layer j's offset.
Backward: ``prefetch(j)`` queues reads of layers j .. j-READ_AHEAD+1 into ring buffers and, once layer j's
read has landed, copies it into the two-deep device ring (else ``get`` does, after waiting for the read). A
buffer keeps its layer after the write, so the last layers of forward are not read back. The last layer's
input never leaves the device.

Invariant (nothing lost, nothing stale): a ring buffer is refilled (from the device or the disk) only after
its own write and read finished and its last copy to the device completed; a read of layer j waits for the
write of layer j's newest input; a write of layer j waits for layer j's previous write and read; a buffer
serves layer j only while it holds j's newest version. I/O errors are recorded by future callbacks and
raised on the main thread at its next call, naming the file and the OS error.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slideformer.errors import ConfigError, SlideformerError, WorkerError
from slideformer.memory.activations import DeviceRing
from slideformer.memory.disk import DiskError, DiskStore
from slideformer.memory.disk_io import AlignedBuffer, resolve_backend, round_up
from slideformer.memory.disk_owner import SUFFIX
from slideformer.runtime.device import DeviceOps
from slideformer.runtime.watchdog import thread_dump

KEY = "activations"
"""The file's key in the DiskStore (``activations.sfstate``: cleared with the other state files of a crash)."""
RING = 4
"""Host buffers of one layer input each."""
READ_AHEAD = 3
"""Layers read from disk per ``prefetch(j)``: j and the next READ_AHEAD-1 in backward order (< RING)."""


@dataclass
class _Buf:
    buf: AlignedBuffer
    layer: int = -1
    """Whose input the buffer holds (or is reading), -1 when none."""
    version: int = -1
    """Which save of that layer (the store's per-layer counter)."""
    ready: Future | None = None
    """Completes when the read into the buffer has landed (None: filled from the device, stream-ordered)."""
    write: Future | None = None
    """The last write to disk out of this buffer."""
    h2d: Any = None
    """Event of the last copy to the device out of this buffer (None on the CPU or when already waited for)."""


class DiskActivationStore:
    """Per-layer checkpoints in a file, a ring of host buffers, and a two-deep device prefetch ring."""

    def __init__(self, ops: DeviceOps, num_layers: int, hidden: int, dtype: torch.dtype, store: DiskStore,
                 owns_store: bool, timeout: float) -> None:
        self.ops = ops
        self.num_layers = num_layers
        self.hidden = hidden
        self.dtype = dtype
        self.elt = torch.tensor([], dtype=dtype).element_size()
        self.store = store
        self.owns_store = owns_store
        self.timeout = timeout
        self.path: Path = store.directory / f"{KEY}{SUFFIX}"
        self.capacity = 0
        self.stride = 0
        self.slots: list[_Buf] = []
        self.stream = ops.new_stream()
        self.dev = DeviceRing(ops, num_layers, self.stream)
        self.pinned_bytes = 0
        self.cache_hits = 0
        """Backward layer inputs found in the ring (no disk read)."""
        self.error: BaseException | None = None
        self._error_what = ""
        self._version = [0] * num_layers
        self._write: dict[int, Future] = {}
        self._read: dict[int, Future] = {}
        self._locked: list[torch.Tensor] = []
        self._lock = threading.Lock()
        device = ops.device

        def _init() -> None:
            if ops.is_cuda:
                torch.cuda.set_device(device)

        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sf-acts", initializer=_init)
        self._closed = False

    # -- sizing ------------------------------------------------------------------------------------------
    def ensure(self, tokens: int) -> None:
        """Size the ring, the device buffers and the file for ``tokens`` tokens (only when a larger batch
        first arrives; every transfer of the old layout finishes first)."""
        if tokens <= self.capacity:
            return
        self._drain()
        self._unlock()
        saved = max(self.num_layers - 1, 0)  # the last layer's input stays on the device
        stride = round_up(tokens * self.hidden * self.elt)
        if saved:
            self.store.reserve(KEY, saved * stride)
        self.slots = [_Buf(AlignedBuffer(stride)) for _ in range(min(RING, saved))]
        for s in self.slots:
            if self.ops.page_lock(s.buf.bytes):  # DMA to and from the ring runs at pinned speed
                self._locked.append(s.buf.bytes)
        self.pinned_bytes = sum(t.numel() for t in self._locked)
        self.dev.allocate(tokens * self.hidden, self.dtype)
        self.stride = stride
        self.capacity = tokens

    def host_bytes(self) -> int:
        return sum(s.buf.nbytes for s in self.slots)

    def file_bytes(self) -> int:
        return self.store.sizes.get(KEY, 0)

    # -- forward -----------------------------------------------------------------------------------------
    def save(self, j: int, x: torch.Tensor, compute_stream: Any) -> None:
        """Checkpoint layer ``j``'s input ``x``: to a ring buffer on the activation stream, then to disk."""
        if j == self.num_layers - 1:
            self.dev.keep(x)
            return
        self._raise_if_failed()
        self._version[j] += 1
        slot = self._victim(protect=set(), horizon=self.num_layers)
        # The buffer's last write still reads it and a read may still land in it: both must finish before the
        # device overwrites it (its last copy to the device is ordered before this one by the stream).
        self._wait(slot.write, f"the disk write out of the ring buffer before saving layer {j}'s input")
        self._wait(slot.ready, f"the disk read into the ring buffer before saving layer {j}'s input")
        n = x.numel()
        # The activation stream must not read x before the compute stream has written it.
        self.ops.wait(self.stream, self.ops.record(compute_stream))
        with self.ops.on(self.stream):
            self.ops.copy(slot.buf.view(self.dtype, n), x.reshape(-1))
            copied = self.ops.record(self.stream)
        # x is freed by the compute stream's allocator; keep it until this copy is done.
        self.ops.keep_alive(x, self.stream)
        slot.layer, slot.version, slot.ready, slot.h2d = j, self._version[j], None, None
        # The write starts once the copy has landed (the sf-acts thread waits for its event) and after layer
        # j's previous write and read (the same file range), so the file ends with this version.
        after = [f for f in (self._landed(copied), self._write.get(j), self._read.get(j)) if f is not None]
        fut = self.store.write(KEY, slot.buf, n * self.elt, after, offset=j * self.stride)
        fut.add_done_callback(self._noter(f"write of layer {j}'s input"))
        slot.write = self._write[j] = fut

    # -- backward ----------------------------------------------------------------------------------------
    def prefetch(self, j: int, shape: torch.Size) -> None:
        """Queue the disk reads of layers ``j`` .. ``j-READ_AHEAD+1`` and, if ``j``'s has landed, its copy to
        the device."""
        if j < 0 or j == self.num_layers - 1 or self.dev.has(j):
            return
        self._raise_if_failed()
        n = shape.numel()
        lowest = max(j - READ_AHEAD + 1, 0)
        protect = set(range(lowest, j + 1))
        held = self._holding(j)
        if held is not None and held.ready is None:
            self.cache_hits += 1
        for k in range(j, lowest - 1, -1):
            if self._holding(k) is None:
                self._fetch(k, n, protect, horizon=j)
        slot = self._holding(j)
        if slot is not None and (slot.ready is None or slot.ready.done()):
            self._upload(j, slot, shape)

    def get(self, j: int, shape: torch.Size, compute_stream: Any) -> torch.Tensor:
        """Layer ``j``'s input on the device, ready for the compute stream."""
        if j == self.num_layers - 1:
            return self.dev.take_kept()
        if not self.dev.has(j):
            self.prefetch(j, shape)
        if not self.dev.has(j):
            slot = self._holding(j)
            if slot is None:
                raise SlideformerError(f"activation store: layer {j}'s input is not in the ring (internal error)")
            # The device copy reads the ring buffer: the disk read into it must have landed.
            self._wait(slot.ready, f"the disk read of layer {j}'s input")
            self._upload(j, slot, shape)
        return self.dev.take(j, compute_stream)

    def release(self, j: int, compute_stream: Any) -> None:
        """Layer ``j``'s backward has been queued: its device buffer is free once that work is done."""
        self.dev.release(j, compute_stream)

    # -- the ring ----------------------------------------------------------------------------------------
    def _live(self, s: _Buf) -> bool:
        return s.layer >= 0 and s.version == self._version[s.layer]

    def _holding(self, k: int) -> _Buf | None:
        return next((s for s in self.slots if s.layer == k and self._live(s)), None)

    def _victim(self, protect: set[int], horizon: int) -> _Buf:
        """The buffer to refill: one holding nothing current or a layer above ``horizon`` (consumed), else the
        lowest layer (needed last in backward); never one holding a current layer in ``protect``."""
        free = [s for s in self.slots if not (self._live(s) and s.layer in protect)]
        if not free:
            raise SlideformerError("activation ring exhausted (internal error: more layers protected than buffers)")
        return min(free, key=lambda s: (1, s.layer) if self._live(s) and s.layer <= horizon else (0, 0))

    def _fetch(self, k: int, n: int, protect: set[int], horizon: int) -> None:
        """Queue the disk read of layer ``k``'s input (``n`` elements) into a ring buffer."""
        if k not in self._write:
            raise SlideformerError(f"activation store: layer {k}'s input was never saved (forward did not run)")
        slot = self._victim(protect, horizon)
        # The buffer's own write and read must be done and its last copy to the device must have completed
        # before the read overwrites it; layer k's newest input must be on disk before it is read.
        after = [f for f in (slot.write, slot.ready, self._landed(slot.h2d), self._write[k]) if f is not None]
        fut = self.store.read(KEY, slot.buf, n * self.elt, after, offset=k * self.stride)
        fut.add_done_callback(self._noter(f"read of layer {k}'s input"))
        slot.layer, slot.version, slot.ready, slot.h2d = k, self._version[k], fut, None
        self._read[k] = fut

    def _upload(self, j: int, slot: _Buf, shape: torch.Size) -> None:
        # The ring buffer is refilled only after this copy out of it completed (``h2d``, see _fetch and save).
        slot.h2d = self.dev.upload(j, slot.buf.view(self.dtype, shape.numel()).view(shape), shape)

    def _landed(self, event: Any) -> Future | None:
        """A future that completes when ``event`` has (None for None: the CPU, or nothing pending)."""
        if event is None:
            return None
        return self._waiter.submit(self._host_wait, event)

    def _host_wait(self, event: Any) -> None:
        self.ops.host_wait(event)  # sf-acts: the disk must not touch a ring buffer the stream still copies

    # -- errors and waiting ------------------------------------------------------------------------------
    def _noter(self, what: str) -> Any:
        def note(fut: Future) -> None:
            exc = fut.exception()
            with self._lock:
                if exc is not None and self.error is None:
                    self.error, self._error_what = exc, what
        return note

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self._failure(self._error_what, self.error)

    def _failure(self, what: str, exc: BaseException) -> DiskError:
        cause = exc.__cause__ if isinstance(exc, DiskError) and exc.__cause__ is not None else exc
        err = DiskError(f"activation checkpoint {what} failed on {self.path}: {cause}")
        err.__cause__ = exc
        return err

    def _wait(self, fut: Future | None, what: str) -> None:
        if fut is None:
            return
        try:
            fut.result(self.timeout)
        except FutureTimeout:
            raise WorkerError(f"no progress for {self.timeout:g} s while waiting for {what} ({self.path}); raise "
                              f"engine.watchdog_s if the disk is that slow, otherwise this is a hang (stacks "
                              f"below).\n{thread_dump()}") from None
        except BaseException as exc:
            with self._lock:
                noted = self._error_what if self.error is not None else ""
            raise self._failure(noted or what, exc) from exc

    def _pending(self) -> list[Future]:
        return [f for s in self.slots for f in (s.ready, s.write) if f is not None] + [
            *self._write.values(), *self._read.values()]

    def _drain(self, quiet: bool = False) -> None:
        """Wait for every transfer (ring buffers, file, copies to the device); then nothing refers to the ring."""
        for f in self._pending():
            try:
                self._wait(f, "an activation checkpoint transfer")
            except Exception:
                if not quiet:
                    raise
        for s in self.slots:
            self.ops.host_wait(s.h2d)  # outside the step: the ring is about to be freed or resized
            s.h2d = None
        self._write.clear()
        self._read.clear()
        if not quiet:
            self._raise_if_failed()

    def _unlock(self) -> None:
        for t in self._locked:
            self.ops.unregister_host(t)  # page-locked memory is unregistered before it is freed
        self._locked.clear()
        self.pinned_bytes = 0

    def stats(self) -> dict[str, Any]:
        return {**self.store.stats(), "activation_file": str(self.path), "activation_file_bytes": self.file_bytes(),
                "ring_buffers": len(self.slots), "ring_bytes": self.host_bytes(), "cache_hits": self.cache_hits}

    def close(self) -> None:
        """Wait for queued transfers (errors were already reported), stop the thread, free the ring; the file
        goes with the store (closed here when this store owns it)."""
        if self._closed:
            return
        self._closed = True
        self._drain(quiet=True)
        self._waiter.shutdown(wait=True)
        self._unlock()
        self.slots = []
        if self.owns_store:
            self.store.close()


def open_activation_store(cfg: Any, ops: DeviceOps, num_layers: int, hidden: int, dtype: torch.dtype,
                          shared: DiskStore | None, dist: Any = None) -> DiskActivationStore:
    """The disk-backed activation store for ``EngineConfig`` ``cfg``: in ``shared`` (the moments' store, same
    directory and owner file) when given, else in a store of its own under ``cfg.offload_dir``."""
    if not cfg.offload_dir:
        raise ConfigError("engine.offload_activations needs engine.offload_dir (a directory on a local NVMe disk)")
    if dist is not None:
        raise ConfigError("engine.offload_activations is not supported with data-parallel training yet (the ranks "
                          "would share one offload_dir): set it to false")
    if shared is not None:
        return DiskActivationStore(ops, num_layers, hidden, dtype, shared, False, cfg.watchdog_s)
    store = DiskStore(cfg.offload_dir, {}, resolve_backend(cfg.offload_io, ops.device), cfg.offload_io_threads)
    try:
        return DiskActivationStore(ops, num_layers, hidden, dtype, store, True, cfg.watchdog_s)
    except BaseException:
        store.close()
        raise
