"""The LM head's cross-entropy on one chunk of logits, loss and gradient in one Triton kernel, in place.

Owns the softmax part of the head on CUDA (``kernels.reference.linear_cross_entropy`` owns the chunk loop and
the matmuls). For each row of a chunk's compute-dtype logits it finds the log-sum-exp in FP32 (online max and
sum, one read), then writes ``(softmax - onehot(target)) * scale`` back over the logits (a second read and one
write), rounded to the logits' dtype once, and stores the row's loss ``lse - logit[target]``. Ignored rows
(target ``-100``) get a zero gradient and a zero loss.

Why: the torch path (``reference.chunk_loss_grad``) upcasts the chunk to FP32 and runs log-softmax and its
autograd backward: ~20 B of GPU memory per logit and ~2.4 GB of memory passes per 512 x 128,256 chunk (the
Llama-3 vocabulary), ~13 ms of every 3B step at batch 8. This kernel holds 2 B per logit and moves ~0.4 GB per
such chunk. Why not Liger's ``liger_cross_entropy_kernel``: it scales the gradient by 1/n of the chunk's own
rows ('mean') or not at all ('sum'), where our scale is 1/(tokens of the whole step, across chunks and
micro-batches) and must be applied in FP32 before the rounding, as autograd does; and its argument list is
internal API that changes between releases. Soft-capped logits (Gemma-2) stay on the torch path.

Invariant: HF's arithmetic on FP32-upcast logits up to FP32 rounding (summation order, ``exp``): the loss agrees
with the torch path to ~1e-6 relative and each gradient element to a unit of the compute dtype's last place.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from slideformer.errors import ConfigError
from slideformer.kernels.reference import IGNORE_INDEX, ChunkFn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch path runs instead (``available`` says so)
    triton = None

logger = logging.getLogger(__name__)

FUSED_CHUNK_TOKENS = 2048
"""``engine.loss_chunk_tokens=0`` with this kernel: 2 B per logit, so 2,048 x 128,256 logits are 0.5 GB, and the
head weight's gradient is read and rewritten once per chunk (0.8 GB each way for Llama-3.2-3B's BF16 matrix)."""
TORCH_CHUNK_TOKENS = 512
"""``engine.loss_chunk_tokens=0`` on the torch path (~20 B per logit; ``config.EngineConfig.loss_chunk_tokens``)."""

BLOCK = 4096
"""Columns per inner step of a row's two passes (a power of two; 32 steps for the Llama-3 vocabulary)."""
NUM_WARPS = 8

if triton is not None:

    @triton.jit
    def row_lse(z_row, n_cols: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        """One row's log-sum-exp in FP32 over its ``n_cols`` compute-dtype logits: online max and sum, one read."""
        cols = tl.arange(0, BLOCK_SIZE)
        m = tl.full([], float("-inf"), tl.float32)
        d = tl.full([], 0.0, tl.float32)
        for i in range(0, n_cols, BLOCK_SIZE):
            x = tl.load(z_row + i + cols, mask=i + cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        return m + tl.log(d)

    @triton.jit
    def _ce_loss_grad(z_ptr, stride, t_ptr, loss_ptr, scale, ignore_index, n_cols: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride
        y = tl.load(t_ptr + row)
        cols = tl.arange(0, BLOCK_SIZE)
        if y == ignore_index:
            for i in range(0, n_cols, BLOCK_SIZE):
                tl.store(z_row + i + cols, tl.zeros([BLOCK_SIZE], tl.float32).to(z_ptr.dtype.element_ty),
                         mask=i + cols < n_cols)
            tl.store(loss_ptr + row, 0.0)
            return
        lse = row_lse(z_row, n_cols, BLOCK_SIZE)
        x_y = tl.load(z_row + y).to(tl.float32)
        for i in range(0, n_cols, BLOCK_SIZE):
            mask = i + cols < n_cols
            x = tl.load(z_row + i + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(z_row + i + cols, (tl.exp(x - lse) * scale).to(z_ptr.dtype.element_ty), mask=mask)
        # The loop's store to the target column must land before the corrected value below overwrites it.
        tl.debug_barrier()
        # The target's gradient is formed in FP32 and rounded once: (p - 1) cancels as p -> 1, so correcting the
        # rounded value the loop stored would lose most of its bits.
        tl.store(z_row + y, ((tl.exp(x_y - lse) - 1.0) * scale).to(z_ptr.dtype.element_ty))
        tl.store(loss_ptr + row, lse - x_y)


def available(device_type: str) -> bool:
    """Whether the kernel can run on a device of ``device_type`` (CUDA, and Triton importable)."""
    return triton is not None and device_type == "cuda"


def resolve(choice: str, device_type: str, softcap: float | None) -> ChunkFn | None:
    """``engine.loss_kernel=choice`` on a ``device_type`` device: this kernel's ``loss_grad_``, or None for the torch
    path. 'triton' where the kernel cannot run is a ConfigError saying what is missing."""
    if choice == "torch" or softcap is not None:
        if softcap is not None and choice != "torch":
            logger.info("engine.loss_kernel=%s: torch (the head soft-caps its logits)", choice)
        return None
    if available(device_type):
        return loss_grad_
    why = "triton is not installed" if triton is None else f"the engine device is {device_type!r}, not CUDA"
    if choice == "triton":
        raise ConfigError(f"engine.loss_kernel='triton' needs a CUDA device and triton ({why}); "
                          "use engine.loss_kernel='torch' or 'auto'")
    return None


def planned(choice: str, configured_chunk: int, hf_config: Any) -> tuple[bool, int]:
    """``(fused, chunk tokens)`` of a GPU run with ``engine.loss_kernel=choice``, as the planner sees it before any
    device exists: 'triton' is fused (the engine refuses it without triton), 'auto' is where triton imports here; a
    soft-capped head (``final_logit_softcapping``) never is."""
    fused = logit_softcap(hf_config) is None and (choice == "triton" or (choice == "auto" and triton is not None))
    return fused, chunk_tokens(configured_chunk, fused)


def logit_softcap(hf_config: Any) -> float | None:
    """The head's logit soft-cap in the config (``final_logit_softcapping``, of the text model), or None."""
    text_cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return getattr(text_cfg, "final_logit_softcapping", None)


def bytes_per_logit(fused: bool) -> int:
    """GPU bytes a loss chunk holds per logit: the compute-dtype logits rewritten in place as their gradient (2);
    on the torch path its autograd graph: BF16 and FP32 logits, log-softmax and their gradients (20, calibrated on
    the H100 box: 8 left the allocated peak 2.3-2.8 GiB above the plan for Llama-3.2-1B/3B/3.1-8B at b8)."""
    return 2 if fused else 20


def chunk_tokens(configured: int, fused: bool) -> int:
    """Tokens per loss chunk: ``engine.loss_chunk_tokens``, or the kernel's default when that is 0."""
    return configured or (FUSED_CHUNK_TOKENS if fused else TORCH_CHUNK_TOKENS)


def loss_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """A ``reference.ChunkFn``: overwrite ``logits`` ``[n, V]`` (contiguous rows) with
    ``d(sum of row losses * scale) / d logits``; ``targets`` ``[n]`` int64 class indices (``-100`` ignored).
    Returns the chunk's summed loss times ``scale`` (an FP32 device scalar)."""
    n, vocab = logits.shape
    if logits.stride(1) != 1 or targets.stride(0) != 1:
        raise ValueError("loss_grad_ needs logits with contiguous rows and contiguous targets")
    out = torch.empty(n, dtype=torch.float32, device=logits.device)  # each row's loss (8 KB at 2,048 rows)
    if n:
        _ce_loss_grad[(n,)](logits, logits.stride(0), targets, out, float(scale), IGNORE_INDEX, vocab,
                            BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS)
    return out.sum() * scale
