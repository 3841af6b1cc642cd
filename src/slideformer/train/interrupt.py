"""Ctrl-C during training: a request to stop after the current step, agreed on by every rank.

Owns the run's SIGINT handling: the first Ctrl-C only sets a flag (the loop finishes the step, saves and
returns), a second one raises ``KeyboardInterrupt`` as usual. Invariants: the previous SIGINT handler is
back in place when the block exits, however it exits; with data parallelism every rank reaches the same
stop decision, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def sigint_to_flag() -> Iterator[threading.Event]:
    """While active, the first Ctrl-C sets the returned event (the loop saves and stops); a second one
    raises KeyboardInterrupt as usual. Outside the main thread signals cannot be caught: no-op."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def agree(ctx: Any, stop: bool) -> bool:
    """Whether to stop: with data parallelism, every rank stops when any rank was asked to (Ctrl-C)."""
    return stop if ctx is None else ctx.any(stop)
