"""``slideformer plan``: memory per tier and a roofline step time, from a model's config.json alone.

Owns the first-order memory model of a run, before anything is allocated: the model is built on the
meta device (no weights are read), split by the engine's adapter into embedding / decoder layers /
norm / head, and the byte counts follow the engine's layout: 12 B/param of FP32 master weights and Adam
moments on the host (+4 B/param of gradient accumulator under the deferred schedule), activation
checkpoints of layers x tokens x hidden x 2 B in pinned memory (+2 B/param of pinned BF16 upload copies
with ``engine.host_copy``, which also halves the upload bytes of a device-cast run; the disk tier moves the
moments, 8 B/param, or with ``offload='all'`` the decoder layers' masters too, to the offload disk), and on the GPU
``window`` slots sized for the largest decoder layer (BF16 weights + grads), one vocabulary slot for
embedding/head, and the working activations of one layer. Invariant: every number is derived from the
config and the stated assumptions, which the output prints; the performance planner refines it with
measured speeds. ``Hardware`` and ``Plan`` live in ``plan_types.py`` (re-exported here).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch

from slideformer.config import EngineConfig
from slideformer.kernels import cross_entropy
from slideformer.kernels.vocab_head import BLOCKS as HEAD_BLOCKS
from slideformer.kernels.vocab_head import VocabBlockedHead
from slideformer.memory.budget import offload_ring_bytes
from slideformer.plan_time import host_seconds, park_backlog_bytes, pick_head_schedule, step_times
from slideformer.plan_types import GIB, Hardware, Plan

CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context + allocator slack on the GPU (measured order of magnitude)
PROCESS_BASELINE_BYTES = 2 * GIB  # Python, torch, transformers and the tokenizer in host RAM


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_COUNTED: dict[str, tuple[dict[str, int], list[int], bool]] = {}
"""``component_params`` by the config's JSON: one meta model per config, however many plans ask (the resident
count plans every count it tries)."""


def component_params(hf_config: Any) -> tuple[dict[str, int], list[int], bool]:
    """(params per component, params per decoder layer, tied) of the model, built on the meta device."""
    key = hf_config.to_json_string() if hasattr(hf_config, "to_json_string") else None
    if key is not None and key in _COUNTED:
        params, layers, tied = _COUNTED[key]
        return dict(params), list(layers), tied
    counted = _count_params(hf_config)
    if key is not None:
        _COUNTED[key] = counted
    params, layers, tied = counted
    return dict(params), list(layers), tied


def _count_params(hf_config: Any) -> tuple[dict[str, int], list[int], bool]:
    from slideformer.models import get_adapter
    from slideformer.models.loading import meta_model

    parts = get_adapter(str(hf_config.model_type)).split(meta_model(hf_config))
    layers = [_numel(layer) for layer in parts.layers]
    params = {
        "embedding": _numel(parts.embed),
        "decoder_layers": sum(layers),
        "largest_layer": max(layers),
        "norm": _numel(parts.norm),
        "lm_head": 0 if parts.tied else _numel(parts.lm_head),
    }
    params["total"] = params["embedding"] + params["decoder_layers"] + params["norm"] + params["lm_head"]
    return params, layers, bool(parts.tied)


def checkpoint_layers(engine: EngineConfig, num_layers: int) -> int:
    """Layer inputs the activation store keeps on the host: all but the last, or its ring when they go to disk."""
    from slideformer.memory.activations_disk import RING

    saved = max(num_layers - 1, 0)
    return min(RING, saved) if engine.offload_activations else saved


def make_plan(
    hf_config: Any,
    *,
    seq_len: int,
    batch_size: int,
    grad_accum: int,
    clipping: bool,
    engine: EngineConfig,
    hardware: Hardware,
    keep_checkpoints: int = 2,
) -> Plan:
    """The memory and time plan of training ``hf_config`` with these settings on ``hardware``."""
    params, layers, tied = component_params(hf_config)
    n = params["total"]
    hidden = int(hf_config.hidden_size)
    inter = int(getattr(hf_config, "intermediate_size", 4 * hidden) or 4 * hidden)
    vocab = int(hf_config.vocab_size)
    tokens = seq_len * batch_size
    deferred = engine.schedule == "deferred" or (engine.schedule == "auto" and (grad_accum > 1 or clipping))
    on_gpu = engine.device != "cpu"
    elt = 2 if engine.compute_dtype in ("auto", "bfloat16", "float16") else 4
    fused, loss_chunk = cross_entropy.planned(engine.loss_kernel if on_gpu else "torch", engine.loss_chunk_tokens,
                                              hf_config)

    largest_unit = max(params["embedding"] + (params["norm"] if tied else 0), params["largest_layer"],
                       params["lm_head"] + params["norm"])
    # The disk tier: 'auto' moves the moments to disk only when the all-in-RAM host total exceeds the budget,
    # and the decoder layers' masters too ('all', uploads then read the BF16 copy) when even that does not fit.
    offload = engine.offload
    bf16 = engine.compute_dtype in ("auto", "bfloat16")
    if offload == "auto":
        # An 'auto' BF16 copy yields to the moments: the offload decision is made without it.
        copy_first = "none" if engine.host_copy == "auto" else engine.host_copy

        def host_total(mode: str) -> int:
            return make_plan(hf_config, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                             clipping=clipping,
                             engine=EngineConfig(**{**asdict(engine), "offload": mode, "host_copy": copy_first}),
                             hardware=hardware, keep_checkpoints=keep_checkpoints).host_total

        offload = "none"
        if host_total("none") > hardware.host_memory_bytes:
            offload = "moments"
            if engine.host_copy != "none" and bf16 and host_total("moments") > hardware.host_memory_bytes:
                offload = "all"
    # The pinned BF16 upload copy (engine.host_copy): 'auto' only on a GPU, in BF16, when the host RAM holds it;
    # always with 'all' (what uploads read).
    host_copy = (engine.host_copy == "bf16" or offload == "all") and bf16
    if engine.host_copy == "auto" and on_gpu and bf16 and offload != "all":
        with_copy = make_plan(hf_config, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum,
                              clipping=clipping,
                              engine=EngineConfig(**{**asdict(engine), "offload": offload, "host_copy": "bf16"}),
                              hardware=hardware, keep_checkpoints=keep_checkpoints)
        host_copy = with_copy.host_total <= hardware.host_memory_bytes
    if offload == "moments":
        host = {"master weights (moments on disk)": 4 * n,
                f"disk ring ({engine.offload_prefetch + 2} pieces of moments)":
                    offload_ring_bytes(engine, largest_unit, elt)}
    elif offload == "all":
        host = {"embedding + head masters (rest on disk)": 4 * (n - params["decoder_layers"]),
                f"disk ring ({engine.offload_prefetch + 2} pieces of masters + moments)":
                    offload_ring_bytes(engine, largest_unit, elt, parts=3)}
    else:
        host = {"master weights + Adam moments": 12 * n}
    state_terms = [next(iter(host))]  # the masters (and moments) term each layout above starts with
    if deferred:
        key = (f"gradient buffer ({elt} B/param, one micro-batch)" if engine.grad_accumulator == "compute"
               else "gradient accumulator (fp32)")
        host[key] = (elt if engine.grad_accumulator == "compute" else 4) * n
        state_terms.append(key)
    host["process baseline"] = PROCESS_BASELINE_BYTES
    chunk_bytes = int(engine.chunk_mib * 2**20)
    device_cast = on_gpu and engine.upload_cast != "host" and not host_copy
    park = max(engine.staging_chunks, engine.grad_park_mib * 2**20 // chunk_bytes) if on_gpu else 0
    pinned = {
        # Host-cast upload rings (layer uploader + vocab uploader) and the gradient parking pool.
        "upload staging rings": (engine.staging_chunks + 2) * chunk_bytes,
        "gradient parking pool": park * chunk_bytes,
        "embedding rows of a micro-batch": tokens * hidden * elt,
        "activation checkpoints": checkpoint_layers(engine, len(layers)) * tokens * hidden * elt,
    }
    vocab_numel = vocab * hidden
    gpu = {
        f"layer slots ({engine.window} x weights+grads)": engine.window * params["largest_layer"] * 2 * elt,
        "vocab slot (embedding/head)": vocab_numel * 2 * elt,
        # One layer's recompute + backward working set (q/k/v/o, MLP up/gate/act, norms) plus the
        # running hidden state and its gradient; HF's own MLP holds more of them (_mlp_intermediates).
        "layer activations": (tokens * (12 * hidden + _mlp_intermediates(engine, hf_config, on_gpu) * inter) * elt
                              + 3 * tokens * hidden * elt),
        "loss chunk (logits and their gradient)": min(loss_chunk, tokens) * vocab * cross_entropy.bytes_per_logit(
            fused),
        "FP32 upload rings (device cast)": (2 * 2 * chunk_bytes // elt * 4) if device_cast else 0,
        "CUDA context + allocator": CUDA_CONTEXT_BYTES,
    }
    auto_count = engine.resident_layers < 0
    from slideformer.placement import resident_bytes_per_param, resident_choice, resident_scratch_bytes

    head_choice = engine.head_schedule
    if auto_count:  # 'as many as fit': placement.py, for this run's tokens and GPU (and the head they fit with)
        count, cast, why, head_choice = resident_choice(hf_config, tokens=tokens, engine=engine, deferred=deferred,
                                                        gpu_budget_bytes=hardware.gpu_memory_bytes - CUDA_CONTEXT_BYTES)
    else:
        cast = engine.resident_weights == "cast"
    engine = EngineConfig(**{**asdict(engine), "resident_layers": count if auto_count else engine.resident_layers,
                             "resident_weights": "cast" if cast else "keep", "head_schedule": head_choice})
    n_res = min(engine.resident_layers, len(layers)) * params["largest_layer"]
    from slideformer.runtime.embedding_split import EmbeddingSplit
    from slideformer.runtime.resident import resolve_placement

    placed = resolve_placement(len(layers), engine.resident_layers, engine.resident_placement)
    notes = [f"engine.resident_layers=-1 keeps {why} (placed: {placed})"] if auto_count else []
    if n_res:
        # runtime/resident.py: FP32 master + two moments per resident param, the weights (kept, or one shared
        # buffer they are cast into), an FP32 gradient accumulator under the deferred schedule; one FP32 grad
        # scratch (none of its own where the vocabulary slot's weights hold it).
        key = ("resident layers (FP32 master + moments; weights cast on use)" if cast
               else "resident layers (weights + FP32 master + moments)")
        gpu[key] = (n_res * resident_bytes_per_param(elt, cast, deferred)
                    + resident_scratch_bytes(params["largest_layer"], elt, cast, deferred=deferred,
                                             vocab_slot_bytes=vocab_numel * elt))
    # Only uploaded units have a copy: not resident layers, nor an untied embedding (its rows are gathered).
    copy_params = n - n_res - (0 if tied else params["embedding"])
    if host_copy:
        pinned["BF16 upload copies of the masters (2 B/param)"] = 2 * copy_params
        state_terms.append("BF16 upload copies of the masters (2 B/param)")
    if not on_gpu:
        host.update({f"device (cpu): {k}": v for k, v in gpu.items() if "CUDA" not in k})
        gpu = {}
    disk = {
        f"checkpoints ({keep_checkpoints} x 12 B/param)": keep_checkpoints * 12 * n,
        "export (bf16)": 2 * n,
    }
    if offload in ("moments", "all"):
        disk["offload: AdamW moments (8 B/param)"] = 8 * n
    if offload == "all":
        disk["offload: decoder layers' FP32 masters (4 B/param)"] = 4 * params["decoder_layers"]
    # engine.offload_activations: every layer input but the last, of the largest micro-batch, in one file
    # (memory/activations_disk.py), written in forward and read back in backward, per micro-batch.
    act_file = max(len(layers) - 1, 0) * tokens * hidden * elt
    if engine.offload_activations:
        disk["offload: activation checkpoints (one micro-batch)"] = act_file

    spread = bool(n_res) and placed in ("spread", "spread_top")

    def timed(tail: int) -> dict[str, float]:  # `tail`: what follows the backward on the CPU (plan_time.py)
        return step_times(hardware, n=n, tail=tail, n_res=n_res, spread=spread, cast=cast, tokens=tokens,
                          grad_accum=grad_accum, elt=elt, device_cast=device_cast, deferred=deferred,
                          disk_bytes=(8 * n + (4 * params["decoder_layers"] if offload == "all" else 0)
                                      if offload in ("moments", "all") else 0)
                          + (act_file * grad_accum if engine.offload_activations else 0))

    # The split embedding update (runtime/embedding_split.py): the batch rows' compact gradient on the device;
    # after the backward only those rows' AdamW, instead of the whole embedding's. A tied embedding splits under
    # 'auto' when this model predicts it pays (EmbeddingSplit.used).
    rows = min(tokens, vocab)
    split_args = {"tied": tied, "hidden": hidden, "chunk": int(engine.chunk_mib * 2**20) // elt,
                  "single_process": True, "in_ram": offload == "none",
                  "tied_split": (tied and on_gpu and not deferred and engine.embedding_update == "auto"
                                 and EmbeddingSplit.pays(timed(rows * hidden)["step"],
                                                         timed(params["embedding"])["step"]))}
    split_rows = rows if not deferred and EmbeddingSplit.used(engine.embedding_update, **split_args) else 0
    if split_rows and on_gpu:
        gpu["embedding rows' gradient (split update)"] = split_rows * hidden * elt
    times = timed(split_rows * hidden if split_rows else params["embedding"])
    head_schedule = pick_head_schedule(engine.head_schedule, tied=tied, on_gpu=on_gpu, fused=fused,
                                       split=bool(split_rows), host_s=host_seconds(times, hardware),
                                       gpu_s=times["gpu compute"],
                                       softcap=cross_entropy.logit_softcap(hf_config) is not None)
    if head_schedule == "vocab":  # its buffers replace the one-pass head's loss chunk
        del gpu["loss chunk (logits and their gradient)"]
        block_rows = VocabBlockedHead.block_rows_for(vocab, HEAD_BLOCKS)
        gpu.update(VocabBlockedHead.device_bytes(tokens, vocab, hidden, block_rows, elt))
        # ...and its gradient is a ring of blocks, not the whole matrix's (runtime/head_blocks.py): the weights, the
        # ring and the final norm's gradient.
        del gpu["vocab slot (embedding/head)"]
        gpu["vocab slot (weights; gradient: a ring of head blocks)"] = (
            vocab_numel + VocabBlockedHead.grad_ring_rows(vocab, block_rows) * hidden + hidden) * elt
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        notes.append(f"seq_len {seq_len} exceeds max_position_embeddings {limit}")
    if not on_gpu:
        notes.append(
            "engine.device is cpu: the 'device' tensors live in host RAM and the times are GPU estimates"
        )
    if on_gpu and engine.loss_kernel == "auto" and cross_entropy.logit_softcap(hf_config) is None:
        notes.append("engine.loss_kernel=auto planned as " + (
            "the fused Triton loss kernel (triton imports here)" if fused else
            "the torch loss path: triton does not import on this machine, so a GPU machine with triton would take the "
            "fused kernel (smaller loss buffers, maybe more resident layers); to plan for that machine, set "
            "loss_kernel: triton in the config's engine section"))
    if offload in ("moments", "all") and not engine.offload_dir:
        notes.append("the moments go to disk: set engine.offload_dir (a directory on a local NVMe disk)")
    if engine.offload_activations:
        notes.append(f"engine.offload_activations: {act_file / 2**30:.2f} GiB of layer inputs per micro-batch go "
                     f"to a file in engine.offload_dir and come back in backward (pinned: a "
                     f"{checkpoint_layers(engine, len(layers))}-layer ring)")
    if offload == "all":
        notes.append("engine.offload=all: the decoder layers' FP32 masters live on disk with their moments; "
                     "uploads read the pinned BF16 copy" + ("" if bf16 else
                                                            " (needs compute_dtype bfloat16: the engine refuses "
                                                            "this config)"))
    if device_cast:
        notes.append(f"the uploaded FP32 master weights ({4 * copy_params / 2**30:.1f} GiB of the host total) are "
                     "page-locked in place so uploads DMA them directly (engine.upload_cast)")
    if host_copy:
        notes.append(f"engine.host_copy: the CPU AdamW writes a pinned BF16 copy of the streamed masters "
                     f"({2 * copy_params / 2**30:.1f} GiB) in the same pass; uploads move 2 B/param, no cast")
    elif engine.host_copy == "bf16":
        notes.append("engine.host_copy=bf16 needs compute_dtype bfloat16: the engine refuses this config")
    if not deferred and engine.embedding_update != "auto" and EmbeddingSplit.used("auto", **split_args) != bool(
            split_rows):
        notes.append(f"engine.embedding_update={engine.embedding_update}: 'auto' would "
                     + ("split this untied embedding (8B b8: split 1.241 vs whole 1.365 s/step)" if not split_rows
                        else "keep this tied embedding whole: the plan predicts no gain from splitting it"))
    park_hint_mib = 0
    if on_gpu and not deferred and offload == "none":
        park_notes, park_hint_mib = _park_note(times, hardware, host_params=n - n_res, elt=elt,
                                               pool=park * chunk_bytes, layer_grad=params["largest_layer"] * elt,
                                               host_total=sum(host.values()) + sum(pinned.values()))
        notes.extend(park_notes)
    settings = {
        "layers": len(layers),
        "tied": tied,
        "tokens_per_micro_batch": tokens,
        "grad_accum": grad_accum,
        "window": engine.window,
        "resident_layers": min(engine.resident_layers, len(layers)),
        "resident_weights": engine.resident_weights,
        "schedule": "deferred" if deferred else "overlap",
        "seq_len": seq_len,
        "batch_size": batch_size,
        "offload": offload,
        "offload_dir": engine.offload_dir,
        "host_copy": "bf16" if host_copy else "none",
        "embedding_update": "split" if split_rows else "whole",
        "head_schedule": head_schedule,
        "offload_activations": engine.offload_activations,
        "grad_park_mib_hint": park_hint_mib,
    }
    return Plan(str(hf_config.model_type), params, host, pinned, gpu, disk, times, settings, hardware, notes,
                state_terms)


def _park_note(times: dict[str, float], hardware: Hardware, *, host_params: int, elt: int, pool: int,
               layer_grad: int, host_total: int) -> tuple[list[str], int]:
    """A note when the backward's gradients would outrun the host's AdamW by more than the parking pool holds: the
    pool that lets the backward run ahead, and whether this host has the pinned RAM for it; with that pool's
    ``engine.grad_park_mib`` (0: no note). Not a default: target 4 of issue 3 holds the default engine's host RAM to
    12.5 B/param + checkpoints + 3 GiB, and the 8B's 8 GiB pool is over it."""
    backlog = park_backlog_bytes(times, hardware, host_params=host_params, elt=elt)
    if backlog <= pool:
        return [], 0
    want_gib = math.ceil(backlog / GIB)  # whole GiB: the 8B's 7.8 GiB estimate names the 8 GiB measured
    extra = want_gib * GIB - pool
    room = ("which this host has" if host_total + extra <= hardware.host_memory_bytes
            else "more than this host has left")
    return [f"the backward's gradients outrun the host's AdamW (beside the copies on its memory bus) by "
            f"~{backlog / GIB:.1f} GiB: "
            f"the {pool / GIB:.1f} GiB parking pool (engine.grad_park_mib, ~{pool / layer_grad:.0f} layers' gradients) "
            f"fills, then the backward runs at the host's pace and the host idles in the next forward. "
            f"engine.grad_park_mib={want_gib * 1024} ({extra / GIB:.1f} GiB more pinned RAM, {room}) lets the "
            "backward run ahead; on the H100 box it took the 8B b8 on a 24 GiB cap from 1.95-2.06 to 1.79 s/step "
            "(8 GiB; benchmarks/results/performance_h100_202611.md, session 19)"], want_gib * 1024


def _mlp_intermediates(engine: EngineConfig, hf_config: Any, on_gpu: bool) -> int:
    """``[tokens, intermediate]`` tensors one layer's MLP holds at its backward's peak: 4 with Liger's SwiGLU
    (``engine.kernels``, kernels/liger.py), which recomputes the gated product in place; 7 with HF's own module,
    whose autograd also keeps the product and the activation and builds three more gradients. Fitted on the H100
    box: Llama-3.1-8B with HF's MLP allocated 0.75 GiB over the 4-tensor plan at 8,192 tokens and 1.40 at 16,384
    (3.2-3.4 intermediates per token); Llama-3.2-3B with Liger's within -0.3..+0.2 GiB of it (session 14 of
    benchmarks/results/performance_h100_202611.md). 'auto' counts Liger only where it would load here."""
    from slideformer.kernels import liger

    if engine.kernels == "liger":
        return 4
    if engine.kernels == "auto" and on_gpu:
        device = torch.device(engine.device if engine.device.startswith("cuda") else "cuda")
        return 4 if liger.would_load(device, str(hf_config.model_type)) else 7
    return 7
