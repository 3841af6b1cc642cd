"""The forward side of a step over the sliding window, shared by training and evaluation.

Owns the embedding (the gathered rows on the device and the adapter's preamble), every decoder layer's forward in its
slot or resident (checkpointing each input when training; a resident layer's deferred update first), and the
forward-only pass of evaluation through the same slots, uploads and kernels. A base of ``StepRunner``
(``runtime/step.py``), which sets the attributes below.

Invariant: a layer's slot is released right after its forward compute is queued, and only then.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from slideformer.kernels.reference import linear_cross_entropy
from slideformer.models import run_layer
from slideformer.runtime.batch import MicroBatch
from slideformer.runtime.slot_uses import SlotUses
from slideformer.runtime.window import Use

if TYPE_CHECKING:
    from slideformer.runtime.resident import ResidentLayers


class ForwardPass(SlotUses):
    """Embedding, layer forwards and the evaluation pass (a base class: ``StepRunner`` sets the attributes)."""

    resident: ResidentLayers | None
    resident_units: set[int]
    resident_pending: dict[int, tuple[Future, int, float]]
    layer_views: dict[int, list[torch.Tensor]]
    head_views: list[list[torch.Tensor]]
    head_w: torch.Tensor
    _scale_t: torch.Tensor | None = None

    def _embed(self, mb: MicroBatch, x0_src: Future | Use, grad: bool) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
        """The gathered embedding rows on the device, and the preamble: (x0, first layer input, layer calls)."""
        e, p = self.e, self.e.parts
        shape = torch.Size((*mb.shape, e.hidden))
        cs = self.ops.compute_stream()
        if isinstance(x0_src, Use):  # sharded embedding: select the rows from the all-gathered matrix
            self._begin(x0_src, False, "embedding forward")
            u0 = e.units[0]
            weight = e.vocab_slot.weight[:u0.numel].view(e.vocab, e.hidden)
            torch.index_select(weight, 0, mb.ids.view(-1), out=e.x0_dev[:shape.numel()].view(-1, e.hidden))
            x0_src.release.set_result(self.ops.record(cs))  # the slot may take the head once the rows are out
        else:
            self.ops.wait(cs, self.wait(x0_src, "embedding gather"))  # x0's copy landed
        x0 = e.x0_dev[:shape.numel()].view(shape).detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            emb = x0 if p.embed_scale is None else x0 * self._embed_scale(p.embed_scale, x0)
            h0, calls = e.adapter.layer_calls(p, emb, mb.attention_mask, mb.position_ids)
        return x0, h0, calls

    def _embed_scale(self, scale: float, like: torch.Tensor) -> torch.Tensor:
        """The embedding scale (Gemma's) as a tensor of the embeddings' dtype, as HF rounds it, made once: a fresh
        one per micro-batch was an allocation and a pageable copy to the device in the forward."""
        t = self._scale_t
        if t is None or t.dtype != like.dtype or t.device != like.device:
            t = self._scale_t = torch.tensor(scale, dtype=like.dtype, device=like.device)
        return t

    def _forward_layers(self, fwd: dict[int, Use], h: torch.Tensor, calls: list[Any], save: bool) -> torch.Tensor:
        """Every decoder layer's forward (no autograd); with ``save``, each input is checkpointed."""
        e, ops = self.e, self.ops
        cs = ops.compute_stream()
        with torch.no_grad():
            for j in range(e.num_layers):
                use = fwd.get(j)
                if use is not None:
                    self._begin(use, False, f"layer {j} forward")
                elif j + 1 in self.resident_pending:
                    self.apply_resident_update(j + 1)
                if j + 1 in self.resident_units:
                    self.resident.stage(j + 1)  # cast weights: from the (updated) master, in stream order
                self._bind(e.units[j + 1], self.layer_views[j])
                if save:
                    e.acts.save(j, h, cs)
                h = run_layer(e.parts.layers[j], h, calls[j])
                if use is not None:
                    use.release.set_result(ops.record(cs))  # the slot is free once this compute is done
        return h

    def apply_resident_update(self, index: int) -> None:
        """Run a resident unit's deferred update (AdamW on the device, clipped) once the step's norm is known."""
        norm_fut, step, lr = self.resident_pending.pop(index)
        # The clip coefficient comes from the optimizer thread once every gradient of the step was consumed.
        _, coef = self.wait(norm_fut, "the step's gradient norm, before a resident layer's deferred update")
        self.resident.apply_accumulated(self.e.units[index], step, lr, coef)

    def eval_micro(self, mb: MicroBatch) -> torch.Tensor:
        """Forward-only pass of one micro-batch through the window; returns the summed token loss.

        Same slots, uploads and kernels as training (so the same numbers as ``train_step``'s loss), but
        no checkpoints, no backward and no gradients; uploads still wait for pending updates.
        """
        e, ops = self.e, self.ops
        x0_src, x0_release, fwd, head = self._plan_forward(mb)
        _, h0, calls = self._embed(mb, x0_src, grad=False)
        h = self._forward_layers(fwd, h0, calls, save=False)
        with torch.no_grad():
            self._begin(head, False, "head (eval)")
            self._bind_segments(e.head_segments, self.head_views)
            xn = e.parts.norm(h)
            loss, _ = linear_cross_entropy(xn.reshape(-1, e.hidden), self.head_w, mb.targets, 1.0, None,
                                           e.loss_chunk_tokens, e.parts.logit_softcap, e.head_ce)
        done = ops.record(ops.compute_stream())
        head.release.set_result(done)
        x0_release.set_result(done)
        return loss
