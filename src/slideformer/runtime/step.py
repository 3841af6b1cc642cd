"""One training step over the sliding window: the loop that reads like the algorithm.

Per micro-batch, in program order: plan every slot use (which queues the uploads), then
  embed: the host gathers the batch's embedding rows; the preamble builds masks and RoPE,
  forward: layer j computes in slot j % window while later layers upload; its input goes to the host,
  head: final norm + chunked linear cross-entropy, loss and head gradients in one pass,
  backward: layer j is recomputed from its prefetched input and back-propagated; its gradient is
            drained on the gradient worker (AdamW right away, or accumulation for the deferred schedule),
  embed backward: the embedding gradient is scattered into the vocab slot and drained (or, with the split
            embedding update, only the batch's rows: the rest was updated during backward;
            ``runtime/embedding_split.py``).
The deferred schedule then queues the global-norm computation and every unit's update, which run
while the next step's forward starts (each upload waits only for its own unit's update).

Planning the forward's slot uses, waiting for uploads, binding slot views and failing a failed step's
releases are the runner's base, ``SlotUses`` (``runtime/slot_uses.py``); the embedding, the layers' forward and the
evaluation pass its next, ``ForwardPass`` (``runtime/forward.py``).

Invariant: the main thread only issues device work and waits on futures/events it was handed; it
never waits for the device to drain (the loss read at the end waits for the compute stream only).
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING

import torch

from slideformer.kernels.reference import linear_cross_entropy
from slideformer.kernels.vocab_head import VocabBlockedHead
from slideformer.memory.host_state import HostUnit
from slideformer.models import run_layer
from slideformer.optim.adamw import UpdateSpec
from slideformer.runtime import head_blocks
from slideformer.runtime.batch import MicroBatch
from slideformer.runtime.device import add_squared_norm
from slideformer.runtime.embedding_split import RowsJob, RowUpdate
from slideformer.runtime.forward import ForwardPass
from slideformer.runtime.grad_norm import clip_coefficient
from slideformer.runtime.head_blocks import HeadGrad
from slideformer.runtime.staged import StagedReady
from slideformer.runtime.transfer import Accumulate, Update
from slideformer.runtime.window import Segment, Slot, plan_use

if TYPE_CHECKING:
    from slideformer.runtime.engine import Engine


# ATen's embedding_dense_backward_cuda: up to this many indices, the chunked kernel (see rows_grad).
_CUDA_CHUNKED_ROWS = 3072


def rows_grad(mb: MicroBatch, dx: torch.Tensor) -> torch.Tensor:
    """The embedding's input gradient of the micro-batch's distinct rows, ``[rows, hidden]`` in ``dx``'s dtype: each
    row's tokens summed in FP32 (on CUDA), in a fixed order, then rounded once. It is ``aten.embedding_dense_backward``,
    the reference ``nn.Embedding``'s own backward kernel, over the compact row index (``MicroBatch.row_of``), so a
    tied weight's gradient is the head's part plus this sum, as autograd accumulates it. Why not ``index_add_``
    straight into the gradient: on CUDA it adds every token with an atomic in the gradient's dtype, in no fixed order,
    so a row's sum is not reproducible and in BF16 loses precision with the row's count (a token 400 times in a batch:
    ~2.4% off its FP32 sum, ~0.16% rounded once). One ``[rows, hidden]`` temporary from the caching allocator, as the
    reference's backward makes.

    On CUDA, up to ``_CUDA_CHUNKED_ROWS`` tokens take another kernel (``embedding_backward_feature_kernel``): it sums
    each 32-token chunk in FP32 but adds the chunks into the gradient in its own dtype, one rounding per chunk (a row
    repeated 320 times: 0.52% off the FP32 sum in BF16, measured on the H100). There the sums run on an FP32 copy of
    ``dx`` (at most 3,072 x hidden x 4 bytes, ~48 MiB at hidden 4,096) and are rounded once; above it the sorting
    kernel already sums in FP32."""
    if mb.rows is None or mb.row_of is None:
        raise RuntimeError("the embedding backward needs the micro-batch's rows: prepare_batch(rows=True)")
    if dx.is_cuda and dx.dtype != torch.float32 and dx.shape[0] <= _CUDA_CHUNKED_ROWS:
        sums = torch.ops.aten.embedding_dense_backward(dx.float(), mb.row_of, mb.rows.numel(), -1, False)
        return sums.to(dx.dtype)
    return torch.ops.aten.embedding_dense_backward(dx, mb.row_of, mb.rows.numel(), -1, False)


class StepRunner(ForwardPass):
    """Runs training steps for an ``Engine`` (holds no state of its own beyond per-step plans)."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.ops = engine.ops
        self.layer_segments = [[Segment(u, 0)] for u in engine.units[1:-1]]
        self.x0_releases: list[Future] = []
        # The step's device-side squared norms [streamed-or-all, resident] and add_squared_norm's scratch,
        # allocated once; zeroed per step and read in compute-stream order.
        # (Scalars: outside DeviceOps' byte accounting, which counts the engine's buffers.)
        self.sq = torch.zeros(2, dtype=torch.float32, device=self.ops.device)
        self.sq_dev, self.sq_res = self.sq[0], self.sq[1]
        self.norm_scratch = torch.zeros(2, dtype=torch.float32, device=self.ops.device)
        self.read_scalar = self.ops.scalar_reader()  # the main thread's loss reads: asleep, not spinning, until due
        # The host's copies of ``sq``, a step each in turn: step s's is read by its norm task on the optimizer thread,
        # which runs before the updates of step s + 1 that step s + 2's forward waits for, so before step s + 2 copies
        # into it again (grad_pipeline's ordering: nothing submitted after a task runs before it).
        self.sq_host = [torch.zeros(2, dtype=torch.float32, pin_memory=self.ops.pin) for _ in range(2)]
        self.sq_turn = 0
        self.open_releases: dict[int, Future] = {}
        """Release futures of the step's planned uses that the main thread still owns (not set, not handed to
        the gradient worker): a failed step fails them, so no upload waits for them forever."""
        # Views of each layer's slot, computed once: layer j always lives in slot j % window.
        # Streamed layers take the slots round-robin; resident layers (runtime/resident.py) have none.
        slots = engine.layer_pool.slots
        self.resident = engine.resident
        resident = set(engine.resident_idx)
        self.resident_units = {j + 1 for j in resident}
        streamed = [j for j in range(engine.num_layers) if j not in resident]
        self.layer_slot: dict[int, Slot] = {j: slots[k % len(slots)] for k, j in enumerate(streamed)}
        self.layer_views: dict[int, list[torch.Tensor]] = {
            j: s.views(self.layer_segments[j])[0] for j, s in self.layer_slot.items()}
        self.layer_grad_views = {j: s.views(self.layer_segments[j], grads=True)[0]
                                 for j, s in self.layer_slot.items()}
        if self.resident is not None:
            self.layer_views.update({j: self.resident.views[j + 1] for j in resident})
        # Deferred schedule: resident units' updates waiting for the step's clip coefficient, applied on
        # the device before the unit's next forward (or by flush): unit index -> (norm future, step, lr).
        self.resident_pending: dict[int, tuple[Future, int, float]] = {}
        head = engine.head_segments
        self.head_views = engine.vocab_slot.views(head)
        # The LM head's weight (the embedding's, when tied) inside the vocabulary slot; its gradient: HeadGrad.
        p = engine.parts
        w_seg = head[0] if p.tied else head[-1]
        w_spec = next(s for s in w_seg.unit.params if s.param is p.lm_head.weight)
        w_lo = w_seg.offset + w_spec.offset
        self.head_w = engine.vocab_slot.weight[w_lo:w_lo + w_spec.numel].view(w_spec.shape)
        self.hg = HeadGrad(engine, w_lo, w_spec.shape)
        # The input embedding's update in two parts (overlap schedule; runtime/embedding_split.py), or None.
        self.split = engine.embed_split

    def _schedule_update(self, unit: HostUnit, lr: float) -> UpdateSpec:
        unit.step += 1
        unit.version += 1
        return UpdateSpec(step=unit.step, lr=lr)

    # -- the step ----------------------------------------------------------------------------------
    def step(self, mbs: list[MicroBatch], deferred: bool, lr: float) -> tuple[float, Future, bool]:
        """Run one step; returns (loss, future of (grad norm, clip coefficient), skipped)."""
        e = self.e
        if deferred:
            acc_dtype = e.dtype if e.cfg.grad_accumulator == "compute" else torch.float32
            for u in e.units:
                if u.index not in self.resident_units:  # resident units accumulate on the device
                    u.ensure_grad_acc(acc_dtype)
        e.ensure_capacity(max(m.shape.numel() for m in mbs))
        self.open_releases.clear()  # the previous step's were all set or handed on
        try:
            return self._step(mbs, deferred, lr)
        except BaseException as exc:
            self.abort(exc)
            raise

    def _step(self, mbs: list[MicroBatch], deferred: bool, lr: float) -> tuple[float, Future, bool]:
        e = self.e
        total = sum(m.tokens for m in mbs)
        if e.dist is not None:
            # Data-parallel: the loss is the token-weighted mean over every rank's tokens (one big batch).
            total = int(e.dist.all_sum(total))
        # With one micro-batch the gradient norm is measured on the device as each unit's gradient is
        # produced; with several, the host measures the accumulated sum. Data-parallel runs measure each
        # rank's reduced shard (dist/shard.py) and sum over ranks. sq_res: the resident units' accumulated
        # squared norm when the host measures the others (several micro-batches).
        host_norm = len(mbs) > 1 or e.dist is not None
        if self.resident is not None:
            self.resident.join()  # (a no-op unless a failed step left resident updates unjoined)
        self.sq.zero_()  # compute stream: after the previous step's copy of it to the host
        losses = []
        for k, mb in enumerate(mbs):
            loss_k = self._micro(mb, 1.0 / total, deferred, k == 0, k == len(mbs) - 1, lr, host_norm)
            losses.append(loss_k)
            if loss_k is None:
                # A non-finite loss: nothing of this step was drained or scheduled; no update happens.
                skipped: Future = Future()
                skipped.set_result((math.nan, 1.0))
                return math.nan, skipped, True
        drain = e.drain
        # Bring the device-side squared norm to the host asynchronously, behind this step's backward only.
        # (Reading the device tensor from the optimizer thread would queue behind everything the main
        # thread issues meanwhile, i.e. the next forward, and stall the optimizer for that long.)
        sq_host = self.sq_host[self.sq_turn]
        self.sq_turn ^= 1
        self.ops.copy(sq_host, self.sq)
        sq_ready = self.ops.record(self.ops.compute_stream())
        drain.end_step()
        # Hand-off to the optimizer thread, after every gradient of the step: the norm and the clip coefficient.
        norm = drain.submit_task(clip_coefficient, drain, self.ops, e.units, self.resident_units,
                                 e.optim_cfg.max_grad_norm, host_norm, sq_host, sq_ready)
        if deferred:
            for u in e.units:
                spec = self._schedule_update(u, lr)
                if u.index in self.resident_units:
                    self.resident_pending[u.index] = (norm, spec.step, spec.lr)
                else:
                    u.update_future = drain.submit_task(drain.apply_accumulated, u, norm, spec.step, spec.lr)
        loss = self.read_scalar(torch.stack(losses).sum())
        if e.dist is not None:
            loss = e.dist.all_sum(loss)  # every rank's share of the global mean
        return loss, norm, False

    def _action(self, units: list[HostUnit], deferred: bool, first: bool, last: bool,
                lr: float, host_norm: bool) -> tuple[Accumulate | Update, bool]:
        if deferred:
            return Accumulate(first, last, host_norm), False
        return Update({u.index: self._schedule_update(u, lr) for u in units}), True

    def _drain(self, sources: list[tuple[HostUnit, torch.Tensor]], release: Future, deferred: bool,
               first: bool, last: bool, lr: float, host_norm: bool,
               action: Update | RowUpdate | None = None, background: frozenset[int] = frozenset(),
               ready: StagedReady | None = None) -> None:
        """Queue the download and consumption of ``sources``; ``action`` (overlap schedule) replaces the
        default one, an update of every source unit with a freshly scheduled step. ``ready``: the source is
        final in parts, each marked there with its norm already counted (``runtime/head_blocks.py``)."""
        if release is not None:
            self.open_releases.pop(id(release), None)  # the gradient worker sets it from now on
        units = [u for u, _ in sources]
        updates = action is not None
        if action is None:
            action, updates = self._action(units, deferred, first, last, lr, host_norm)
        if not host_norm and ready is None:
            for _, src in sources:
                add_squared_norm(self.sq_dev, src, self.norm_scratch)
        event = ready if ready is not None else self.ops.record(self.ops.compute_stream())
        futures = self.e.drain.submit_drain(sources, event, release, action, background)
        if updates:
            for u in units:
                u.update_future = futures[u.index]

    def _micro(self, mb: MicroBatch, scale: float, deferred: bool, first: bool, last: bool,
               lr: float, host_norm: bool) -> torch.Tensor | None:
        """One micro-batch; returns its scaled loss (a device scalar), or None if it was non-finite."""
        e, ops = self.e, self.ops
        p, L = e.parts, e.num_layers
        cs = ops.compute_stream()
        u0 = e.units[0]
        bsz, seq = mb.shape
        hidden = e.hidden
        shape = torch.Size((bsz, seq, hidden))

        split = not deferred and not host_norm and self.split is not None
        blocked = split and e.head_blocks > 0  # (resolved only for a tied embedding with the split: build.py)
        if not blocked and e.vocab_ring is not None:
            self.hg.grow(self.ops)  # this step needs the whole matrix's gradient on the device
        # Plan every slot use in program order (this queues the uploads), then run them.
        x0_src, x0_release, fwd, head = self._plan_forward(mb)
        up_layer, up_vocab = self._submit_upload(e.layer_up), self._submit_upload(e.vocab_up)
        bwd = {j: plan_use(self.layer_slot[j], self.layer_segments[j], True, up_layer)
               for j in reversed(range(L)) if j in self.layer_slot}
        emb_use = plan_use(e.vocab_slot, [Segment(u0, 0)], False, up_vocab)
        for f in (emb_use.release, *(u.release for u in bwd.values())):
            self.open_releases[id(f)] = f
        x0, h0, calls = self._embed(mb, x0_src, grad=True)
        h = self._forward_layers(fwd, h0.detach(), calls, save=True)

        # Head: final norm + chunked linear cross-entropy, gradients in the same pass.
        self._begin(head, True, "head")
        self._bind_segments(e.head_segments, self.head_views)
        h_last = h.detach().requires_grad_(True)
        with torch.enable_grad():
            xn = p.norm(h_last)
        if blocked:  # the loss pass now, the gradient a vocabulary block at a time below (runtime/head_blocks.py)
            vh = VocabBlockedHead(xn.detach().reshape(-1, hidden), self.head_w, mb.targets, block_rows=e.head_blocks,
                                  kernels=e.head_ce is not None)
            loss = vh.loss(scale)
        else:
            loss, dxn = linear_cross_entropy(xn.detach().reshape(-1, hidden), self.head_w, mb.targets, scale,
                                             self.hg.gw, e.loss_chunk_tokens, p.logit_softcap, e.head_ce)
        if e.cfg.skip_nonfinite and self._nonfinite(loss):
            # Nothing has been drained yet: hand every planned use back and leave the weights alone.
            done = ops.record(cs)
            for use in [head, *bwd.values(), emb_use]:
                use.release.set_result(done)
            x0_release.set_result([done, ops.record(e.acts.stream)])
            return None
        job = self.split.job(mb.rows_host, self._schedule_update(u0, lr)) if split else None
        if blocked:
            ring = e.vocab_ring if e.vocab_ring is not None else self.hg.whole_ring
            ready = StagedReady(ring)
            self._drain([(u0, ring.buf)], None, deferred, first, last, lr, host_norm,
                        Update({u0.index: job.spec}, apply={u0.index: partial(self.split.early, job)}),
                        background=frozenset({u0.index}), ready=ready)
            dxn = head_blocks.backward_in_blocks(vh, scale, ops=ops, split=self.split, ring=ring, numel=u0.padded,
                                                 rows=mb.rows, rows_host=mb.rows_host, sq=self.sq_dev,
                                                 scratch=self.norm_scratch, ready=ready)
        norm_params = list(p.norm.parameters())
        grads = torch.autograd.grad(xn, [h_last, *norm_params], dxn.view_as(xn))
        dh = grads[0]
        uh = e.units[-1]
        for view, g in zip(self.hg.uh_views, self._head_grads(uh, norm_params, grads[1:])):
            if g is not None:
                view.copy_(g)
        head_src = [(uh, self.hg.uh)]
        if job is not None and p.tied and not blocked:
            # The rows outside the batch have their whole gradient now (the head's): update them during backward.
            self.split.take_head_rows(self.hg.gw, mb.rows)
            self._drain([(u0, e.vocab_slot.grad[:u0.padded]), *head_src], head.release, deferred, first, last, lr,
                        host_norm, Update({u0.index: job.spec, uh.index: self._schedule_update(uh, lr)},
                                          apply={u0.index: partial(self.split.early, job)}),
                        background=frozenset({u0.index}))
        else:  # (the blocked head's matrix was drained above, a block at a time)
            self._drain(head_src, head.release, deferred, first, last, lr, host_norm)
            if job is not None and not p.tied:  # untied: the rows outside the batch have a zero gradient, no download
                e.drain.submit_background(u0, self.split.early_zero, job)

        # Backward through the layers, last to first.
        for j in reversed(range(L)):
            use = bwd.get(j)
            if use is not None:
                self._begin(use, True, f"layer {j} backward")
            unit = e.units[j + 1]
            if j + 1 in self.resident_units:
                self.resident.stage(j + 1)  # cast weights: the master the forward used (updated after this)
            self._bind(unit, self.layer_views[j])
            e.acts.prefetch(j - 1, shape)
            x = e.acts.get(j, shape, cs).detach().requires_grad_(True)
            params = [s.param for s in unit.params]
            with torch.enable_grad():
                out = run_layer(p.layers[j], x, calls[j])
            grads = torch.autograd.grad(out, [x, *params], dh)
            e.acts.release(j, cs)
            dh = grads[0]
            if use is None:
                # A resident layer: AdamW on the device, in stream order after its backward; or, deferred,
                # accumulation on the device (its norm joins the step's on the last micro-batch).
                if deferred:
                    sq = (self.sq_res if host_norm else self.sq_dev) if last else None
                    self.resident.accumulate(unit, list(grads[1:]), first, last, sq)
                else:
                    # (data-parallel, host_norm: sq_res, added after the cross-rank sum of the sharded part)
                    self.resident.update(unit, list(grads[1:]), lr, self.sq_res if host_norm else self.sq_dev)
                    if self.resident.aliased:
                        e.vocab_slot.content = None  # its weights were the update's scratch: upload them again
                continue
            torch._foreach_copy_(self.layer_grad_views[j], list(grads[1:]))
            self._drain([(unit, use.slot.grad[:unit.padded])], use.release, deferred, first, last, lr, host_norm)

        if self.resident is not None:
            # Before the embedding backward, whose release the vocab slot's next upload waits for (the resident
            # updates' scratch may be its weights), and before anything reads the step's norm or a master.
            self.resident.join()
        # Embedding backward: scatter the rows' gradients into the vocab slot's gradient buffer.
        self._begin(emb_use, True, "embedding backward")
        if h0 is not x0 and h0.requires_grad:
            (dx0,) = torch.autograd.grad(h0, x0, dh)
        else:
            dx0 = dh
        dx = dx0.reshape(-1, hidden)
        pad = p.embed.padding_idx
        if pad is not None:
            dx = dx.masked_fill((mb.ids.view(-1) == pad).unsqueeze(1), 0)
        if job is not None:
            self._embed_rows_backward(job, mb, dx, emb_use.release)
        else:
            gw = e.vocab_slot.grad[:u0.numel].view(e.vocab, hidden)
            sums = rows_grad(mb, dx)
            if p.tied:  # one add per batch row onto the head's part (the rows are distinct: no two adds race)
                gw.index_add_(0, mb.rows, sums)
            else:
                gw.zero_()
                gw.index_copy_(0, mb.rows, sums)
            self._drain([(u0, e.vocab_slot.grad[:u0.padded])], emb_use.release, deferred, first, last, lr,
                        host_norm)
        # The next gather may overwrite x0 once compute and the activation copies are done with it.
        x0_release.set_result([ops.record(cs), ops.record(e.acts.stream)])
        return loss

    def _embed_rows_backward(self, job: RowsJob, mb: MicroBatch, dx: torch.Tensor, release: Future) -> None:
        """Split embedding update: the batch rows' gradient, summed into the compact buffer (which holds the
        head's part of them when tied), goes to the rows' update; the rest of the matrix was updated early."""
        g = self.split.grad_rows(job.rows.numel())
        sums = rows_grad(mb, dx)
        if self.e.parts.tied:
            g.add_(sums)  # onto the head's part of these rows (take_head_rows)
        else:
            g.copy_(sums)
        u0 = self.e.units[0]
        self._drain([(u0, g.view(-1))], release, False, True, True, job.spec.lr, False, RowUpdate(job, self.split))

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether the step must be skipped: this rank's loss is NaN/inf, or (data-parallel) any rank's is."""
        bad = not math.isfinite(self.read_scalar(loss))
        return bad if self.e.dist is None else self.e.dist.any(bad)  # all ranks skip together

    @staticmethod
    def _head_grads(uh: HostUnit, norm_params: list[torch.nn.Parameter],
                    grads: tuple[torch.Tensor, ...]) -> list[torch.Tensor | None]:
        by_param = {id(q): g for q, g in zip(norm_params, grads)}
        return [by_param.get(id(s.param)) for s in uh.params]
