"""The tied head's gradient handed to the optimizer a vocabulary block at a time (``engine.head_schedule='vocab'``).

Owns the hand-off between ``kernels/vocab_head.VocabBlockedHead``'s second pass and the gradient pipeline. When a
block of the tied matrix's gradient rows is final, on the compute stream: the batch's rows inside it move into the
split update's compact buffer (``EmbeddingSplit.take_head_rows``: they are updated after the embedding backward),
the block's squared norm joins the step's, and an event marks it for the downloader
(``grad_pipeline.StagedReady``), whose copies the optimizer consumes as background work while the head still runs.

Invariant: the same gradient values, norm terms and update as the one-pass head's single drain (``runtime/step.py``),
taken in row order a block at a time; the last block's mark covers the unit's padded tail.
"""

from __future__ import annotations

import torch

from slideformer.kernels.vocab_head import VocabBlockedHead
from slideformer.runtime.device import DeviceOps, add_squared_norm
from slideformer.runtime.embedding_split import EmbeddingSplit
from slideformer.runtime.grad_pipeline import StagedReady


def backward_in_blocks(head: VocabBlockedHead, scale: float, *, ops: DeviceOps, split: EmbeddingSplit,
                       grad_weight: torch.Tensor, grad_flat: torch.Tensor, rows: torch.Tensor,
                       rows_host: torch.Tensor, sq: torch.Tensor, scratch: torch.Tensor,
                       ready: StagedReady) -> torch.Tensor:
    """Pass 2 of ``head`` with each block handed on (module docstring); returns the input's gradient.

    ``grad_weight``: the ``[V, H]`` gradient in the vocabulary slot, ``grad_flat`` the unit's padded flat view of it
    (what the downloader copies); ``rows``/``rows_host``: the micro-batch's sorted distinct token ids on the device
    and the host; ``sq``/``scratch``: the step's device-side squared norm and its scratch."""
    vocab, hidden = grad_weight.shape
    cs = ops.compute_stream()
    # Where each block's rows start among the batch's sorted ids (host, once per micro-batch).
    edges = torch.arange(0, vocab + head.block_rows, head.block_rows, dtype=rows_host.dtype).clamp_(max=vocab)
    bounds = torch.searchsorted(rows_host, edges).tolist()

    def on_block(lo: int, hi: int) -> None:
        k = lo // head.block_rows
        split.take_head_rows(grad_weight, rows, bounds[k], bounds[k + 1])
        end = grad_flat.numel() if hi == vocab else hi * hidden
        add_squared_norm(sq, grad_flat[lo * hidden:end], scratch)
        ready.mark(end, ops.record(cs))  # the downloader may copy these rows once this block's work has run

    try:
        return head.backward(scale, grad_weight, on_block)
    except BaseException as exc:
        ready.abort(exc)  # the downloader is waiting for the remaining blocks
        raise

