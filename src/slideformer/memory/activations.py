"""Activation checkpoints: each decoder layer's input, kept on the host between forward and backward.

Forward copies layer j's input to its own host buffer on the activation stream (after the compute
stream has produced it). Backward prefetches layer j-1's input into one of two device buffers while
layer j recomputes. The last layer's input never leaves the device (backward starts with it).

Invariant: a host buffer is overwritten only after the prefetch that read it (same stream, in order);
a device buffer is overwritten only after the backward that read it (event recorded by the caller).
Buffers are sized once for the largest micro-batch seen and reused.
"""

from __future__ import annotations

from typing import Any

import torch

from slideformer.runtime.device import DeviceOps


class ActivationStore:
    """Per-layer host checkpoints plus a two-deep device prefetch ring."""

    def __init__(self, ops: DeviceOps, num_layers: int, hidden: int, dtype: torch.dtype) -> None:
        self.ops = ops
        self.num_layers = num_layers
        self.hidden = hidden
        self.dtype = dtype
        self.capacity = 0
        self.host: list[torch.Tensor] = []
        self.ring: list[torch.Tensor] = []
        self.ring_free: list[Any] = [None, None]
        self.stream = ops.new_stream()
        self._ready: dict[int, tuple[torch.Tensor, Any]] = {}
        self._kept: torch.Tensor | None = None
        self.pinned_bytes = 0

    def ensure(self, tokens: int) -> None:
        """Size the buffers for ``tokens`` tokens (allocates only when a larger batch first arrives)."""
        if tokens <= self.capacity:
            return
        n = tokens * self.hidden
        # Host buffers for layers 0..L-2 (the last layer's input stays on the device).
        self.host = [self.ops.host_empty(n, self.dtype) for _ in range(max(self.num_layers - 1, 0))]
        self.ring = [self.ops.empty(n, self.dtype) for _ in range(2)]
        self.ring_free = [None, None]
        self.pinned_bytes = sum(t.numel() * t.element_size() for t in self.host) if self.ops.pin else 0
        self.capacity = tokens

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)

    def save(self, j: int, x: torch.Tensor, compute_stream: Any) -> None:
        """Checkpoint layer ``j``'s input ``x`` (asynchronously on the activation stream)."""
        if j == self.num_layers - 1:
            self._kept = x
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
        if j < 0 or j == self.num_layers - 1 or j in self._ready:
            return
        slot = j % 2
        n = shape.numel()
        buf = self.ring[slot][:n].view(shape)
        # The ring buffer may still be read by the backward of layer j+2.
        self.ops.wait(self.stream, self.ring_free[slot])
        with self.ops.on(self.stream):
            self.ops.copy(buf, self.host[j][:n].view(shape))
            ready = self.ops.record(self.stream)
        self._ready[j] = (buf, ready)

    def get(self, j: int, shape: torch.Size, compute_stream: Any) -> torch.Tensor:
        """Layer ``j``'s input on the device, ready for the compute stream."""
        if j == self.num_layers - 1:
            if self._kept is None:
                raise RuntimeError("the last layer's input was not kept; forward did not run")
            x, self._kept = self._kept, None
            return x
        if j not in self._ready:
            self.prefetch(j, shape)
        buf, ready = self._ready.pop(j)
        # Compute must not read the buffer before its prefetch has landed.
        self.ops.wait(compute_stream, ready)
        return buf

    def release(self, j: int, compute_stream: Any) -> None:
        """Layer ``j``'s backward has been queued: its ring buffer is free once that work is done."""
        if j != self.num_layers - 1:
            self.ring_free[j % 2] = self.ops.record(compute_stream)

    def close(self) -> None:
        """Nothing to stop (no threads, no files); the engine drops the buffers."""
