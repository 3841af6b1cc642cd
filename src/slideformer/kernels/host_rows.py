"""Embedding rows gathered by the GPU straight out of page-locked host memory (zero-copy reads over PCIe).

Owns ``gather_``: one Triton program per row reads the row a micro-batch needs from a page-locked host table
through its device-mapped address (CUDA's unified addressing maps page-locked memory, ``pin_memory`` or
``cudaHostRegister``, into the device's address space) and writes it, cast to the output's dtype, into a device
buffer. Why: the host gather (``index_select`` into a pinned stage, then one copy) runs on CPU cores and a memory
bus the CPU AdamW holds at the start of every step: 11.5 ms of the 3B step's 18 ms start gap for 50 MB in session 12's
timeline (3.7 ms with the host idle), where the GPU reads the same rows in 1.0 ms (50 GB/s, measured on the H100 box:
performance_h100_202611.md, session 12). Neither torch nor Liger has a kernel that reads host memory.

Invariant: ``out`` equals ``index_select(table, 0, ids).to(out.dtype)`` bitwise (a copy, or one round-to-nearest cast),
once the kernel has run on the stream it was queued on; the table must not be written until then.
"""

from __future__ import annotations

import torch

from slideformer.kernels.cross_entropy import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gather_rows(src_ptr, ids_ptr, out_ptr, width: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src_row = src_ptr + tl.load(ids_ptr + row).to(tl.int64) * width
        out_row = out_ptr + row * width
        cols = tl.arange(0, BLOCK)
        for i in range(0, width, BLOCK):
            mask = i + cols < width
            tl.store(out_row + i + cols, tl.load(src_row + i + cols, mask=mask).to(out_ptr.dtype.element_ty),
                     mask=mask)

BLOCK = 2048
"""Elements per inner step of a row (1,024-4,096 all read at ~50 GB/s on the H100 box)."""


def usable(table: torch.Tensor, device: torch.device) -> bool:
    """Whether ``gather_`` can read ``table`` into a ``device`` buffer: CUDA, triton, ``table`` page-locked."""
    return triton is not None and device.type == "cuda" and table.device.type == "cpu" and table.is_pinned()


def gather_(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = table[ids[i]]`` cast to ``out``'s dtype, on the current stream. ``table`` ``[rows, width]``:
    page-locked host memory, contiguous; ``ids`` ``[n]`` int64 and ``out`` ``[n, width]`` contiguous, on the GPU."""
    n, width = out.shape
    if table.dim() != 2 or table.shape[1] != width or not (table.is_contiguous() and out.is_contiguous()):
        raise ValueError(f"gather_ needs a contiguous [rows, {width}] table and output, got {tuple(table.shape)}")
    if ids.numel() != n:
        raise ValueError(f"gather_: {ids.numel()} ids for {n} output rows")
    if n:
        _gather_rows[(n,)](table, ids, out, width, BLOCK=BLOCK, num_warps=4)
