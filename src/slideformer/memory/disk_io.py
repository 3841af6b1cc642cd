"""Aligned host buffers, completion helpers and the choice of I/O backend for the disk tier.

Owns what the disk store (``memory/disk.py``) and its users share: the alignment every transfer keeps, the
page-aligned host buffers I/O goes through, a future over many futures, and whether kvikio is used.
Invariant: an ``AlignedBuffer`` starts on a page boundary and its length is an ``ALIGN`` multiple.
"""

from __future__ import annotations

import mmap
import threading
from concurrent.futures import Future

import torch

from slideformer.errors import ConfigError

ALIGN = 4096
"""Byte alignment of file offsets, lengths and buffers (a page; covers 512 B and 4 KiB sector disks)."""


def all_done(futures: list[Future]) -> Future:
    """A future that completes when every one of ``futures`` has (with the first error, if any)."""
    out: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one(_: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:  # every one of them finished
            err = next((f.exception() for f in futures if f.exception() is not None), None)
            out.set_exception(err) if err is not None else out.set_result(None)

    if not futures:
        out.set_result(None)
    for f in futures:
        f.add_done_callback(one)
    return out


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


class AlignedBuffer:
    """Page-aligned, anonymous-mmap-backed host memory viewed as a uint8 tensor (allocated once)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = round_up(max(nbytes, 1))
        self._map = mmap.mmap(-1, self.nbytes)  # anonymous mappings start on a page boundary
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def view(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return self.bytes.view(dtype)[:numel]


def kvikio_available() -> bool:
    try:
        import kvikio  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(io: str, device: torch.device) -> str:
    """'auto' picks kvikio when it imports and the device is CUDA, else posix."""
    if io == "auto":
        return "kvikio" if device.type == "cuda" and kvikio_available() else "posix"
    if io == "kvikio" and not kvikio_available():
        raise ConfigError("engine.offload_io='kvikio' but `import kvikio` fails; install kvikio "
                          "(pip install kvikio-cu12) or use offload_io='posix'")
    return io
