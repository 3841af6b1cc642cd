"""The input embedding's CPU AdamW in two parts (``engine.embedding_update='split'``, overlap schedule).

A micro-batch touches a few thousand of the vocabulary's rows. Every other row's gradient is known before
backward reaches the embedding: exactly zero when the embedding is untied, the LM head's gradient when it is
tied (complete right after the head). So the whole matrix is updated early, while backward runs, after the
batch's rows (FP32 master and both moments) were saved aside:
  * untied: background work of the optimizer thread, queued once the loss is known, with a zero gradient (no
    download);
  * tied: the head's gradient, drained right after the head with the batch's rows zeroed on the device (their
    head part moves into the compact ``rows_grad`` buffer first), consumed as background work.
Background work runs a chunk at a time, ordered with the landed layer gradients by unit index
(``runtime/grad_pipeline.py``): the embedding is what the next forward reads first, so it goes before the
layers unless the parking pool runs short, and what backward leaves behind is the top layers' updates, which
overlap the next forward.
The embedding backward then sums the batch rows' gradient into ``rows_grad`` (compact: one row per distinct
token id); that is downloaded, applied to the saved rows, and the saved rows are written back over what the
early update left in them (and into the BF16 upload copy). The step no longer ends on a whole-vocabulary
download and update: only the batch's rows remain after the embedding backward.

Invariant: the result is bitwise one whole-matrix update. AdamW is elementwise; the kernel gives every
element the same arithmetic when a call's length is a multiple of ``cpu_adam.TAIL_WIDTH`` (its last
``n % 8`` elements take torch's scalar-tail arithmetic), which holds for every call of both paths when the
hidden size and the optimizer chunk are multiples of it (``used``; every released LLM's hidden size is;
otherwise the engine keeps the whole update). Every row is updated once from its state before the step,
with the step's one step count and learning rate, and the compact gradient sums the same terms in the same
order as the whole-matrix one. The rows' update is an item of the same unit queued
after the early one (the optimizer consumes a unit's items in submission order, and a task before anything
submitted later), and it is the unit's ``update_future``, so every reader (the next gather, the tied head's
upload, ``flush``) sees both parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from slideformer.memory.host_state import HostUnit
from slideformer.optim.adamw import FlatAdamW, UpdateSpec
from slideformer.optim.cpu_adam import TAIL_WIDTH, adamw_step
from slideformer.runtime.device import DeviceOps


@dataclass(frozen=True)
class RowsJob:
    """One step's split update: its rows, its spec, and the host buffers it saved them in (captured at
    submission, so a later capacity growth cannot swap them under an update in flight)."""

    rows: torch.Tensor
    """Distinct token ids of the micro-batch, sorted (host, int64)."""
    spec: UpdateSpec
    saved: torch.Tensor
    """[3, len(rows) * hidden] FP32: master, exp_avg, exp_avg_sq of the rows."""
    out: torch.Tensor | None
    """[len(rows) * hidden] in the upload copy's dtype, when the unit has an upload copy."""


@dataclass
class RowUpdate:
    """Drain action of the rows' part: AdamW on the saved rows from the compact gradient, then write back."""

    job: RowsJob
    split: EmbeddingSplit

    @property
    def numel(self) -> int:
        return int(self.job.saved.shape[1])


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
        self.capacity = 0
        """Rows the device gradient buffer holds (sized for the largest micro-batch, between steps)."""
        self.rows_grad = ops.empty(0, dtype)
        self.saved = torch.empty(3, 0)
        self.out: torch.Tensor | None = None

    @staticmethod
    def used(update: str, *, hidden: int, chunk: int, single_process: bool, in_ram: bool) -> bool:
        """Whether a run takes the split (``engine.embedding_update='split'``; 'auto' keeps the whole update): one
        process, moments in RAM, and bitwise the whole update, i.e. every call of both paths a multiple of the kernel's
        tail width (rows of ``hidden`` elements, chunks of ``chunk``; see the module invariant). The engine
        and the planner ask this one question."""
        return (update == "split" and single_process and in_ram
                and hidden % TAIL_WIDTH == 0 and chunk % TAIL_WIDTH == 0)

    def ensure(self, tokens: int) -> None:
        """Size the device buffer for micro-batches of ``tokens`` tokens (at most that many distinct rows); called
        by ``Engine.ensure_capacity`` between steps, as the embedding-row buffers beside it are. The host buffers
        grow with the distinct rows a micro-batch really has (``job``): a few thousand for text, where random
        tokens reach ``tokens``."""
        rows = min(tokens, self.vocab)
        if rows > self.capacity:
            self.rows_grad = self.ops.empty(rows * self.hidden, self.dtype)
            self.capacity = rows

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.saved, self.out) if t is not None)

    # -- main thread (device work on the compute stream) ---------------------------------------------
    def job(self, rows: torch.Tensor, spec: UpdateSpec) -> RowsJob:
        """The step's job; grows the host buffers when this batch has more distinct rows than any before (a
        job in flight keeps the buffers it captured, and the optimizer thread runs jobs one after another)."""
        n = rows.numel() * self.hidden
        if n > self.saved.shape[1]:
            self.saved = torch.empty(3, n)
            copy = self.unit.upload_copy
            self.out = None if copy is None else torch.empty(n, dtype=copy.dtype)
        return RowsJob(rows, spec, self.saved[:, :n], None if self.out is None else self.out[:n])

    def grad_rows(self, n_rows: int) -> torch.Tensor:
        """The compact gradient ``[n_rows, hidden]`` (device; compute stream)."""
        return self.rows_grad[:n_rows * self.hidden].view(n_rows, self.hidden)

    def take_head_rows(self, head_grad: torch.Tensor, rows: torch.Tensor) -> None:
        """Tied: move the head's gradient of the batch's rows into the compact buffer and zero them in
        ``head_grad`` (``[vocab, hidden]``), which the early update then consumes."""
        torch.index_select(head_grad, 0, rows, out=self.grad_rows(rows.numel()))
        head_grad.index_fill_(0, rows, 0)

    # -- optimizer thread ----------------------------------------------------------------------------
    def _rows(self, which: int) -> torch.Tensor:
        return self.unit.flat[which * self.unit.numel:(which + 1) * self.unit.numel].view(self.vocab, self.hidden)

    def save_rows(self, job: RowsJob) -> None:
        """Before the early update: keep the rows' master and moments as they were before the step."""
        n = job.rows.numel()
        for k in range(3):
            torch.index_select(self._rows(k), 0, job.rows, out=job.saved[k].view(n, self.hidden))

    def early_zero(self, job: RowsJob) -> Iterator[str]:
        """Untied: save the rows, then AdamW over the whole matrix with a zero gradient, one chunk per step
        (background work of the optimizer thread: ``GradPipeline.submit_background``); each step yields what it
        did, for the watchdog's report."""
        self.save_rows(job)
        if self._zero is None:
            self._zero = torch.zeros(self.chunk, dtype=self.dtype)
        copy = self.unit.upload_copy
        for lo in range(0, self.unit.numel, self.chunk):
            hi = min(lo + self.chunk, self.unit.numel)
            with record_function("sf/cpu_adamw"):
                self.adam.update(self.unit, lo, hi, self._zero[:hi - lo], job.spec,
                                 out=None if copy is None else copy[lo:hi])
            yield f"{self.unit.name}[{lo}:{hi}] (zero-gradient rows)"

    def update_rows(self, job: RowsJob, lo: int, hi: int, grad: torch.Tensor) -> None:
        """AdamW on elements ``[lo, hi)`` of the saved rows (flat, row-major) from their landed gradient."""
        cfg = self.adam.cfg
        b1, b2 = cfg.betas
        adamw_step(job.saved[0, lo:hi], grad, job.saved[1, lo:hi], job.saved[2, lo:hi], step=job.spec.step,
                   lr=job.spec.lr, beta1=b1, beta2=b2, eps=cfg.eps,
                   weight_decay=cfg.weight_decay if self.decay else 0.0, grad_scale=job.spec.grad_scale,
                   out=None if job.out is None else job.out[lo:hi])

    def write_back(self, job: RowsJob) -> None:
        """After the rows' last chunk: their updated master, moments (and upload copy) into the unit."""
        n = job.rows.numel()
        for k in range(3):
            self._rows(k).index_copy_(0, job.rows, job.saved[k].view(n, self.hidden))
        copy = self.unit.upload_copy
        if copy is not None and job.out is not None:
            copy.view(self.vocab, self.hidden).index_copy_(0, job.rows, job.out.view(n, self.hidden))
