"""The disk tier's file store: an owned offload directory, one file per key, parallel positional I/O.

Owns *where bytes live on disk*: the offload directory (claimed through ``disk_owner``, which detects a
crashed run's leftovers and refuses a directory a live process uses), one pre-allocated file per key, the I/O
backend (``posix``: ``os.preadv``/``os.pwritev`` on ``O_DIRECT`` descriptors from a thread pool, falling
back to buffered I/O with a warning where ``O_DIRECT`` is refused; ``kvikio``: ``CuFile.pread/pwrite``,
GDS where present and its POSIX mode otherwise; the choice and the page-aligned buffers: ``disk_io``), a
start-up speed probe, and removing every file it created on ``close`` (or by its finalizer).

Invariant: every transfer starts at an ``ALIGN``-multiple file offset, covers an ``ALIGN``-multiple
length, and uses a page-aligned buffer (so ``O_DIRECT`` never sees unaligned I/O); files are sized
(and their blocks reserved) once at start-up, so a full disk fails here and not in the middle of a step.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from slideformer.errors import ConfigError, SlideformerError
from slideformer.memory.disk_io import ALIGN, AlignedBuffer, all_done, round_up
from slideformer.memory.disk_owner import SUFFIX, claim_directory

logger = logging.getLogger(__name__)

PIECE_BYTES = 8 << 20
"""One pool task moves at most this much, so a large unit is spread over all I/O threads."""
PROBE_BYTES = 32 << 20
FREE_MARGIN_BYTES = 1 << 30
"""Free space left on the disk beyond the offload files (logs, checkpoints written next to them)."""


class DiskError(SlideformerError, OSError):
    """A read or write of the offload store failed (the chained OSError says why)."""


def _cleanup(directory: Path, paths: list[Path], fds: list[int], pool: ThreadPoolExecutor, created: bool) -> None:
    """Remove the store's files (runs once: from ``close`` or the finalizer, at GC or interpreter exit)."""
    pool.shutdown(wait=True, cancel_futures=True)  # transfers already running finish before their files close
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass
    if created:
        try:
            directory.rmdir()
        except OSError:
            pass  # not empty (the user keeps other files there): leave it


# -- the store -----------------------------------------------------------------------------------------
class DiskStore:
    """Files ``key -> nbytes`` in an owned directory, read and written asynchronously (futures)."""

    def __init__(self, directory: str | Path, sizes: dict[str, int], backend: str = "posix",
                 threads: int = 4, probe: bool = True) -> None:
        self.directory = Path(directory).expanduser().resolve()
        created = not self.directory.exists()
        self.sizes = {k: round_up(v) for k, v in sizes.items()}
        self.backend = backend
        self.direct = backend == "posix"
        self.bytes_read = 0
        self.bytes_written = 0
        self.busy_s = 0.0
        """Wall seconds during which at least one transfer was in flight."""
        self._inflight = 0
        self._busy_since = 0.0
        self._lock = threading.Lock()
        self.fds: list[int] = []
        self._fd: dict[str, int] = {}
        self._cufile: dict[str, Any] = {}
        self._maps: list[mmap.mmap] = []
        self._mapped: dict[str, torch.Tensor] = {}
        self.paths = [claim_directory(self.directory)]
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="sf-disk")
        self._finalizer = weakref.finalize(self, _cleanup, self.directory, self.paths, self.fds, self.pool, created)
        try:
            self._check_space()
            self.speed = self._probe() if probe else {}
            for key, n in self.sizes.items():
                self._create(key, n)
        except BaseException:
            self.close()
            raise
        if self.speed:
            logger.info("slideformer: offload directory %s (%s%s): %.2f GB/s write, %.2f GB/s read, %.2f GiB of "
                        "state files", self.directory, backend, ", O_DIRECT" if self.direct else ", buffered",
                        self.speed["write_gbs"], self.speed["read_gbs"], self.total_bytes / 2**30)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def _check_space(self) -> None:
        free = shutil.disk_usage(self.directory).free
        need = self.total_bytes + PROBE_BYTES + FREE_MARGIN_BYTES
        if need > free:
            raise ConfigError(
                f"engine.offload_dir {self.directory} has {free / 2**30:.2f} GiB free but the offloaded state needs "
                f"{self.total_bytes / 2**30:.2f} GiB (+{(need - self.total_bytes) / 2**30:.2f} GiB margin); "
                "free disk space, point offload_dir at a larger disk, or offload less (`slideformer plan`)")

    def _open(self, path: Path) -> int:
        flags = os.O_RDWR | os.O_CREAT
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o600)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._refuse_direct(e)
        return os.open(path, flags, 0o600)

    def _refuse_direct(self, exc: OSError) -> None:
        self.direct = False
        warnings.warn(f"slideformer: {self.directory} refuses O_DIRECT ({exc.strerror}; tmpfs or a network file "
                      "system?): the offload store uses buffered I/O, whose page cache takes host RAM and makes "
                      "the measured speed optimistic", RuntimeWarning, stacklevel=4)

    def _create(self, key: str, nbytes: int) -> None:
        path = self.directory / f"{key}{SUFFIX}"
        self.paths.append(path)
        fd = self._open(path)
        self.fds.append(fd)
        self._fd[key] = fd
        try:
            os.posix_fallocate(fd, 0, nbytes)  # reserve the blocks now; unwritten blocks read as zeros
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ConfigError(f"engine.offload_dir {self.directory}: the disk filled up while reserving "
                                  f"{nbytes / 2**30:.2f} GiB for {key}; free disk space") from e
            os.ftruncate(fd, nbytes)  # a file system without fallocate: a sparse file reads as zeros too
        if self.backend == "kvikio":
            import kvikio

            self._cufile[key] = kvikio.CuFile(path, "r+")

    def reserve(self, key: str, nbytes: int) -> Path:
        """Create the file of ``key`` after start-up, or grow it to ``nbytes`` (never shrinks); returns its path.

        For state sized later than the store (activation checkpoints grow with the largest micro-batch). The
        caller makes sure no transfer of ``key`` is in flight; free space must cover the new blocks + the margin.
        """
        n = round_up(nbytes)
        old = self.sizes.get(key, 0)
        path = self.directory / f"{key}{SUFFIX}"
        if n <= old:
            return path
        free = shutil.disk_usage(self.directory).free
        if n - old + FREE_MARGIN_BYTES > free:
            raise ConfigError(f"engine.offload_dir {self.directory} has {free / 2**30:.2f} GiB free but {key} needs "
                              f"{(n - old) / 2**30:.2f} GiB more (+{FREE_MARGIN_BYTES / 2**30:.0f} GiB margin); "
                              "free disk space or point offload_dir at a larger disk")
        if key not in self._fd:
            self._create(key, n)
        else:
            try:
                os.posix_fallocate(self._fd[key], 0, n)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise ConfigError(f"engine.offload_dir {self.directory}: the disk filled up while growing "
                                      f"{path} to {n / 2**30:.2f} GiB; free disk space") from e
                os.ftruncate(self._fd[key], n)
        self.sizes[key] = n
        return path

    def _probe(self) -> dict[str, float]:
        """Write then read PROBE_BYTES through this store's own path; GB/s of each."""
        key = "speed-probe"
        self.sizes[key] = PROBE_BYTES
        self._create(key, PROBE_BYTES)
        buf = AlignedBuffer(PROBE_BYTES)
        buf.bytes.fill_(7)
        try:
            t0 = time.perf_counter()
            self.write(key, buf, PROBE_BYTES).result()  # timed: the whole write is on disk
            t1 = time.perf_counter()
            self.read(key, buf, PROBE_BYTES).result()  # timed: the whole read has landed
            t2 = time.perf_counter()
        except DiskError as e:
            cause = e.__cause__
            if not (self.direct and isinstance(cause, OSError) and cause.errno == errno.EINVAL):
                raise
            # Opening with O_DIRECT worked but the transfer was refused: reopen everything buffered.
            self._refuse_direct(cause)
            self._reopen_buffered()
            self._drop(key)
            return self._probe()  # again, buffered this time
        finally:
            self.bytes_read = self.bytes_written = 0
            self.busy_s = 0.0
        self._drop(key)
        return {"write_gbs": PROBE_BYTES / max(t1 - t0, 1e-9) / 1e9, "read_gbs": PROBE_BYTES / max(t2 - t1, 1e-9) / 1e9}

    def _reopen_buffered(self) -> None:
        for key, fd in list(self._fd.items()):
            path = self.directory / f"{key}{SUFFIX}"
            os.close(fd)
            self.fds.remove(fd)
            new = os.open(path, os.O_RDWR)
            self.fds.append(new)
            self._fd[key] = new

    def _drop(self, key: str) -> None:
        fd = self._fd.pop(key)
        os.close(fd)
        self.fds.remove(fd)
        path = self.directory / f"{key}{SUFFIX}"
        path.unlink(missing_ok=True)
        self.paths.remove(path)
        self.sizes.pop(key)

    # -- transfers ---------------------------------------------------------------------------------------
    def read(self, key: str, buf: AlignedBuffer, nbytes: int, after: list[Future] | None = None,
             offset: int = 0, buf_offset: int = 0) -> Future:
        """Read ``nbytes`` (rounded up to ALIGN) of ``key`` at ``offset`` into ``buf`` at ``buf_offset``, once
        the futures in ``after`` are done."""
        return self._transfer(False, key, buf, nbytes, after or [], offset, buf_offset)

    def write(self, key: str, buf: AlignedBuffer, nbytes: int, after: list[Future] | None = None,
              offset: int = 0, buf_offset: int = 0) -> Future:
        """Write ``nbytes`` (rounded up to ALIGN) of ``buf`` at ``buf_offset`` to ``key`` at ``offset``, once
        the futures in ``after`` are done."""
        return self._transfer(True, key, buf, nbytes, after or [], offset, buf_offset)

    def _transfer(self, write: bool, key: str, buf: AlignedBuffer, nbytes: int, after: list[Future],
                  offset: int, buf_offset: int) -> Future:
        n = round_up(nbytes)
        if offset % ALIGN or buf_offset % ALIGN or buf_offset + n > buf.nbytes or offset + n > self.sizes[key]:
            raise SlideformerError(f"offload transfer of {n} bytes at {offset} (buffer {buf_offset}) is unaligned "
                                   f"or exceeds the buffer or the file of {key}")
        done: Future = Future()
        args = (write, key, buf, n, offset, buf_offset, done, after)
        pending = [f for f in after if not f.done()]
        if not pending:
            self._launch(*args)
            return done
        # Launched once the last prerequisite finished (a write-back that still read this buffer, or this
        # key); _launch passes a prerequisite's error on instead of transferring.
        all_done(pending).add_done_callback(lambda _: self._launch(*args))
        return done

    def _launch(self, write: bool, key: str, buf: AlignedBuffer, n: int, offset: int, buf_offset: int,
                done: Future, after: list[Future]) -> None:
        for f in after:
            if f.exception() is not None:
                done.set_exception(f.exception())
                return
        self._io_started()
        step = n if self.backend == "kvikio" else PIECE_BYTES  # kvikio splits a transfer over its own threads
        pieces = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        left = [len(pieces)]
        errors: list[BaseException] = []
        lock = threading.Lock()

        def finish(f: Future) -> None:
            with lock:
                left[0] -= 1
                if f.exception() is not None:
                    errors.append(f.exception())
                last = left[0] == 0
            if last:  # every piece of this transfer is on disk / in the buffer
                self._io_finished(write, n)
                if errors:
                    err = DiskError(f"offload {'write' if write else 'read'} of {key} in {self.directory} "
                                    f"failed: {errors[0]}")
                    err.__cause__ = errors[0]
                    done.set_exception(err)
                else:
                    done.set_result(None)

        try:
            for lo, hi in pieces:
                self.pool.submit(self._piece, write, key, buf.bytes[buf_offset + lo:buf_offset + hi],
                                 offset + lo).add_done_callback(finish)
        except RuntimeError as e:  # the pool was shut down (close() while a transfer was queued)
            self._io_finished(write, 0)
            done.set_exception(DiskError(f"offload store {self.directory} is closed: {e}"))

    def _piece(self, write: bool, key: str, mem: torch.Tensor, at: int) -> None:
        view = mem.numpy()
        if self.backend == "kvikio":
            f = self._cufile[key]
            got = (f.pwrite if write else f.pread)(view, view.nbytes, at).get()
        else:
            fd = self._fd[key]
            got = os.pwritev(fd, [view], at) if write else os.preadv(fd, [view], at)
        if got != view.nbytes:
            raise OSError(errno.EIO, f"short {'write' if write else 'read'}: {got} of {view.nbytes} bytes at {at}")

    def _io_started(self) -> None:
        with self._lock:
            if self._inflight == 0:
                self._busy_since = time.perf_counter()
            self._inflight += 1

    def _io_finished(self, write: bool, n: int) -> None:
        with self._lock:
            self._inflight -= 1
            if write:
                self.bytes_written += n
            else:
                self.bytes_read += n
            if self._inflight == 0:
                self.busy_s += time.perf_counter() - self._busy_since

    # -- direct access (checkpoints) ---------------------------------------------------------------------
    def map(self, key: str) -> torch.Tensor:
        """The file of ``key`` as a writable uint8 tensor over a shared mapping (reads and writes go through
        the page cache to the file; call ``sync_maps`` before the next ``read``)."""
        if key not in self._mapped:  # one mapping per file, however often it is asked for
            path = self.directory / f"{key}{SUFFIX}"
            with open(path, "r+b") as f:
                m = mmap.mmap(f.fileno(), self.sizes[key])
            self._maps.append(m)
            self._mapped[key] = torch.frombuffer(m, dtype=torch.uint8)
        return self._mapped[key]

    def sync_maps(self) -> None:
        """Flush writes made through ``map`` tensors to the files."""
        for m in self._maps:
            m.flush()

    def stats(self) -> dict[str, Any]:
        return {"backend": self.backend, "o_direct": self.direct, "directory": str(self.directory),
                "file_bytes": self.total_bytes, "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "busy_s": self.busy_s, **{f"probe_{k}": v for k, v in self.speed.items()}}

    def close(self) -> None:
        """Wait for queued transfers, close the files and remove them (and the owner file)."""
        for f in self._cufile.values():
            f.close()
        self._cufile.clear()
        self._finalizer()

