"""Exception types a user can catch; each message says what went wrong and what to do.

Invariant: errors raised for bad input derive from ``SlideformerError`` and are raised before any
large allocation; errors from worker threads are re-raised in the caller as ``WorkerError`` with the
original exception chained.
"""

from __future__ import annotations


class SlideformerError(Exception):
    """Base class of every error slideformer raises on purpose."""


class ConfigError(SlideformerError, ValueError):
    """A configuration value is invalid."""


class UnsupportedModelError(SlideformerError, ValueError):
    """The model architecture has no adapter."""


class BatchError(SlideformerError, ValueError):
    """A batch is malformed (shapes, dtypes, lengths)."""


class ModelPathError(SlideformerError, FileNotFoundError):
    """A model directory is missing or incomplete."""


class WorkerError(SlideformerError, RuntimeError):
    """A pipeline worker thread failed; the original exception is chained as ``__cause__``."""


class HostMemoryError(SlideformerError, MemoryError):
    """The host RAM a run would allocate exceeds what is available; raised before allocating."""


class DistError(SlideformerError, RuntimeError):
    """A collective with the other data-parallel ranks failed: another rank exited, crashed or stalled
    past the watchdog; its own log has the cause."""


class DeviceMemoryError(SlideformerError, MemoryError):
    """The GPU ran out of memory inside a step; the message carries the planner's advice."""
