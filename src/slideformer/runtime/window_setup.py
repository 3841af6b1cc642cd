"""The device window and the workers around an engine's initialised host units.

Owns what ``Engine`` builds once its FP32 masters are filled: the resident layers (their count resolved,
``resident_layers=-1``), the layer slots and the vocabulary slot, the BF16 upload copies, the ``offload='all'``
masters start-up did not already write to the disk store (``build`` opens the store), the upload and gradient
workers, the activation store, the optimizer's thread count, and the step runner. Invariant: it runs once per
engine, after ``build.init_weights`` and before the first step; every page-locked buffer it makes is released
by ``Engine.close``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from slideformer.kernels.vocab_head import VocabBlockedHead
from slideformer.memory.activations import ActivationStore
from slideformer.memory.activations_disk import open_activation_store
from slideformer.memory.host_state import attach_upload_copies
from slideformer.models.loading import buffers_on
from slideformer.optim.adamw import FlatAdamW
from slideformer.runtime import build
from slideformer.runtime.embedding_split import EmbeddingSplit
from slideformer.runtime.grad_pipeline import GradPipeline
from slideformer.runtime.head_blocks import HeadGradRing
from slideformer.runtime.resident import ResidentLayers, pick_resident, scratch_fits
from slideformer.runtime.step import StepRunner
from slideformer.runtime.transfer import Uploader
from slideformer.runtime.window import Segment, Slot, SlotPool

if TYPE_CHECKING:
    from slideformer.runtime.engine import Engine

logger = logging.getLogger("slideformer.runtime.engine")


def setup_device(e: Engine) -> None:
    """Build ``e``'s device window, workers and step runner (see the module docstring)."""
    p, ops = e.parts, e.ops
    buffers_on(p, e.device)
    e.num_layers = len(p.layers)
    e.hidden = int(p.embed.weight.shape[1])
    e.vocab = int(p.embed.weight.shape[0])
    chunk = build.chunk_elems(e)
    count, cast = ((e.cfg.resident_layers, e.cfg.resident_weights == "cast") if e.cfg.resident_layers >= 0
                   else build.resident_auto(e))
    if e.dist is not None and e.cfg.resident_layers != 0:
        count = e.dist.resident_count(count)  # every rank keeps the same layers (and issues the same sums)
    if e.offload_mode != "none" and count > 0:  # -1 with the disk tier: resident layers cannot be used
        logger.info("engine.resident_layers=-1: 0 (the disk tier, engine.offload=%s, keeps no state on the "
                    "device)", e.offload_mode)
        count = 0
    e.resident_idx = pick_resident(e.num_layers, count, e.cfg.resident_placement)
    streamed = [u for j, u in enumerate(e.units[1:-1]) if j not in set(e.resident_idx)]
    u0, uh = e.units[0], e.units[-1]
    e.head_segments = [Segment(u0, 0), Segment(uh, u0.padded)] if p.tied else [Segment(uh, 0)]
    vocab_numel = max(sum(s.unit.padded for s in e.head_segments), u0.padded)
    vocab_weight = ops.empty(vocab_numel, e.dtype)  # (its gradient buffer is sized once the head is known, below)
    resident_units = [e.units[j + 1] for j in e.resident_idx]
    idle = vocab_weight  # idle during the layers' backward (runtime/resident.py)
    fits = resident_units and scratch_fits(idle.numel() * idle.element_size(), max(u.numel for u in resident_units))
    e.resident = (ResidentLayers(ops, resident_units, e.dtype, e.optim_cfg, cast=cast,
                                 idle_scratch=idle if fits else None,
                                 **(e.dist.resident_ops() if e.dist is not None else {}))
                  if resident_units else None)
    depth = min(e.cfg.window, len(streamed))
    # Slots hold a unit's padded layout (= numel unless data-parallel sharding pads it).
    e.layer_pool = SlotPool(ops, depth, max((u.padded for u in streamed), default=0), e.dtype)
    e.adam = FlatAdamW(e.optim_cfg)
    if e.host_copy:  # every uploaded unit (an untied embedding is only gathered): before page-locking
        attach_upload_copies([s.unit for s in e.head_segments]
                             + [u for u in streamed if e.offload is None or u.index not in e.offload.masters],
                             ops.host_empty_exact, e.dtype)
    if e.offload is not None:  # (opened by build.init_weights, before the weights were filled)
        # 'all': each streamed layer whose master start-up did not write already (a model given in RAM) gets its
        # upload copy, then its master goes to disk and its RAM is freed, one layer after the other.
        e.offload.store_masters(torch.zeros(1), e.cfg.watchdog_s,
                                lambda u: attach_upload_copies([u], ops.host_empty_exact, e.dtype))
    e.layer_up = Uploader(ops, "sf-upload", chunk, e.cfg.staging_chunks, e.dtype)
    e.vocab_up = Uploader(ops, "sf-upload-vocab", chunk, 2, e.dtype)
    if build.register_masters(e):
        e.layer_up.enable_device_cast()
        e.vocab_up.enable_device_cast()
    elem = torch.tensor([], dtype=e.dtype).element_size()
    pool = (max(e.cfg.staging_chunks, e.cfg.grad_park_mib * 2**20 // (chunk * elem)) if ops.is_cuda
            else 2 * e.cfg.staging_chunks)
    if e.dist is None:
        e.drain = GradPipeline(ops, chunk, pool, e.dtype, e.adam, e.offload)
    else:
        e.drain = e.dist.grad_pipeline(ops, chunk, pool, e.dtype, e.adam)
        e.dist.attach_uploaders(e.layer_up, e.vocab_up)
    if e.cfg.offload_activations:  # checkpoints on disk, in the moments' store when that tier is on
        e.acts = open_activation_store(e.cfg, ops, e.num_layers, e.hidden, e.dtype,
                                       e.offload.store if e.offload is not None else None, e.dist)
    else:
        e.acts = ActivationStore(ops, e.num_layers, e.hidden, e.dtype)
    e.x0_capacity = 0
    # The input embedding's update in two parts (runtime/embedding_split.py): one process, moments in RAM.
    split = len(u0.params) == 1 and EmbeddingSplit.used(
        e.cfg.embedding_update, tied=p.tied, hidden=e.hidden, chunk=chunk, single_process=e.dist is None,
        in_ram=e.offload is None, tied_split=build.tied_split_pays(e, p.tied))
    e.embed_split = EmbeddingSplit(ops, u0, e.vocab, e.hidden, e.dtype, e.adam, chunk) if split else None
    e.head_blocks = build.head_blocks(e, p.tied, split)
    e.park_hint = build.park_hint(e)
    if e.park_hint:
        logger.info("hint: %s", e.park_hint)
    # The vocabulary slot's gradient: the blocked head writes the tied matrix's a few blocks at a time into a ring
    # (runtime/head_blocks.py) where no step can take another path (clipping or the deferred schedule use the whole
    # matrix; a step that does anyway gets the whole buffer then: StepRunner.whole_vocab_grad), else the whole.
    ring = (e.head_blocks > 0 and e.cfg.schedule != "deferred" and e.optim_cfg.max_grad_norm is None
            and u0.padded == u0.numel)
    ring_numel = VocabBlockedHead.grad_ring_rows(e.vocab, e.head_blocks) * e.hidden if ring else 0
    e.vocab_slot = Slot(0, vocab_weight, ops.empty(ring_numel + uh.padded if ring else vocab_numel, e.dtype))
    e.vocab_ring = (HeadGradRing(e.vocab_slot.grad[:ring_numel], e.vocab, e.hidden, e.head_blocks) if ring
                    else None)
    threads = e.cfg.optimizer_threads or (e.dist.cpu_threads() if e.dist is not None else 0)
    if threads > 0:
        torch.set_num_threads(threads)  # the C++ AdamW and the torch fallback both size to this pool
    if e.cfg.max_tokens_per_micro_batch:
        e.ensure_capacity(e.cfg.max_tokens_per_micro_batch)
    e.runner = StepRunner(e)
