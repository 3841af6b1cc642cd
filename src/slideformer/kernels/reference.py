"""Pure-PyTorch reference kernels, used by the engine where Triton is absent and by tests/benchmarks.

``linear_cross_entropy`` is the LM head fused with the loss: it walks the tokens in chunks, so the
``[tokens, vocab]`` logits never exist at once, and it produces the gradients for the hidden states
and the head weight in the same pass (the head's backward is done by the time the loss is known).

Invariant: the arithmetic matches HF's causal-LM loss (logits upcast to FP32, log-softmax, ignore
index -100, optional tanh soft-capping); the loss returned is ``sum(token losses) * scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM shift: position t is scored against labels[t + 1]; the last position is ignored."""
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


ChunkFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""The head's per-chunk loss and gradient: ``fn(logits, targets, scale)`` overwrites the chunk's ``[n, V]`` logits
with ``d(summed loss * scale) / d logits`` and returns the summed loss times ``scale`` (``chunk_loss_grad``, or the
Triton kernel's wrapper, ``kernels.cross_entropy.loss_grad_``)."""


def chunk_loss_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float,
                    softcap: float | None = None) -> torch.Tensor:
    """The torch path of a ``ChunkFn``: HF's loss on the chunk's FP32-upcast logits, its gradient from autograd.

    The loss runs through autograd on the chunk's logits alone, with the same ops as HF's loss (soft-cap,
    ``cross_entropy(reduction='sum')``), so its gradient is autograd's to the bit; ~20 B of GPU memory per logit.
    """
    z32 = logits.detach().to(torch.float32, copy=True).requires_grad_(True)
    with torch.enable_grad():
        z = z32 if softcap is None else torch.tanh(z32 / softcap) * softcap
        chunk_loss = torch.nn.functional.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        # d(loss * scale) feeds exactly ``scale`` into cross_entropy's backward.
        (grad,) = torch.autograd.grad(chunk_loss * scale, z32)
    logits.copy_(grad)
    return chunk_loss.detach() * scale


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                         grad_weight: torch.Tensor | None, chunk_tokens: int = 2048,
                         softcap: float | None = None, chunk_fn: ChunkFn | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradients of ``CE(x @ weight.T, targets)`` computed chunk by chunk.

    Args:
        x: ``[N, H]`` hidden states (the head's input), any float dtype.
        weight: ``[V, H]`` LM head weight, same dtype as ``x``.
        targets: ``[N]`` class indices, ``-100`` ignored.
        scale: multiplies the summed token losses (e.g. ``1 / tokens in the step``).
        grad_weight: ``[V, H]`` buffer that receives ``d loss / d weight`` (overwritten), or None.
        chunk_tokens: tokens per chunk.
        softcap: Gemma-style final logit soft-capping, ``cap * tanh(logits / cap)`` (torch path only).
        chunk_fn: the per-chunk loss and gradient (``ChunkFn``); None: ``chunk_loss_grad``.

    Returns:
        ``(loss, grad_x)``: the scaled loss as a float32 scalar tensor and ``d loss / d x``.
    """
    n = x.shape[0]
    grad_x = torch.empty_like(x)
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    if grad_weight is not None:
        grad_weight.zero_()
    per_chunk: ChunkFn = (chunk_fn if chunk_fn is not None and softcap is None
                          else partial(chunk_loss_grad, softcap=softcap))
    # One chunk's logits, then its gradient in place (the matmul below reads them before the next chunk's).
    logits_buf = torch.empty((min(chunk_tokens, n), weight.shape[0]), dtype=x.dtype, device=x.device)
    for lo in range(0, n, chunk_tokens):
        hi = min(lo + chunk_tokens, n)
        xc = x[lo:hi]
        g = torch.matmul(xc, weight.t(), out=logits_buf[:hi - lo])
        loss += per_chunk(g, targets[lo:hi], scale)
        torch.matmul(g, weight, out=grad_x[lo:hi])
        if grad_weight is not None:
            grad_weight.addmm_(g.t(), xc)
    return loss, grad_x
