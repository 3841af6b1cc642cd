"""Streaming safetensors files: write tensor by tensor (hashing as we go), read tensor by tensor.

Owns the on-disk tensor format of checkpoints and exports. Writing never builds the file in memory: the
header is computed from the tensors' shapes and dtypes, then each tensor's bytes go straight to the file
(at most one tensor is converted/copied at a time). Invariant: the SHA-256 returned by ``write_file``
is that of the bytes on disk, so a manifest built from it detects any later corruption. Files are
standard safetensors, readable by ``safetensors`` and ``transformers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape and on-disk dtype, and how to get its values when due."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]
    """Returns the tensor (any dtype; it is cast to ``dtype``). Called once, when its bytes are written."""

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def spec_of(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorSpec:
    """A spec for an existing tensor (written as ``dtype``, default its own)."""
    return TensorSpec(name, tuple(tensor.shape), dtype or tensor.dtype, lambda: tensor)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_file(path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> str:
    """Write ``specs`` as one safetensors file at ``path``, fsync it, and return its SHA-256 (hex).

    Raises:
        OSError: from the file system (e.g. ENOSPC); the partial file is left for the caller to remove.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for s in specs:
        if s.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.name] = {
            "dtype": _DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        prefix = struct.pack("<Q", len(raw)) + raw
        digest.update(prefix)
        _write_all(fd, memoryview(prefix))
        for s in specs:
            t = s.get().detach()
            if tuple(t.shape) != s.shape:
                raise ValueError(f"{s.name}: expected shape {s.shape}, got {tuple(t.shape)}")
            t = t.to(device="cpu", dtype=s.dtype).contiguous().reshape(-1)
            flat = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            for start in range(0, flat.numel(), _CHUNK_BYTES):
                chunk = memoryview(flat[start : start + _CHUNK_BYTES].numpy())
                digest.update(chunk)
                _write_all(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_names(path: Path) -> list[str]:
    """Names of the tensors in a safetensors file, in file order."""
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def read_into(path: Path, targets: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy tensors ``prefix + name`` of the file into ``targets[name]`` in place, one at a time.

    Raises:
        KeyError: a target has no tensor in the file, or the file holds a tensor with no target.
        ValueError: a shape differs.
    """
    with safe_open(str(path), framework="pt") as f:
        names = {k for k in f.keys() if k.startswith(prefix)}
        missing = [n for n in targets if prefix + n not in names]
        extra = sorted(names - {prefix + n for n in targets})
        if missing or extra:
            raise KeyError(f"{path}: tensors missing {missing[:5]} / unexpected {extra[:5]}")
        for name, dst in targets.items():
            src = f.get_tensor(prefix + name)
            if src.shape != dst.shape:
                raise ValueError(
                    f"{path}: {prefix + name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(src)


def read_all(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor ``prefix + name`` of the file as ``{name: tensor}`` (fresh CPU tensors)."""
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
