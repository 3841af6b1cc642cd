"""The input embedding's CPU AdamW in two parts (``engine.embedding_update='split'``, overlap schedule).

A micro-batch touches a few thousand of the vocabulary's rows. Every other row's gradient is known before
backward reaches the embedding: exactly zero when the embedding is untied, the LM head's gradient when it is
tied (complete right after the head). So the whole matrix but the batch's rows is updated early, while backward
runs (``cpu_adam_rows.adamw_skip_rows``):
  * untied: background work of the optimizer thread, queued once the loss is known, with a zero gradient (no
    download);
  * tied: the head's gradient, drained right after the head with the batch's rows zeroed on the device (their
    head part moves into the compact ``rows_grad`` buffer first, and the step's norm counts them once),
    consumed as background work.
Background work runs a chunk at a time, ordered with the landed layer gradients by unit index
(``runtime/grad_pipeline.py``): the embedding is what the next forward reads first, so it goes before the
layers unless the parking pool runs short, and what backward leaves behind is the top layers' updates, which
overlap the next forward.
The embedding backward then sums the batch rows' gradient into ``rows_grad`` (compact: one row per distinct
token id); that is downloaded and the batch's rows are updated in place from it
(``cpu_adam_rows.adamw_rows``, which also writes their BF16 upload copy). The step no longer ends on a
whole-vocabulary download and update: only the batch's rows remain after the embedding backward, and nothing
is kept aside on the host.

Invariant: the result is bitwise one whole-matrix update. AdamW is elementwise; the kernel gives every
element the same arithmetic when a call's length is a multiple of ``cpu_adam.TAIL_WIDTH`` (its last
``n % 8`` elements take torch's scalar-tail arithmetic), which holds for every call of both parts when the
hidden size and the optimizer chunk are multiples of it (``used``; every released LLM's hidden size is;
otherwise the engine keeps the whole update). Every row is updated once from its state before the step (the
early part skips the batch's rows, the rows' part touches only them), with the step's one step count and
learning rate, and the compact gradient sums the same terms in the same order as the whole-matrix one. The
rows' update is an item of the same unit queued after the early one (the optimizer consumes a unit's items in
submission order, and a task before anything submitted later), and it is the unit's ``update_future``, so every
reader (the next gather, the tied head's upload, ``flush``) sees both parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from slideformer.memory.host_state import HostUnit
from slideformer.optim.adamw import FlatAdamW, UpdateSpec, adamw_range
from slideformer.optim.cpu_adam import TAIL_WIDTH
from slideformer.optim.cpu_adam_rows import adamw_rows, adamw_skip_rows
from slideformer.runtime.device import DeviceOps

TIED_SPLIT_GAIN = 0.03
"""The predicted gain a tied embedding's split must show under 'auto' (``EmbeddingSplit.pays``)."""


@dataclass(frozen=True)
class RowsJob:
    """One step's split update: the micro-batch's rows and the step's update spec."""

    rows: torch.Tensor
    """Distinct token ids of the micro-batch, sorted (host, int64)."""
    spec: UpdateSpec


@dataclass
class RowUpdate:
    """Drain action of the rows' part: AdamW on the batch's rows, in place, from the compact gradient."""

    job: RowsJob
    split: EmbeddingSplit

    @property
    def numel(self) -> int:
        return int(self.job.rows.numel()) * self.split.hidden


class EmbeddingSplit:
    """Device compact-gradient buffer (main thread) and the host side of the split update (optimizer thread)."""

    def __init__(self, ops: DeviceOps, unit: HostUnit, vocab: int, hidden: int, dtype: torch.dtype,
                 adam: FlatAdamW, chunk: int) -> None:
        if len(unit.params) != 1 or unit.sharded or unit.numel != vocab * hidden:
            raise RuntimeError(f"{unit.name}: the split embedding update needs one unsharded [vocab, hidden] matrix")
        self.ops, self.unit, self.vocab, self.hidden, self.dtype = ops, unit, vocab, hidden, dtype
        self.adam = adam
        self.chunk = min(chunk, unit.numel)
        self.decay = unit.n_decay == unit.numel  # one matrix: decayed or not as a whole (HostUnit.decay_segments)
        self._zero: torch.Tensor | None = None  # the untied early update's gradient chunk, made on first use
        self._range = adamw_range(unit)  # its profiler range
        self.capacity = 0
        """Rows the device gradient buffer holds (sized for the largest micro-batch, between steps)."""
        self.rows_grad = ops.empty(0, dtype)

    @staticmethod
    def used(update: str, *, tied: bool, hidden: int, chunk: int, single_process: bool, in_ram: bool,
             tied_split: bool = False) -> bool:
        """Whether a run takes the split: one process, moments in RAM, and bitwise the whole update, i.e. every
        call of both paths a multiple of the kernel's tail width (rows of ``hidden`` elements, chunks of ``chunk``;
        see the module invariant). The engine and the planner ask this one question.

        ``engine.embedding_update='auto'`` splits an untied embedding, and a ``tied`` one only where the planner's
        step model predicts the split pays (``tied_split``, from ``pays``; else whole). Same-run H100
        measurements (performance_h100_202611.md): untied 8B b8, 22 resident: split 1.241 vs whole 1.365 s/step
        (session 7; 1.298 vs 1.342 in session 6), its early part is free background work (a zero gradient, no
        download). Tied 3B b8 on a 24 GiB cap: whole 0.656 vs split 0.679 with 12 resident layers (session 7; 0.567
        vs 0.601 in session 6), 0.963 vs 0.977 with none (session 6): the early part needs the head's whole
        gradient downloaded at the start of backward and goes before the layers' updates. Since session 8's
        optimizer order (only chunks whose copy completed are consumed) the tied pairs are even (0.565 vs 0.564
        with 12 resident, 0.960 vs 0.933 with none), and the planner predicts no gain there (the host's AdamW is
        saturated through backward, so the early part only moves). With the resident weights cast on use (14
        resident, session 9) the CPU has slack in backward: split 0.526 vs whole 0.547, and the plan predicts 5%; with
        every layer resident (3B b8 on 80 GB, the CPU updates only the embedding) split 0.441 vs whole 0.499."""
        if update == "auto":
            update = "split" if not tied or tied_split else "whole"
        return (update == "split" and single_process and in_ram
                and hidden % TAIL_WIDTH == 0 and chunk % TAIL_WIDTH == 0)

    @staticmethod
    def pays(split_step_s: float, whole_step_s: float) -> bool:
        """Whether a tied embedding's split is worth it: the planner's predicted step with the split at least
        ``TIED_SPLIT_GAIN`` shorter than with the whole update (the measured tied pairs within that were even)."""
        return split_step_s <= (1.0 - TIED_SPLIT_GAIN) * whole_step_s

    def ensure(self, tokens: int) -> None:
        """Size the device buffer for micro-batches of ``tokens`` tokens (at most that many distinct rows); called
        by ``Engine.ensure_capacity`` between steps, as the embedding-row buffers beside it are."""
        rows = min(tokens, self.vocab)
        if rows > self.capacity:
            self.rows_grad = self.ops.empty(rows * self.hidden, self.dtype)
            self.capacity = rows

    # -- main thread (device work on the compute stream) ---------------------------------------------
    def job(self, rows: torch.Tensor | None, spec: UpdateSpec) -> RowsJob:
        """The step's job (``rows``: the micro-batch's distinct token ids, sorted, on the host)."""
        if rows is None:
            raise RuntimeError("the split embedding update needs the micro-batch's rows: prepare_batch(rows=True)")
        return RowsJob(rows, spec)

    def grad_rows(self, n_rows: int) -> torch.Tensor:
        """The compact gradient ``[n_rows, hidden]`` (device; compute stream)."""
        return self.rows_grad[:n_rows * self.hidden].view(n_rows, self.hidden)

    def take_head_rows(self, head_grad: torch.Tensor, rows: torch.Tensor, lo: int = 0, hi: int | None = None) -> None:
        """Tied: move the head's gradient of the batch's rows (those at positions ``[lo, hi)`` of ``rows``: the
        vocabulary-blocked head hands them over a block at a time) into the compact buffer and zero them in
        ``head_grad`` (``[vocab, hidden]``, or one block of it with ``rows`` the ids' rows inside their blocks),
        which the early update then consumes."""
        hi = rows.numel() if hi is None else hi
        part = rows[lo:hi]
        torch.index_select(head_grad, 0, part, out=self.grad_rows(rows.numel())[lo:hi])
        head_grad.index_fill_(0, part, 0)

    # -- optimizer thread ----------------------------------------------------------------------------
    def early(self, job: RowsJob, lo: int, hi: int, grad: torch.Tensor) -> None:
        """AdamW on elements ``[lo, hi)`` of the matrix from ``grad``, the batch's rows left for ``update_rows``."""
        u, copy = self.unit, self.unit.upload_copy
        m, v = u.moment_slices(lo, hi)
        adamw_skip_rows(u.master_slice(lo, hi), grad, m, v, base=lo, row_len=self.hidden, skip=job.rows,
                        out=None if copy is None else copy[lo:hi], stream_out=copy is not None,
                        **self.adam.hyperparams(job.spec, self.decay))

    def early_zero(self, job: RowsJob) -> Iterator[str]:
        """Untied: the early part with a zero gradient, one chunk per step (background work of the optimizer
        thread: ``GradPipeline.submit_background``); each step yields what it did, for the watchdog's report."""
        if self._zero is None:
            self._zero = torch.zeros(self.chunk, dtype=self.dtype)
        for lo in range(0, self.unit.numel, self.chunk):
            hi = min(lo + self.chunk, self.unit.numel)
            with record_function(self._range):
                self.early(job, lo, hi, self._zero[:hi - lo])
            yield f"{self.unit.name}[{lo}:{hi}] (zero-gradient rows)"

    def update_rows(self, job: RowsJob, lo: int, hi: int, grad: torch.Tensor) -> None:
        """AdamW on elements ``[lo, hi)`` of the batch's rows (flat, row-major, compact), in place in the unit."""
        u, copy = self.unit, self.unit.upload_copy
        m, v = u.moment_slices(0, u.numel)
        adamw_rows(u.master_slice(0, u.numel), grad, m, v, lo=lo, row_len=self.hidden, rows=job.rows, out=copy,
                   stream_out=copy is not None, **self.adam.hyperparams(job.spec, self.decay))
