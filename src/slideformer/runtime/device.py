"""Streams, events and copies behind one interface, so the same schedule runs on a GPU or the CPU.

On CUDA every method maps to the stream/event call of the same name. On the CPU ("the CPU plays the
device") there are no streams: copies complete when they return, events are already complete, and
waits are no-ops. The threads and hand-offs of the schedule stay the same in both cases, so CPU tests
exercise the real ordering.

Invariant: code outside this module never calls ``torch.cuda`` stream or event APIs directly. A
pinned allocation the system refuses (memlock limit, WSL's pinned-memory cap) never fails the run: the
buffer is pageable instead, counted in ``pinned_fallbacks`` / ``pageable_fallback_bytes``, and one
``RuntimeWarning`` per ``DeviceOps`` states the cause and the measured cost.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Host-to-device copy speeds measured on the H100 reference box (docs/design.md section 3).
PINNED_H2D_GBS = 55.0
PAGEABLE_H2D_GBS = 5.4


def add_squared_norm(acc: torch.Tensor, x: torch.Tensor, scratch: torch.Tensor) -> None:
    """``acc += ||x||^2`` in FP32 on the current stream, allocating nothing: ``scratch`` is a 2-element FP32
    tensor on ``acc``'s device that one caller reuses in its stream's order (the same arithmetic as
    ``acc += vector_norm(x).square()``)."""
    norm, sq = scratch[0], scratch[1]
    torch.linalg.vector_norm(x, dtype=torch.float32, out=norm)
    torch.mul(norm, norm, out=sq)
    acc.add_(sq)


EVENT_RING = 1024
"""Events per stream for ``DeviceOps.record``: a 3B step records ~320 over all its streams, so an event is recorded
again several steps later, long after its holders queued their waits."""


class _EventRing:
    """``EVENT_RING`` CUDA events taken in turn; ``take`` may be called from several threads (a shared counter's
    ``next`` is atomic; two threads given the same event record it twice on one stream: it keeps the later point)."""

    def __init__(self) -> None:
        self.events: list[Any] = [None] * EVENT_RING
        self.turn = itertools.count()

    def take(self) -> Any:
        i = next(self.turn) % EVENT_RING
        ev = self.events[i]
        if ev is None:
            ev = self.events[i] = torch.cuda.Event()
        return ev


class DeviceOps:
    """Device abstraction used by the engine, the transfer workers and the activation store."""

    def __init__(self, device: torch.device, pin_memory: bool = True, sync_copies: bool = False) -> None:
        self.device = device
        self.sync_copies = sync_copies and device.type == "cuda"
        self.is_cuda = device.type == "cuda"
        self.pin = pin_memory and self.is_cuda
        self.pinned_bytes = 0
        self.registered_bytes = 0
        self.device_bytes = 0
        self.pinned_fallbacks = 0
        """Pinned allocations that were refused and fell back to pageable memory."""
        self.pageable_fallback_bytes = 0
        """Bytes of those fallback buffers."""
        self._rings: dict[int, _EventRing] = {}
        """``record``'s event ring per stream, keyed by the CUDA stream handle."""
        self.exact_pinned: list[torch.Tensor] = []
        """Buffers from ``host_empty_exact`` that are page-locked: unregister them
        (``runtime.build.unregister_all``) before freeing."""
        if self.is_cuda and device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    # -- streams and events -------------------------------------------------------------------
    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device) if self.is_cuda else None

    def compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device) if self.is_cuda else None

    @contextlib.contextmanager
    def on(self, stream: Any) -> Iterator[None]:
        """Make ``stream`` current for the copies issued in this block (this thread only)."""
        if self.is_cuda:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                yield
        else:
            yield

    def record(self, stream: Any) -> Any:
        """An event marking all work queued on ``stream`` so far (None on the CPU: already done).

        The event comes from ``stream``'s ring of ``EVENT_RING`` events, made on first use, so the hot loop creates
        and destroys no CUDA events. A ring event is recorded again ``EVENT_RING`` records later on the same stream:
        a holder that has not queued its wait by then waits for that later point of the same stream, which implies
        the earlier one (never too early; at worst later, and every queued point completes without the host). A stream
        that waited for an earlier record keeps it: waits bind to the record current when they are queued."""
        if not self.is_cuda:
            return None
        ring = self._rings.get(stream.cuda_stream)
        if ring is None:
            ring = self._rings.setdefault(stream.cuda_stream, _EventRing())
        ev = ring.take()
        ev.record(stream)
        return ev

    def wait(self, stream: Any, event: Any) -> None:
        """Make ``stream`` wait (on the device, not the host) for ``event`` (or a list of events)."""
        if not self.is_cuda or event is None:
            return
        if isinstance(event, (list, tuple)):
            for ev in event:
                self.wait(stream, ev)
            return
        stream.wait_event(event)

    def done(self, event: Any) -> bool:
        """Whether ``event`` has completed (a non-blocking query; always on the CPU)."""
        return not self.is_cuda or event is None or bool(event.query())

    def host_wait(self, event: Any) -> None:
        """Block this host thread until ``event`` has completed."""
        if self.is_cuda and event is not None:
            event.synchronize()

    def scalar_reader(self) -> Callable[[torch.Tensor], float]:
        """A reader of device scalars for one thread: ``float(value)`` once the current stream's work before it is
        done, the thread asleep meanwhile. ``float()`` of a CUDA tensor spins a core in the driver until the GPU gets
        there (the runtime's default for one context on a many-core host), a core the CPU AdamW could use and CPU
        time that hides whether the main thread's issuing bounds a step. Reuses one pinned float and one blocking
        event: calls from one thread, one at a time."""
        if not self.is_cuda:
            return lambda value: float(value)
        host = torch.zeros(1, dtype=torch.float32, pin_memory=self.pin)
        done = torch.cuda.Event(blocking=True)

        def read(value: torch.Tensor) -> float:
            host.copy_(value.detach().reshape(1), non_blocking=True)  # behind the stream's work that makes it
            done.record(torch.cuda.current_stream(self.device))
            done.synchronize()  # a blocking event: the thread sleeps until the copy has landed
            return float(host[0])

        return read

    # -- memory -------------------------------------------------------------------------------
    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A device buffer (allocated once, at setup)."""
        t = torch.empty(numel, dtype=dtype, device=self.device)
        self.device_bytes += t.numel() * t.element_size()
        return t

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host staging buffer: pinned on CUDA when allowed, pageable otherwise.

        A refused pinned allocation falls back to pageable memory (see the module invariant).
        """
        if not self.pin:
            return torch.empty(numel, dtype=dtype)
        try:
            t = torch.empty(numel, dtype=dtype, pin_memory=True)
        except RuntimeError as exc:
            t = torch.empty(numel, dtype=dtype)
            self._pinned_fallback(t.numel() * t.element_size(), exc)
            return t
        self.pinned_bytes += t.numel() * t.element_size()
        return t

    def host_empty_exact(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A large long-lived host buffer page-locked at exactly its size (a pageable tensor registered in
        place: torch's pinned allocator rounds every size up to a power of two, up to twice the bytes).

        Kept in ``exact_pinned`` until the owner unregisters it; a refused registration leaves it pageable
        (see the module invariant).
        """
        t = torch.empty(numel, dtype=dtype)
        if not self.pin:
            return t
        if self.register_host(t):
            self.exact_pinned.append(t)
        else:
            self._pinned_fallback(t.numel() * t.element_size(), RuntimeError("cudaHostRegister failed"))
        return t

    def _pinned_fallback(self, nbytes: int, exc: RuntimeError) -> None:
        self.pinned_fallbacks += 1
        self.pageable_fallback_bytes += nbytes
        if self.pinned_fallbacks > 1:
            return
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"slideformer: pinned host memory could not be allocated ({nbytes / 2**20:.1f} MiB; {cause}), "
            "most likely the memlock limit (ulimit -l; raise it or run as a service with LimitMEMLOCK="
            "infinity) or WSL's cap on pinned memory. Falling back to pageable memory: host-to-device "
            f"copies from it run at about {PAGEABLE_H2D_GBS:g} GB/s instead of {PINNED_H2D_GBS:g} GB/s "
            f"pinned (about {PINNED_H2D_GBS / PAGEABLE_H2D_GBS:.0f}x slower, measured on the H100 box), and "
            "the copying thread blocks until each copy ends. Later fallbacks are counted in the memory "
            "report, not warned again.",
            RuntimeWarning,
            stacklevel=3,
        )

    def register_host(self, tensor: torch.Tensor) -> bool:
        """Page-lock an existing host tensor in place (cudaHostRegister), so DMA reads it directly.

        Returns False (the caller falls back) when not on CUDA or when the driver refuses, e.g. because
        of a memlock limit.
        """
        if not self.is_cuda or not self.pin:
            return False
        nbytes = tensor.numel() * tensor.element_size()
        err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)
        if int(err) != 0:
            return False
        self.registered_bytes += nbytes
        return True

    def page_lock(self, tensor: torch.Tensor) -> bool:
        """``register_host`` for a buffer that should be pinned: a refusal leaves it pageable and is counted
        (and warned once) as a pinned fallback (see the module invariant). False when not pinned."""
        if not self.pin:
            return False
        if self.register_host(tensor):
            return True
        self._pinned_fallback(tensor.numel() * tensor.element_size(), RuntimeError("cudaHostRegister failed"))
        return False

    def unregister_host(self, tensor: torch.Tensor) -> None:
        """Undo ``register_host``."""
        if self.is_cuda:
            torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
            self.registered_bytes -= tensor.numel() * tensor.element_size()

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy on the current stream; asynchronous between pinned host and device memory."""
        dst.copy_(src, non_blocking=self.is_cuda)
        if self.sync_copies:
            torch.cuda.synchronize(self.device)  # debugging mode only: no copy overlaps anything

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        """Tell the caching allocator ``tensor`` is in use on ``stream`` until its queued work ends."""
        if self.is_cuda:
            tensor.record_stream(stream)
