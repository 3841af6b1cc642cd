"""Atomic, resumable training checkpoints: master weights, Adam moments, step, data position, RNG.

Layout of one checkpoint, ``<root>/step-00000042/``::

    model.safetensors      fp32 master weights, HF parameter names
    optimizer.safetensors  exp_avg.<name>, exp_avg_sq.<name> (fp32)
    trainer_state.json     step, data position, RNG states, schedule, last metrics
    config.json, tokenizer files, run_config.yaml   (so export and resume need nothing else)
    manifest.json          every other file's size and SHA-256; written last

Invariant: a directory named ``step-*`` is complete. It is written as ``.tmp-step-*`` and renamed only
after every file (manifest last) is fsynced, so a crash or a full disk during a save leaves the previous
checkpoints untouched and loadable; partial temp directories are removed on the next save. A complete
checkpoint is never deleted in place: it is first renamed to a ``.tmp-step-*`` name, so a crash halfway
through a deletion cannot leave a ``step-*`` directory with a manifest but missing files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from slideformer.errors import SlideformerError
from slideformer.train import tensor_io

MANIFEST = "manifest.json"
FORMAT = "slideformer-checkpoint/1"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-step-"
REQUIRED = ("model.safetensors", "optimizer.safetensors", "trainer_state.json")
"""Files every checkpoint's manifest must list (so none of them is read unverified)."""


class CheckpointError(SlideformerError, OSError):
    """A checkpoint could not be written, or a checkpoint on disk is incomplete or corrupt."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"{_PREFIX}{step:08d}"


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: rename it out of the ``step-*`` namespace first, then remove it."""
    aside = path.with_name(f"{_TMP_PREFIX}{path.name[len(_PREFIX):]}-{os.getpid()}.old")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Make a file's data, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def value_spec(name: str, t: Any, dtype: torch.dtype | None = None) -> tensor_io.TensorSpec:
    """The spec writing an engine state value as ``dtype`` (default its own): a tensor, or a data-parallel
    engine's handle that gathers the tensor when it is due (``dist/state.py``)."""
    return tensor_io.spec_of(name, t, dtype) if isinstance(t, torch.Tensor) else t.spec_for(name, dtype)


def _engine_specs(state: dict[str, Any]) -> tuple[list[tensor_io.TensorSpec], list[tensor_io.TensorSpec]]:
    params = [value_spec(n, t) for n, t in state["params"].items()]
    moments = [value_spec(f"exp_avg.{n}", t) for n, t in state["exp_avg"].items()]
    moments += [value_spec(f"exp_avg_sq.{n}", t) for n, t in state["exp_avg_sq"].items()]
    return params, moments


def save(
    root: Path,
    step: int,
    engine_state: dict[str, Any],
    trainer_state: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``root/step-<step>`` atomically, then delete all but the newest ``keep_last``.

    Args:
        root: the checkpoint directory (created if needed).
        step: optimizer steps done.
        engine_state: ``Engine.state_dict()`` after ``Engine.flush()``: params, exp_avg, exp_avg_sq, step.
        trainer_state: JSON-serialisable loop state (data position, RNG, ...).
        write_extra: writes small extra files (config, tokenizer) into the temporary directory.
        keep_last: how many complete checkpoints to keep.

    Raises:
        CheckpointError: the save failed (disk full, permissions); earlier checkpoints are intact.
    """
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{step:08d}-{os.getpid()}"
    try:
        tmp.mkdir()
        files: dict[str, dict[str, Any]] = {}
        params, moments = _engine_specs(engine_state)
        for name, specs in (("model.safetensors", params), ("optimizer.safetensors", moments)):
            digest = tensor_io.write_file(tmp / name, specs, {"format": "pt"})
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": digest}
        state = dict(trainer_state, step=step, engine_step=int(engine_state.get("step", step)))
        _write_text(tmp / "trainer_state.json", json.dumps(state, indent=1))
        if write_extra is not None:
            write_extra(tmp)
        for path in sorted(tmp.iterdir()):
            if path.name not in files and path.is_file():
                _fsync(path)  # files from write_extra (config, tokenizer) are durable before the manifest
                files[path.name] = {"bytes": path.stat().st_size, "sha256": tensor_io.sha256_file(path)}
        _write_text(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
        _fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save): replace it
            _discard(final)
        os.rename(tmp, final)
        _fsync(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest(root)
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        what = "the disk is full" if e.errno == errno.ENOSPC else str(e)
        raise CheckpointError(f"saving checkpoint step {step} to {root} failed: {what}; {kept}") from e
    for old in complete_checkpoints(root)[:-keep_last]:
        try:
            _discard(old)
        except OSError:
            pass  # an old checkpoint that cannot be removed is harmless; the new one is complete
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``; raises CheckpointError when it is missing or unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        raise CheckpointError(f"{path} is not a complete checkpoint (no readable {MANIFEST}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}")
    files = manifest.get("files")
    entries_ok = isinstance(files, dict) and all(
        isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
        for i in files.values()
    )
    if not entries_ok or not set(REQUIRED) <= set(files):
        raise CheckpointError(f"{path}: {MANIFEST} is malformed or does not list {', '.join(REQUIRED)}")
    return manifest


def verify(path: Path, checksums: bool = True) -> None:
    """Check that every file of the manifest exists with its size (and SHA-256 when ``checksums``)."""
    for name, info in read_manifest(path)["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"{path}: {name} is missing or has the wrong size; the checkpoint is damaged"
            )
        if checksums and tensor_io.sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its SHA-256 check; the checkpoint is corrupt")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a manifest present), oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve(path: Path) -> Path:
    """A checkpoint directory from a path that is one, a checkpoint root, or a run directory."""
    if (path / MANIFEST).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint found at {path}")


def load(path: Path, engine_state: dict[str, Any], checksums: bool = True) -> dict[str, Any]:
    """Copy checkpoint ``path`` into ``engine_state``'s tensors in place; return the trainer state.

    ``engine_state`` is ``Engine.state_dict()``: views of the engine's host buffers, so nothing is
    materialised twice; one tensor at a time passes through memory.
    """
    verify(path, checksums)
    try:
        tensor_io.read_into(path / "model.safetensors", engine_state["params"])
        tensor_io.read_into(path / "optimizer.safetensors", engine_state["exp_avg"], "exp_avg.")
        tensor_io.read_into(path / "optimizer.safetensors", engine_state["exp_avg_sq"], "exp_avg_sq.")
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:  # JSON/Unicode: ValueError
        raise CheckpointError(f"{path} cannot be loaded into this model: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: trainer_state.json is not a JSON object")
    return state


def load_params(path: Path) -> dict[str, torch.Tensor]:
    """Only the master weights of checkpoint ``path`` (fresh tensors), e.g. for tests."""
    return tensor_io.read_all(path / "model.safetensors")
