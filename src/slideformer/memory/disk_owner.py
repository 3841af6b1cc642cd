"""Ownership of an offload directory: one engine at a time, and a crashed run's leftovers cleared.

Owns the owner file (``OWNER_FILE``: PID, process start time, host name), created with ``O_EXCL``. Invariant:
a directory whose owner is alive (same host, same PID *and* start time, so a reused PID does not count) is
never touched; a dead owner's state files (``*`` + ``SUFFIX``) and owner file are removed, with a logged
warning, before the directory is claimed again; files that are not ours are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import psutil

from slideformer.errors import ConfigError

logger = logging.getLogger(__name__)

OWNER_FILE = "slideformer-offload.owner"
SUFFIX = ".sfstate"


def _owner_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "create_time": psutil.Process().create_time(), "host": socket.gethostname()}


def _owner_alive(rec: dict[str, Any]) -> bool:
    if rec.get("host") != socket.gethostname():
        return True  # another machine's process (a shared file system): we cannot tell, so do not touch it
    try:
        proc = psutil.Process(int(rec["pid"]))
        return abs(proc.create_time() - float(rec["create_time"])) < 0.5  # a reused PID is another process
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def claim_directory(directory: Path) -> Path:
    """Create ``directory`` and write our owner file; clear a crashed run's files, refuse a live owner's."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"engine.offload_dir {directory} cannot be created ({e.strerror}); point it at a "
                          "writable directory on a local disk") from e
    owner = directory / OWNER_FILE
    for _ in range(2):
        try:
            fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                rec = json.loads(owner.read_text() or "{}")
            except (OSError, ValueError):
                rec = {}  # a torn owner file: its writer died while writing it
            if _owner_alive(rec):
                raise ConfigError(
                    f"engine.offload_dir {directory} is in use by a running process (pid {rec.get('pid')} on "
                    f"{rec.get('host')}); give this run its own offload_dir or stop that process") from None
            stale = sorted(directory.glob(f"*{SUFFIX}"))
            logger.warning("slideformer: clearing the offload directory %s of a run that crashed (pid %s): "
                           "%d stale state file(s)", directory, rec.get("pid"), len(stale))
            for p in stale:
                p.unlink(missing_ok=True)
            owner.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise ConfigError(f"engine.offload_dir {directory} is not writable ({e.strerror}); point it at a "
                              "writable directory on a local disk") from e
        with os.fdopen(fd, "w") as f:
            json.dump(_owner_record(), f)
        return owner
    raise ConfigError(f"engine.offload_dir {directory}: another process claimed it while we cleared it")
