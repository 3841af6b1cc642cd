"""Engine construction: the host units, the host-memory decision, the initial weights, page-locking.

Owns what ``Engine.__init__`` does before the device window exists: splitting the model's parameters
into units, choosing where the moments live and checking the host-RAM budget (planner terms), opening the
disk tier's store, filling the
FP32 masters (copy, streamed load or random init; one unit at a time where each is then sharded, for
data-parallel runs, or written to the disk tier, ``offload='all'``), the
resident-layer count for ``resident_layers=-1``, and page-locking the masters that uploads read.
Invariant: nothing here allocates on the device; every host buffer it page-locks is unregistered by
``unregister_all`` (a finalizer set here, or ``Engine.close``).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slideformer.errors import ConfigError
from slideformer.memory.host_state import HostUnit, build_units
from slideformer.runtime.device import DeviceOps

if TYPE_CHECKING:
    from slideformer.plan_types import Plan
    from slideformer.runtime.engine import Engine

logger = logging.getLogger("slideformer.runtime.engine")


def unregister_all(ops: DeviceOps, tensors: list[torch.Tensor]) -> None:
    """Undo the page-locking of ``tensors`` (before their memory is freed)."""
    for t in tensors:
        ops.unregister_host(t)
    tensors.clear()


def make_units(e: Engine, model: nn.Module) -> list[HostUnit]:
    names = {id(p): n for n, p in model.named_parameters()}
    p = e.parts

    def named(mod: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(names[id(q)], q) for q in mod.parameters()]

    head = named(p.norm) + ([] if p.tied else named(p.lm_head))
    return build_units(named(p.embed), [named(layer) for layer in p.layers], head)


def check_host_memory(e: Engine) -> str:
    """Pick where the optimizer state lives ('auto': disk only when RAM is short) and fail before allocating when
    the host buffers cannot fit in the budget (``host_memory_gib``, default the available RAM)."""
    import psutil

    from slideformer.memory.budget import check_host_memory, choose_host_copy, choose_offload, engine_host_bytes

    u0, uh = e.units[0].numel, e.units[-1].numel
    vocab_slot = u0 + uh if e.parts.tied else max(u0, uh)
    elt = torch.tensor([], dtype=e.dtype).element_size()
    budget = (int(e.cfg.host_memory_gib * 2**30) if e.cfg.host_memory_gib
              else int(psutil.virtual_memory().available))
    # Data-parallel ranks of one node hold the node's share of the sharded state between them.
    params = e.num_params if e.dist is None else e.dist.node_params(e.num_params)

    def need(mode: str, copy: bool = e.cfg.host_copy == "bf16") -> dict[str, int]:
        return engine_host_bytes(params, [u.numel for u in e.units[1:-1]], vocab_slot, e.cfg,
                                 e.ops.is_cuda, elt, offload=mode,
                                 largest_unit=max(u.numel for u in e.units), host_copy=copy)

    # 'auto' may put the masters on disk too only where uploads can read a BF16 copy instead.
    allow_all = e.cfg.host_copy != "none" and e.dtype == torch.bfloat16 and e.dist is None
    mode = choose_offload(e.cfg, need, budget, allow_all)
    if mode != "none" and e.dist is not None:
        raise ConfigError("the disk tier (engine.offload) is not supported with data-parallel training yet: "
                          "set engine.offload=none (each rank already keeps only 1/N of the moments)")
    if mode != "none" and e.cfg.resident_layers > 0:
        raise ConfigError("engine.resident_layers keeps those layers' state on the device; it cannot be combined "
                          f"with the disk tier (engine.offload={mode}): set one of them to 0/'none'")
    e.host_copy, why = choose_host_copy(e.cfg, lambda c: need(mode, c), budget, e.ops.is_cuda,
                                        e.dtype, mode)
    if e.cfg.host_copy == "auto" or mode == "all":
        logger.info("engine.host_copy=%s: %s: %s", e.cfg.host_copy, "on" if e.host_copy else "off", why)
    if e.cfg.check_host_memory:
        check_host_memory(need(mode, e.host_copy), budget,
                          f"{e.model_type} with {e.num_params / 1e6:,.1f}M params")
    return mode


def chunk_elems(e: Engine) -> int:
    """Elements of the compute dtype per transfer chunk (``engine.chunk_mib``)."""
    return max(1, int(e.cfg.chunk_mib * 2**20) // torch.tensor([], dtype=e.dtype).element_size())


def init_weights(e: Engine, model: nn.Module, init: str, weights: Any) -> None:
    if e.host_copy:  # the copies are page-locked as they are made: unregistered by close(), even mid-start-up
        e._release_copies = weakref.finalize(e, unregister_all, e.ops, e.ops.exact_pinned)
    if e.offload_mode != "none":
        _open_disk_tier(e)
    if e.dist is not None and init in ("random", "load"):
        _init_streamed(e, model, init, weights, lambda u: u.allocate(with_grad_acc=False, master_only=True),
                       e.dist.shard_unit)
        e.dist.sharding_done(e.units, e.cfg)
        return
    if e.offload_mode == "all" and init in ("random", "load"):
        _init_masters_to_disk(e, model, init, weights)
        return
    for u in e.units:
        if e.dist is None:  # (offload 'all': the masters go to disk once initialised, window_setup.setup_device)
            u.allocate(with_grad_acc=False, moments_on_disk=e.offload_mode in ("moments", "all"))
        else:  # data-parallel: the full FP32 master only (4 B/param) while initialising, sharded below
            u.allocate(with_grad_acc=False, master_only=True)
    materialize_meta(e, model)
    for u in e.units:
        if init == "copy":
            for spec in u.params:
                if spec.param.device.type == "meta":
                    raise ConfigError("the model is on the meta device: use Engine.from_pretrained / from_config")
                u.view(u.master, spec).copy_(spec.param.data)
        u.point_params_to_master()
    if init == "load":
        weights.load_into(e.units)
    elif init == "random":
        from slideformer.models.loading import random_init

        random_init(model, e.units)
    elif init != "copy":
        raise ConfigError(f"unknown init {init!r}")
    if e.dist is not None:
        e.dist.shard_units(e.units, e.cfg)


def _init_masters_to_disk(e: Engine, model: nn.Module, init: str, weights: Any) -> None:
    """``engine.offload='all'``: each decoder layer's master goes to its offload file (after its BF16 upload
    copy is built from it) as soon as its initial weights are complete, so start-up holds the embedding and
    head masters plus the layers being filled, never the whole FP32 model (4 B/param)."""
    from slideformer.memory.host_state import attach_upload_copies

    ops = e.ops
    placeholder = torch.zeros(1)

    def done(u: HostUnit) -> None:
        if u.index in e.offload.masters:
            e.offload.store_master(u, placeholder, e.cfg.watchdog_s,
                                   lambda v: attach_upload_copies([v], ops.host_empty_exact, e.dtype))

    _init_streamed(e, model, init, weights, lambda u: u.allocate(with_grad_acc=False, moments_on_disk=True), done)


def _open_disk_tier(e: Engine) -> None:
    """The offload store (directory claimed, space checked, speed probed) before any weight is filled; with
    ``offload='all'`` every decoder layer's master goes there too (the disk tier keeps no layer resident)."""
    from slideformer.memory.offload import open_offload

    masters = frozenset(u.index for u in e.units[1:-1]) if e.offload_mode == "all" else frozenset()
    e.offload = open_offload(e.cfg, e.units, e.device, chunk_elems(e), masters)


def _init_streamed(e: Engine, model: nn.Module, init: str, weights: Any, allocate: Callable[[HostUnit], None],
                   done: Callable[[HostUnit], None]) -> None:
    """Fill one unit at a time: ``allocate(unit)`` when its first tensor is due, ``done(unit)`` after its last
    (data-parallel: keep this rank's shard; ``offload='all'``: write a layer's master to disk).

    A unit's full master (4 B/param) exists from its first write to ``done``. Random init visits the model's
    modules in the single-process order (the same RNG draws, so the result equals filling every unit first);
    loading finishes a unit once all its tensors are in, whatever the shard order.
    """
    def open_unit(u: HostUnit) -> None:
        if u.flat is None and not u.master_on_disk:
            allocate(u)
            materialize_meta(e, model, [u])
            u.point_params_to_master()

    if init == "load":
        weights.load_into(e.units, prepare=open_unit, done=done)
    else:
        from slideformer.models.loading import init_modules

        owner = {id(spec.param): u for u in e.units for spec in u.params}
        mods = init_modules(model, set(owner))
        # The units each module writes, fixed now: opening a unit replaces its meta parameters (new ids).
        touches = [list({owner[id(q)].index: owner[id(q)] for q in m.parameters(recurse=False)}.values())
                   for m in mods]
        closes_at: dict[int, list[HostUnit]] = {}
        for u in e.units:
            k = max((k for k, us in enumerate(touches) if u in us), default=-1)
            closes_at.setdefault(k, []).append(u)
        for u in closes_at.pop(-1, []):  # no initialiser touches it: zero-filled
            open_unit(u)
            u.master.zero_()
            done(u)
        init_fn = model._init_weights
        with torch.no_grad():
            for k, m in enumerate(mods):
                for u in touches[k]:
                    open_unit(u)
                init_fn(m)
                for u in closes_at.get(k, []):
                    done(u)


def materialize_meta(e: Engine, model: nn.Module, units: list[HostUnit] | None = None) -> None:
    """Replace meta parameters by real ones that alias the host master buffers (ties preserved)."""
    fresh: dict[int, nn.Parameter] = {}
    for u in e.units if units is None else units:
        for spec in u.params:
            if spec.param.device.type == "meta":
                new = nn.Parameter(u.view(u.master, spec), requires_grad=spec.param.requires_grad)
                fresh[id(spec.param)] = new
                spec.param = new
    if not fresh:
        return
    for module in model.modules():
        for name, q in list(module._parameters.items()):
            if q is not None and id(q) in fresh:
                module._parameters[name] = fresh[id(q)]


def resident_auto(e: Engine) -> tuple[int, bool]:
    """``resident_layers=-1``: as many layers as the GPU budget holds next to the streaming buffers, and
    whether their weights are cast on use (``engine.resident_weights``)."""
    from slideformer.placement import engine_resident_count

    count, cast, e.resident_reason, e.resident_head = engine_resident_count(
        e.hf_config, e.cfg, e.device if e.ops.is_cuda else None,
        clipping=e.optim_cfg.max_grad_norm is not None)
    logger.info("engine.resident_layers=-1: %s", e.resident_reason)
    return count, cast


def _run_plan(e: Engine, tokens: int, host_memory_bytes: int = 1 << 50) -> Plan:
    """The planner's plan of this engine's run: its resident layers and weights, BF16 copy and micro-batches of
    ``tokens`` tokens, on a GPU with room for them (its step model, not its memory check, is what is asked)."""
    from dataclasses import replace

    from slideformer.planner import Hardware, make_plan

    cast = e.resident is not None and e.resident.cast
    # (the head schedule too, where resident_layers=-1 counted the layers with the blocked head)
    cfg = replace(e.cfg, device="cuda", resident_layers=len(e.resident_idx),
                  resident_weights="cast" if cast else "keep", host_copy="bf16" if e.host_copy else "none",
                  offload="none", head_schedule="vocab" if e.resident_head == "vocab" else e.cfg.head_schedule)
    return make_plan(e.hf_config, seq_len=tokens, batch_size=1, grad_accum=1,
                     clipping=e.optim_cfg.max_grad_norm is not None, engine=cfg,
                     hardware=Hardware(gpu_memory_bytes=1 << 50, host_memory_bytes=host_memory_bytes))


def park_hint(e: Engine) -> str:
    """The plan's note when this run's backward would outrun the host's AdamW by more than the gradient parking pool
    holds (``planner._park_note``: the ``engine.grad_park_mib`` that lets the backward run ahead, and whether this
    host's RAM has room for it), for the run's log; empty where it has none, and without a GPU, a known micro-batch
    size, the overlap schedule or the masters in RAM, or with data-parallel ranks (the plan models one process).
    Advice only: a larger pool is pinned host RAM beyond the default engine's budget (target 4 of issue 3)."""
    import psutil

    tokens = e.cfg.max_tokens_per_micro_batch
    if not (e.ops.is_cuda and tokens and e.cfg.schedule != "deferred" and e.offload is None and e.dist is None):
        return ""
    plan = _run_plan(e, tokens, host_memory_bytes=int(psutil.virtual_memory().total))
    mib = plan.settings["grad_park_mib_hint"]
    return next((n for n in plan.notes if f"engine.grad_park_mib={mib} " in n), "") if mib else ""


def tied_split_pays(e: Engine, tied: bool) -> bool:
    """``embedding_update='auto'`` for a tied embedding: split where the planner's step model predicts it pays
    for this run (its resident layers and weights, the micro-batch of ``max_tokens_per_micro_batch``); whole
    without a GPU or a known micro-batch size."""
    tokens = e.cfg.max_tokens_per_micro_batch
    if not (tied and e.ops.is_cuda and tokens and e.cfg.embedding_update == "auto"):
        return False
    return _run_plan(e, tokens).settings["embedding_update"] == "split"


def head_blocks(e: Engine, tied: bool, split: bool) -> int:
    """Rows per vocabulary block of the head (``engine.head_schedule``, ``kernels/vocab_head.py``), or 0 for the
    one-pass head: only for a tied embedding with the split update (which consumes the blocks) and a head that does
    not soft-cap its logits; 'auto' where the planner predicts a host-bound step on the GPU with the fused loss
    kernel (``plan_time.pick_head_schedule``), for micro-batches of ``max_tokens_per_micro_batch`` (unknown: one
    pass), or where ``resident_layers=-1`` counted its layers with the blocked head (``placement.resident_choice``:
    its gradient ring made room for them)."""
    from slideformer.kernels.vocab_head import BLOCKS, VocabBlockedHead

    choice = e.cfg.head_schedule
    if choice == "tokens" or not (tied and split):
        return 0
    if e.parts.logit_softcap is not None:
        logger.info("engine.head_schedule=%s: one pass (the head soft-caps its logits)", choice)
        return 0
    if choice == "auto":
        tokens = e.cfg.max_tokens_per_micro_batch
        if not (e.ops.is_cuda and e.head_ce is not None and tokens):
            return 0
        if _run_plan(e, tokens).settings["head_schedule"] != "vocab":
            return 0
    return VocabBlockedHead.block_rows_for(e.vocab, BLOCKS)


def register_masters(e: Engine) -> bool:
    """Page-lock the FP32 master weights in place when uploads are to be cast on the device."""
    mode = e.cfg.upload_cast
    if mode == "host" or not e.ops.is_cuda:
        if mode == "device" and not e.ops.is_cuda:
            raise ConfigError("engine.upload_cast='device' needs a CUDA device")
        return False
    not_uploaded = {j + 1 for j in e.resident_idx}  # resident layers live on the GPU (runtime/resident.py)
    u0 = e.units[0]
    if not u0.sharded and all(s.unit is not u0 for s in e.head_segments):
        not_uploaded.add(u0.index)  # an untied, unsharded embedding: its rows are gathered on the host
    for u in e.units:
        if u.index in not_uploaded or u.upload_copy is not None:
            continue  # never uploaded, or uploaded from its BF16 copy (engine.host_copy)
        if not e.ops.register_host(u.master):
            if mode == "device":
                raise ConfigError("could not page-lock the master weights (cudaHostRegister failed: memlock "
                                  "limit?); use engine.upload_cast='host'")
            warnings.warn("slideformer: page-locking the FP32 master weights failed (memlock limit?); the "
                          "remaining layers are cast on the CPU, which costs host memory bandwidth that "
                          "AdamW needs", RuntimeWarning, stacklevel=3)
            break
        u.registered = True
    registered = [u.master for u in e.units if u.registered]
    # Page-locked memory must be unregistered before it is freed: close() does it, and so does this
    # finalizer if an engine is dropped without close().
    e._unregister = weakref.finalize(e, unregister_all, e.ops, registered)
    return bool(registered)
