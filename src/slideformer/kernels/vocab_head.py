"""The LM head with its loss in two passes, so the weight's gradient is final one vocabulary block at a time.

Owns ``VocabBlockedHead`` (``engine.head_schedule='vocab'``). The one-pass head
(``reference.linear_cross_entropy``) walks the tokens in chunks and accumulates the weight's gradient over them,
so no row of it is final before the last chunk: the host's AdamW on the head's matrix cannot start until the
whole head has run and its gradient has been downloaded. On a host-bound step that is the host's idle window
(performance_h100_202611.md, sessions 10-11: ~33 ms of the 3B's ~60 ms window at batch 8 on 24 GiB). Here:
  * pass 1 (``loss``): the logits chunk by chunk over the tokens (as many logits per chunk as a block has), each
    row's log-sum-exp in FP32 and its loss;
  * pass 2 (``backward``): per block of vocabulary rows, the logits of every token against the block, their
    gradient ``(exp(z - lse) - onehot) * scale`` in place, the block's weight gradient in one matmul over all
    tokens (final: ``on_block`` is called and may queue its download), and the input gradient accumulated in FP32.
The price is a second logits matmul (4 instead of 3 of the head's big matmuls: the 3B head at batch 8 ran 38 ms in
session 12's timeline, ~30 in one pass), which a host-bound step hides; ``engine.head_schedule='auto'`` takes it
only there.

Numerics: the loss is pass 1's, as the one-pass kernel's; each gradient element is formed in FP32 and rounded
once. The weight's gradient is one matmul over all tokens (the one-pass head rounds it once per token chunk) and
the input's gradient sums the blocks in FP32 before its one rounding. The two passes' logits come from
different matmul shapes, which may differ in the last bit of a few logits: the gradient then uses a
log-sum-exp off by ~one BF16 unit of those logits' share of the sum (tests/test_vocab_head.py: in BF16 on the GPU,
the input's and the weight's gradients are no further from the FP32 result than the one-pass kernel's are).

Invariant: ``on_block(lo, hi)`` is called in row order, after the work that writes ``grad_weight[lo:hi]`` is
queued, and nothing queued later writes those rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slideformer.kernels.cross_entropy import BLOCK, NUM_WARPS, triton
from slideformer.kernels.reference import IGNORE_INDEX

if triton is not None:
    import triton.language as tl

    from slideformer.kernels.cross_entropy import row_lse

    @triton.jit
    def _ce_lse(z_ptr, stride, t_ptr, lse_ptr, loss_ptr, ignore_index, n_cols: tl.constexpr,
                BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride
        y = tl.load(t_ptr + row)
        if y == ignore_index:
            tl.store(lse_ptr + row, float("inf"))  # exp(z - inf) = 0: pass 2 writes zeros on this row
            tl.store(loss_ptr + row, 0.0)
            return
        lse = row_lse(z_row, n_cols, BLOCK_SIZE)  # the one-pass kernel's own loop (kernels/cross_entropy.py)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, lse - tl.load(z_row + y).to(tl.float32))

    @triton.jit
    def _ce_grad_cols(z_ptr, stride, t_ptr, lse_ptr, col0, scale, n_cols: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride
        lse = tl.load(lse_ptr + row)
        y = tl.load(t_ptr + row) - col0
        hit = (y >= 0) & (y < n_cols)
        y_safe = tl.where(hit, y, 0)
        x_y = tl.load(z_row + y_safe).to(tl.float32)  # read before the loop below overwrites it
        cols = tl.arange(0, BLOCK_SIZE)
        for i in range(0, n_cols, BLOCK_SIZE):
            mask = i + cols < n_cols
            x = tl.load(z_row + i + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(z_row + i + cols, (tl.exp(x - lse) * scale).to(z_ptr.dtype.element_ty), mask=mask)
        # The loop's store to the target column must land before the corrected value below overwrites it.
        tl.debug_barrier()
        if hit:
            # Formed in FP32 and rounded once (kernels/cross_entropy.py says why).
            tl.store(z_row + y_safe, ((tl.exp(x_y - lse) - 1.0) * scale).to(z_ptr.dtype.element_ty))


BLOCKS = 8
"""Vocabulary blocks per head (``block_rows_for``): the first block's gradient is final after pass 1 and an eighth
of pass 2 (~11 ms of the 3B head at batch 8), and each block's matmuls stay large (8,192 x ~16K x 3,072)."""

GRAD_RING = 2
"""Blocks of the weight's gradient the device holds at once (``runtime/head_blocks.HeadGradRing``): block ``k`` is
written over block ``k - GRAD_RING`` once that one's download has run. Two: a block's download (~94 MiB on
Llama-3.2-3B, ~2 ms at 50 GB/s) runs beside the next block's matmuls (~3.4 ms), so the second slot is never waited
for in steady state; the other six eighths of the [V, H] gradient (0.55 GiB there) stay free for resident layers."""

BlockOut = Callable[[int, int], torch.Tensor]
"""``block_out(lo, hi)``: the ``[hi - lo, H]`` tensor that receives rows ``[lo, hi)`` of the weight's gradient."""

OnBlock = Callable[[int, int], None]
"""``on_block(lo, hi)``: rows ``[lo, hi)`` of the weight's gradient are final (their work is queued)."""


def lse_torch(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, loss_rows: torch.Tensor) -> None:
    """Pass 1 on one token chunk, in torch: each row's FP32 log-sum-exp (``inf`` on ignored rows) and loss."""
    z = logits.to(torch.float32)
    ignored = targets == IGNORE_INDEX
    row_lse = torch.logsumexp(z, dim=1)
    picked = z.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    lse.copy_(torch.where(ignored, torch.full_like(row_lse, float("inf")), row_lse))
    loss_rows.copy_(torch.where(ignored, torch.zeros_like(row_lse), row_lse - picked))


def grad_cols_torch(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, col0: int, scale: float) -> None:
    """Pass 2 on one vocabulary block (columns ``col0 ..``), in torch: the logits' gradient, in place."""
    z = torch.exp(logits.to(torch.float32) - lse.unsqueeze(1))
    y = targets - col0
    rows = ((y >= 0) & (y < logits.shape[1])).nonzero().squeeze(1)
    z[rows, y[rows]] -= 1.0
    logits.copy_(z * scale)


class VocabBlockedHead:
    """One micro-batch's head in two passes (module docstring). ``kernels``: the Triton kernels (CUDA), else torch."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, block_rows: int,
                 kernels: bool) -> None:
        self.x, self.weight, self.targets = x, weight, targets
        self.kernels = kernels
        n, vocab = x.shape[0], weight.shape[0]
        self.block_rows = max(1, min(block_rows, vocab))
        # One buffer for both passes' logits: a block's [N, block_rows], and in pass 1 token chunks of as many logits.
        self.buf = torch.empty(n * self.block_rows, dtype=x.dtype, device=x.device)
        self.chunk = max(1, self.buf.numel() // vocab)
        self.lse = torch.empty(n, dtype=torch.float32, device=x.device)

    @staticmethod
    def block_rows_for(vocab: int, blocks: int) -> int:
        """Rows per block for ``blocks`` blocks of a ``vocab``-row matrix, a multiple of 128 (the matmuls' tile)."""
        return max(128, -(-vocab // (blocks * 128)) * 128)

    @staticmethod
    def device_bytes(tokens: int, vocab: int, hidden: int, block_rows: int, elt: int) -> dict[str, int]:
        """Device bytes of one call, by what holds them (the planner's terms): the logits buffer of both passes
        (``tokens`` x ``block_rows``), the FP32 input gradient and the log-sum-exps."""
        return {"loss logits (one vocabulary block of every token)": tokens * min(block_rows, vocab) * elt,
                "vocab-blocked head: FP32 input gradient, log-sum-exps": tokens * hidden * 4 + tokens * 4}

    @staticmethod
    def grad_ring_rows(vocab: int, block_rows: int) -> int:
        """Rows of the weight's gradient the device holds at once (``GRAD_RING`` blocks; all of them when fewer)."""
        return min(vocab, GRAD_RING * block_rows)

    def loss(self, scale: float) -> torch.Tensor:
        """Pass 1: the summed loss times ``scale`` (an FP32 device scalar); keeps each row's log-sum-exp."""
        x, w, n = self.x, self.weight, self.x.shape[0]
        vocab = w.shape[0]
        loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
        for lo in range(0, n, self.chunk):
            hi = min(lo + self.chunk, n)
            z = torch.matmul(x[lo:hi], w.t(), out=self.buf[:(hi - lo) * vocab].view(hi - lo, vocab))
            if self.kernels:
                _ce_lse[(hi - lo,)](z, z.stride(0), self.targets[lo:hi], self.lse[lo:hi], loss_rows[lo:hi],
                                    IGNORE_INDEX, vocab, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS)
            else:
                lse_torch(z, self.targets[lo:hi], self.lse[lo:hi], loss_rows[lo:hi])
        return loss_rows.sum() * scale

    def backward(self, scale: float, grad_weight: torch.Tensor | None, on_block: OnBlock | None = None,
                 block_out: BlockOut | None = None) -> torch.Tensor:
        """Pass 2 (after ``loss``): ``d loss / d x`` in ``x``'s dtype; ``grad_weight`` ``[V, H]`` (or None)
        receives the weight's, a block at a time, ``on_block`` told after each; or ``block_out`` gives each block's
        destination (``grad_weight`` then unused)."""
        x, w, n = self.x, self.weight, self.x.shape[0]
        vocab = w.shape[0]
        # FP32 accumulator of the input gradient over the blocks (cuBLAS adds into it in FP32: addmm's out_dtype).
        gx = torch.empty((n, x.shape[1]), dtype=torch.float32, device=x.device)
        for b0 in range(0, vocab, self.block_rows):
            b1 = min(b0 + self.block_rows, vocab)
            wb = w[b0:b1]
            z = torch.matmul(x, wb.t(), out=self.buf[:n * (b1 - b0)].view(n, b1 - b0))
            if self.kernels:
                _ce_grad_cols[(n,)](z, z.stride(0), self.targets, self.lse, b0, float(scale), b1 - b0,
                                    BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS)
            else:
                grad_cols_torch(z, self.targets, self.lse, b0, scale)
            if grad_weight is not None or block_out is not None:
                torch.matmul(z.t(), x, out=block_out(b0, b1) if block_out is not None else grad_weight[b0:b1])
                if on_block is not None:
                    on_block(b0, b1)
            _accumulate(gx, z, wb, first=b0 == 0)
        return gx.to(x.dtype)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc (+)= a @ b`` with ``acc`` FP32 and ``a``, ``b`` in the compute dtype: one FP32 rounding per call where
    torch has matmuls with an FP32 output for them (``out_dtype``, CUDA); else the product is rounded to the
    compute dtype first."""
    if a.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            if first:
                torch.mm(a, b, out_dtype=torch.float32, out=acc)
            else:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # a torch without out_dtype for these dtypes: the rounded product
            pass
    if first:
        acc.copy_(a @ b)
    else:
        acc.add_(a @ b)
