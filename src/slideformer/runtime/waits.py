"""Blocking waits on worker futures, named in profiler traces.

A thread that blocks on a future (the main thread on an upload or the embedding gather, an uploader on a
unit's pending AdamW update) does so inside a ``sf/wait`` profiler range, so a timeline says what
each stretch of idle GPU time waited for, and which thread waited (``sf/wait/<thread>: <what>``;
``benchmarks/timeline_read.py`` lists them per compute gap). A future already done is read without a range:
the common case costs one ``done()`` check.

Invariant: returns exactly what ``Future.result`` returns (or raises what it raises).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from torch.profiler import record_function

WAIT = "sf/wait"
"""Prefix of the ranges (timeline_read.py reads the rest as what was waited for)."""


def result(fut: Future, what: str, timeout: float | None = None) -> Any:
    """``fut.result(timeout)``; when it is not done yet, inside the range ``sf/wait/<thread>: <what>``."""
    if fut.done():
        return fut.result()
    with record_function(f"{WAIT}/{threading.current_thread().name}: {what}"):
        return fut.result(timeout=timeout)
