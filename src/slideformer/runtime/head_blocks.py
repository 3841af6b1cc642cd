"""The tied head's gradient handed to the optimizer a vocabulary block at a time (``engine.head_schedule='vocab'``).

Owns the hand-off between ``kernels/vocab_head.VocabBlockedHead``'s second pass and the gradient pipeline. When a
block of the tied matrix's gradient rows is final, on the compute stream: the batch's rows inside it move into the
split update's compact buffer (``EmbeddingSplit.take_head_rows``: they are updated after the embedding backward),
the block's squared norm joins the step's, and an event marks it for the downloader
(``staged.StagedReady``), whose copies the optimizer consumes as background work while the head still runs.

The blocks are written into a ring of ``GRAD_RING`` block buffers (``HeadGradRing``) instead of a ``[V, H]``
gradient: block ``k`` goes where block ``k - GRAD_RING`` was, once the downloader has queued that one's copies and
they have run (the compute stream waits for their event). The rest of the matrix's gradient never exists on the
device (0.55 GiB of Llama-3.2-3B's 0.73).

Invariant: the same gradient values, norm terms and update as the one-pass head's single drain (``runtime/step.py``),
taken in row order a block at a time; the last block's mark covers the unit's padded tail; a ring slot is written
only after the copies that read its previous block have run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from slideformer.kernels.vocab_head import VocabBlockedHead
from slideformer.runtime.device import DeviceOps, add_squared_norm
from slideformer.runtime.embedding_split import EmbeddingSplit
from slideformer.runtime.staged import Progress, StagedReady

if TYPE_CHECKING:
    from slideformer.runtime.engine import Engine

logger = logging.getLogger("slideformer.runtime.engine")


class HeadGradRing:
    """A ring of gradient blocks: rows ``[k * block_rows, ...)`` of the ``[V, H]`` gradient live in slot
    ``k % slots`` of ``buf`` while block ``k`` is the newest there.

    The downloader reads element ranges of the flat gradient (``pieces``) and marks how far its copies are queued
    (``copies``); the main thread waits for a slot's previous block (``wait_free``) before writing the next one."""

    def __init__(self, buf: torch.Tensor, vocab: int, hidden: int, block_rows: int) -> None:
        self.buf, self.vocab, self.hidden, self.block_rows = buf, vocab, hidden, block_rows
        self.block = block_rows * hidden  # elements per block
        self.slots = -(-buf.numel() // self.block)  # (the last may be partial: a buffer of the whole matrix)
        if self.slots < 1:
            raise ValueError(f"a {buf.numel()}-element ring cannot hold a {block_rows}-row block")
        self.start()

    def start(self) -> None:
        """Main thread, before a head's pass 2: nothing of the new gradient is copied yet."""
        self.copies = Progress("the head's gradient download failed")
        """How far the downloader's copies out of the ring got in this pass."""

    def block_view(self, k: int, rows: int) -> torch.Tensor:
        lo = (k % self.slots) * self.block
        return self.buf[lo:lo + rows * self.hidden].view(rows, self.hidden)

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, torch.Tensor]]:
        """Downloader: elements ``[lo, hi)`` of the flat gradient as ``(from, to, device view)`` pieces, one per block
        they touch."""
        out = []
        for k in range(lo // self.block, (hi - 1) // self.block + 1):
            a, b = max(lo, k * self.block), min(hi, (k + 1) * self.block)
            at = (k % self.slots) * self.block + a - k * self.block
            out.append((a, b, self.buf[at:at + b - a]))
        return out

    def wait_free(self, k: int) -> Any:
        """Main thread: the event after which block ``k``'s slot may be written again (its copies have run)."""
        return self.copies.event_for(min((k + 1) * self.block, self.vocab * self.hidden), "head gradient ring slot")


class HeadGrad:
    """The step runner's views of the vocabulary slot's gradient buffer: [the matrix's | the head unit's], or with the
    blocked head's ring (``engine.vocab_ring``) [ring | the head unit's] and no whole-matrix view (``gw`` None)."""

    def __init__(self, engine: Engine, w_lo: int, w_shape: torch.Size) -> None:
        self.e, self.w_lo, self.w_shape = engine, w_lo, w_shape
        self.bind()

    def bind(self) -> None:
        e = self.e
        uh_seg, ring, flat = e.head_segments[-1], e.vocab_ring, e.vocab_slot.grad
        at = ring.buf.numel() if ring is not None else uh_seg.offset
        self.uh = flat[at:at + uh_seg.unit.padded]
        self.uh_views = [self.uh[s.offset:s.offset + s.numel].view(s.shape) for s in uh_seg.unit.params]
        n = self.w_shape.numel()
        self.gw = None if ring is not None else flat[self.w_lo:self.w_lo + n].view(self.w_shape)
        # The blocked head over the whole buffer when there is no ring (its blocks never wait for a slot).
        self.whole_ring = (HeadGradRing(flat[:e.vocab * e.hidden], e.vocab, e.hidden, e.head_blocks)
                           if ring is None and e.head_blocks > 0 else None)

    def grow(self, ops: DeviceOps) -> None:
        """Give the vocabulary slot the whole matrix's gradient buffer, once: a step takes the one-pass head or the
        whole embedding update (clipping, accumulation, the deferred schedule) in an engine built with the ring."""
        e = self.e
        numel = e.vocab_slot.weight.numel()  # (the weights' buffer is the whole matrix's size)
        logger.info("the vocabulary slot's gradient grows to the whole matrix (%.2f GiB): a step takes the one-pass "
                    "head or the whole embedding update", numel * e.vocab_slot.grad.element_size() / 2**30)
        # (The ring's memory goes back to the allocator once the downloads that read it have run: record_stream.)
        e.vocab_slot.grad = ops.empty(numel, e.dtype)
        e.vocab_ring = None
        self.bind()


def backward_in_blocks(head: VocabBlockedHead, scale: float, *, ops: DeviceOps, split: EmbeddingSplit,
                       ring: HeadGradRing, numel: int, rows: torch.Tensor, rows_host: torch.Tensor,
                       sq: torch.Tensor, scratch: torch.Tensor, ready: StagedReady) -> torch.Tensor:
    """Pass 2 of ``head`` with each block handed on (module docstring); returns the input's gradient.

    ``ring``: where the blocks of the ``[V, H]`` gradient go (``ready.ring``), ``numel`` the unit's padded size (what
    the downloader copies); ``rows``/``rows_host``: the micro-batch's sorted distinct token ids on the device
    and the host; ``sq``/``scratch``: the step's device-side squared norm and its scratch."""
    vocab, hidden = ring.vocab, ring.hidden
    cs = ops.compute_stream()
    # Where each block's rows start among the batch's sorted ids (host, once per micro-batch), and each id's row
    # inside its block (device, once per micro-batch: the compact buffer takes them a block at a time).
    edges = torch.arange(0, vocab + head.block_rows, head.block_rows, dtype=rows_host.dtype).clamp_(max=vocab)
    bounds = torch.searchsorted(rows_host, edges).tolist()
    local = torch.remainder(rows, head.block_rows)
    ring.start()

    def block_out(lo: int, hi: int) -> torch.Tensor:
        k = lo // head.block_rows
        if k >= ring.slots:
            # The slot's previous block must be downloaded before this block's matmul overwrites it.
            ops.wait(cs, ring.wait_free(k - ring.slots))
        return ring.block_view(k, hi - lo)

    def on_block(lo: int, hi: int) -> None:
        k = lo // head.block_rows
        block = ring.block_view(k, hi - lo)
        split.take_head_rows(block, local, bounds[k], bounds[k + 1])
        end = numel if hi == vocab else hi * hidden
        add_squared_norm(sq, block.view(-1), scratch)
        ready.mark(end, ops.record(cs))  # the downloader may copy these rows once this block's work has run

    try:
        return head.backward(scale, None, on_block, block_out)
    except BaseException as exc:
        ready.abort(exc)  # the downloader is waiting for the remaining blocks
        raise
