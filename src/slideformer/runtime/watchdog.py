"""Stall reports: what the main thread was waiting for, and where every pipeline thread stands.

Invariant: a wait on a worker never hangs silently; after ``EngineConfig.watchdog_s`` it becomes an
error whose message names the awaited stage and carries a stack dump of each slideformer thread.
"""

from __future__ import annotations

import sys
import threading
import traceback


def thread_dump(prefix: str = "sf-") -> str:
    """Stack traces of the live threads whose names start with ``prefix``."""
    frames = sys._current_frames()
    parts = []
    for t in threading.enumerate():
        if not t.name.startswith(prefix) or t.ident not in frames:
            continue
        stack = "".join(traceback.format_stack(frames[t.ident]))
        parts.append(f"--- thread {t.name} ---\n{stack}")
    return "\n".join(parts) or "(no pipeline threads alive)"


def stall_report(what: str, seconds: float, optimizer_progress: str) -> str:
    """The message of a watchdog failure."""
    return (f"no progress for {seconds:g} s while waiting for {what}; the optimizer thread last worked on "
            f"{optimizer_progress or 'nothing yet'}. Raise engine.watchdog_s if a single layer legitimately "
            f"takes that long; otherwise this is a hang (stacks below).\n{thread_dump()}")
