"""Activation checkpoints: each decoder layer's input, kept on the host between forward and backward.

Forward copies layer j's input to its own host buffer on the activation stream (after the compute
stream has produced it). Backward prefetches layer j-1's input into one of two device buffers while
layer j recomputes. The last layer's input never leaves the device (backward starts with it).

The device side (``DeviceRing``: the two device buffers and the kept last input) is shared with the
disk-backed store, ``memory/activations_disk.py``.

Invariant: a host buffer is overwritten only after the prefetch that read it (same stream, in order);
a device buffer is overwritten only after the backward that read it (event recorded by the caller).
Buffers are sized once for the largest micro-batch seen and reused.
"""

from __future__ import annotations

from typing import Any

import torch

from slideformer.runtime.device import DeviceOps


class DeviceRing:
    """The device side both activation stores share: the two-deep ring that backward reads layer inputs from,
    and the last layer's input, which never leaves the device.

    Invariant: a device buffer is overwritten only after the backward that read it (``release`` records the
    compute stream's event, the next upload into that buffer waits for it).
    """

    def __init__(self, ops: DeviceOps, num_layers: int, stream: Any) -> None:
        self.ops = ops
        self.last = num_layers - 1
        self.stream = stream
        self.buffers: list[torch.Tensor] = []
        self.free: list[Any] = [None, None]
        self._ready: dict[int, tuple[torch.Tensor, Any]] = {}
        self._kept: torch.Tensor | None = None

    def allocate(self, numel: int, dtype: torch.dtype) -> None:
        """Two device buffers of ``numel`` elements (replacing any earlier pair, none of them in use)."""
        self.buffers = [self.ops.empty(numel, dtype) for _ in range(2)]
        self.free = [None, None]
        self._ready.clear()

    def keep(self, x: torch.Tensor) -> None:
        self._kept = x

    def take_kept(self) -> torch.Tensor:
        if self._kept is None:
            raise RuntimeError("the last layer's input was not kept; forward did not run")
        x, self._kept = self._kept, None
        return x

    def has(self, j: int) -> bool:
        return j in self._ready

    def upload(self, j: int, src: torch.Tensor, shape: torch.Size) -> Any:
        """Copy layer ``j``'s input ``src`` (host, ``shape``) into its device buffer on the store's stream;
        returns the copy's event."""
        buf = self.buffers[j % 2][:shape.numel()].view(shape)
        # The device buffer may still be read by the backward of layer j+2.
        self.ops.wait(self.stream, self.free[j % 2])
        with self.ops.on(self.stream):
            self.ops.copy(buf, src)
            ready = self.ops.record(self.stream)
        self._ready[j] = (buf, ready)
        return ready

    def take(self, j: int, compute_stream: Any) -> torch.Tensor:
        buf, ready = self._ready.pop(j)
        # Compute must not read the buffer before its upload has landed.
        self.ops.wait(compute_stream, ready)
        return buf

    def release(self, j: int, compute_stream: Any) -> None:
        """Layer ``j``'s backward has been queued: its device buffer is free once that work is done."""
        if j != self.last:
            self.free[j % 2] = self.ops.record(compute_stream)


class ActivationStore:
    """Per-layer host checkpoints plus a two-deep device prefetch ring."""

    def __init__(self, ops: DeviceOps, num_layers: int, hidden: int, dtype: torch.dtype) -> None:
        self.ops = ops
        self.num_layers = num_layers
        self.hidden = hidden
        self.dtype = dtype
        self.capacity = 0
        self.host: list[torch.Tensor] = []
        self.stream = ops.new_stream()
        self.dev = DeviceRing(ops, num_layers, self.stream)
        self.pinned_bytes = 0

    def ensure(self, tokens: int) -> None:
        """Size the buffers for ``tokens`` tokens (allocates only when a larger batch first arrives)."""
        if tokens <= self.capacity:
            return
        n = tokens * self.hidden
        # Host buffers for layers 0..L-2 (the last layer's input stays on the device).
        self.host = [self.ops.host_empty(n, self.dtype) for _ in range(max(self.num_layers - 1, 0))]
        self.dev.allocate(n, self.dtype)
        self.pinned_bytes = sum(t.numel() * t.element_size() for t in self.host) if self.ops.pin else 0
        self.capacity = tokens

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def save(self, j: int, x: torch.Tensor, compute_stream: Any) -> None:
        """Checkpoint layer ``j``'s input ``x`` (asynchronously on the activation stream)."""
        if j == self.num_layers - 1:
            self.dev.keep(x)
            return
        n = x.numel()
        # The activation stream must not read x before the compute stream has written it.
        self.ops.wait(self.stream, self.ops.record(compute_stream))
        with self.ops.on(self.stream):
            self.ops.copy(self.host[j][:n], x.reshape(-1))
        # x is freed by the compute stream's allocator; keep it until this copy is done.
        self.ops.keep_alive(x, self.stream)

    def prefetch(self, j: int, shape: torch.Size) -> None:
        """Start bringing layer ``j``'s input back to the device."""
        if j < 0 or j == self.num_layers - 1 or self.dev.has(j):
            return
        self.dev.upload(j, self.host[j][:shape.numel()].view(shape), shape)

    def get(self, j: int, shape: torch.Size, compute_stream: Any) -> torch.Tensor:
        """Layer ``j``'s input on the device, ready for the compute stream."""
        if j == self.num_layers - 1:
            return self.dev.take_kept()
        if not self.dev.has(j):
            self.prefetch(j, shape)
        return self.dev.take(j, compute_stream)

    def release(self, j: int, compute_stream: Any) -> None:
        """Layer ``j``'s backward has been queued: its ring buffer is free once that work is done."""
        self.dev.release(j, compute_stream)

    def close(self) -> None:
        """Nothing to stop (no threads, no files); the engine drops the buffers."""
