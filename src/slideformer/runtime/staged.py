"""Progress marks between two threads over a flat range: how far a producer got, and waiting for it.

Owns ``Progress`` and its use for the blocked head, ``StagedReady``: the main thread marks the head's gradient final a
block at a time and the downloader waits for each mark (``runtime/grad_pipeline.py``); the downloader marks its copies
out of the head's gradient ring and the main thread waits for them (``runtime/head_blocks.py``).

Invariant: marks are appended in order and never removed; a consumer returns the event of the first mark covering
what it asked for, or raises the producer's error once no mark covers it.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any

from torch.profiler import record_function

from slideformer.runtime.waits import WAIT


class Progress:
    """How far a producer thread got through a flat range: ``(end, event)`` marks in order, each saying elements
    ``[.., end)`` are done once ``event`` has completed (None on the CPU, where work is done when queued), and the
    producer's error. A consumer thread blocks in ``event_for`` until a mark covers what it needs."""

    def __init__(self, failed: str) -> None:
        self._failed = failed
        self._marks: list[tuple[int, Any]] = []
        self._error: BaseException | None = None
        self._cv = threading.Condition()

    def mark(self, end: int, event: Any) -> None:
        """Producer: elements ``[.., end)`` are done once ``event`` has completed."""
        with self._cv:
            self._marks.append((end, event))
            self._cv.notify_all()

    def abort(self, exc: BaseException) -> None:
        """Producer: it failed; a consumer waiting in ``event_for`` raises."""
        with self._cv:
            self._error = exc
            self._cv.notify_all()

    def event_for(self, hi: int, what: str | None = None) -> Any:
        """Consumer: the event after which elements ``[.., hi)`` are done; a wait that blocks runs inside the range
        ``sf/wait/<thread>: <what>`` when ``what`` is given (``runtime/waits.py``)."""
        with self._cv:
            found = self._covering(hi)
            if found:
                return found[0]
            with (record_function(f"{WAIT}/{threading.current_thread().name}: {what}") if what else nullcontext()):
                while not found:
                    self._cv.wait(0.1)  # the producer notifies with each mark
                    found = self._covering(hi)
            return found[0]

    def _covering(self, hi: int) -> tuple[Any, ...]:
        """(Under the lock) ``(event,)`` of the first mark covering ``hi``, or ``()``; raises the producer's error."""
        for end, event in self._marks:
            if end >= hi:
                return (event,)
        if self._error is not None:
            raise RuntimeError(self._failed) from self._error
        return ()


class StagedReady(Progress):
    """When each part of one source's gradient is final: the vocabulary-blocked head (``kernels/vocab_head.py``)
    writes the tied matrix's gradient a block of rows at a time, and its download starts with the first block.

    The main thread ``mark``s the end element of each final part with an event recorded after the work that
    writes it; the downloader copies a chunk only once a mark covers it (``event_for``, blocking on the host until
    the main thread has queued that part, then on the device for the event). ``abort`` wakes the downloader with
    the main thread's error when the head fails halfway. ``ring`` (``runtime/head_blocks.HeadGradRing``): the parts
    live in a ring of block buffers; the downloader copies the pieces it names and reports its progress to it."""

    def __init__(self, ring: Any = None) -> None:
        super().__init__("the head failed before its gradient was complete")
        self.ring = ring
