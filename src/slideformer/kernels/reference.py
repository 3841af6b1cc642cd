"""Pure-PyTorch reference kernels, used by the engine where Triton is absent and by tests/benchmarks.

``linear_cross_entropy`` is the LM head fused with the loss: it walks the tokens in chunks, so the
``[tokens, vocab]`` logits never exist at once, and it produces the gradients for the hidden states
and the head weight in the same pass (the head's backward is done by the time the loss is known).

Invariant: the arithmetic matches HF's causal-LM loss (logits upcast to FP32, log-softmax, ignore
index -100, optional tanh soft-capping); the loss returned is ``sum(token losses) * scale``.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM shift: position t is scored against labels[t + 1]; the last position is ignored."""
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                         grad_weight: torch.Tensor | None, chunk_tokens: int = 2048,
                         softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradients of ``CE(x @ weight.T, targets)`` computed chunk by chunk.

    Args:
        x: ``[N, H]`` hidden states (the head's input), any float dtype.
        weight: ``[V, H]`` LM head weight, same dtype as ``x``.
        targets: ``[N]`` class indices, ``-100`` ignored.
        scale: multiplies the summed token losses (e.g. ``1 / tokens in the step``).
        grad_weight: ``[V, H]`` buffer that receives ``d loss / d weight`` (overwritten), or None.
        chunk_tokens: tokens per chunk.
        softcap: Gemma-style final logit soft-capping, ``cap * tanh(logits / cap)``.

    Returns:
        ``(loss, grad_x)``: the scaled loss as a float32 scalar tensor and ``d loss / d x``.
    """
    n = x.shape[0]
    grad_x = torch.empty_like(x)
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    if grad_weight is not None:
        grad_weight.zero_()
    g_out = torch.tensor(scale, dtype=torch.float32, device=x.device)
    for lo in range(0, n, chunk_tokens):
        hi = min(lo + chunk_tokens, n)
        xc = x[lo:hi]
        logits = (xc @ weight.t()).float().requires_grad_(True)
        # The loss part runs through autograd on the chunk's logits alone, with the same ops as HF's
        # loss (soft-cap, cross_entropy(reduction='sum')), so its gradient is autograd's to the bit.
        with torch.enable_grad():
            z = logits if softcap is None else torch.tanh(logits / softcap) * softcap
            chunk_loss = torch.nn.functional.cross_entropy(z, targets[lo:hi], ignore_index=IGNORE_INDEX,
                                                           reduction="sum")
        (grad,) = torch.autograd.grad(chunk_loss, logits, g_out)
        loss += chunk_loss.detach() * scale
        g = grad.to(x.dtype)
        torch.matmul(g, weight, out=grad_x[lo:hi])
        if grad_weight is not None:
            grad_weight.addmm_(g.t(), xc)
    return loss, grad_x
