"""Placement: how many decoder layers stay resident on the GPU (``engine.resident_layers = -1``).

Owns that one decision. A resident layer costs ``compute dtype + 12`` bytes/param of device memory
(weights, FP32 master, two moments) and saves its uploads, its gradient download and its CPU AdamW
(``runtime/resident.py``); the rest of the device memory is what ``planner.make_plan`` predicts for the
run with that count (its split update and head schedule depend on it). The count is the largest whose total leaves
the allocator's reserve (``reserve_bytes``) free in the budget, chosen together with the head schedule
(``resident_choice``). Under the deferred schedule (clipping, accumulation) each resident
layer also holds an FP32 gradient accumulator (4 more bytes/param). With ``engine.resident_weights='cast'`` a
layer keeps no compute-dtype weights (12 bytes/param) and all share one cast buffer; 'auto' picks it when it fits more
layers and the plan with kept weights is bound by the host's AdamW (``resident_choice``). Invariant: the
count is 0 whenever the run cannot use resident layers (CPU device, the disk tier) and never exceeds the
number of decoder layers.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, NamedTuple

import torch

from slideformer.config import EngineConfig
from slideformer.errors import ConfigError
from slideformer.kernels import cross_entropy

RESERVE_OF_STREAMING = 0.15
RESERVE_OF_BUDGET = 0.03
"""The caching allocator's reserve above the planned allocation, which the count leaves free: a share of the
streaming buffers (slots, activations, the head: the allocations that come and go each step and fragment the
pool) plus a share of the budget. Fitted on the H100 box's measured peaks, reserved minus planned, of the engines
since session 11: 0.1-0.9 GiB at batch 8 (3B with 3.8 GiB of streaming buffers on a 24 GiB cap, 8B with 6.9 GiB
on a 24 GiB cap and on the whole card), 1.6 GiB for the 8B at batch 16 on a 24 GiB cap (9.4 GiB of streaming
buffers); this rule leaves 1.3 / 1.8 / 2.1 GiB there (session 14 of benchmarks/results/performance_h100_202611.md).
It replaced a flat 10% of the budget (session 2: 2.3 GiB reserved above 19.3 allocated, an older engine), which
kept the 3B on a 24 GiB cap one cast layer short: 16 measured 22.5 / 23.0 GiB allocated / reserved."""


def reserve_bytes(streaming_bytes: int, gpu_budget_bytes: int) -> int:
    """Device bytes the count leaves free for the allocator's reserve (``RESERVE_OF_STREAMING``)."""
    return int(RESERVE_OF_STREAMING * streaming_bytes + RESERVE_OF_BUDGET * gpu_budget_bytes)


class ResidentChoice(NamedTuple):
    """``resident_layers=-1`` resolved: the count, whether the weights are cast on use, why, and the head schedule the
    count was planned with ('auto': the plan's head rule at that count; 'vocab': the count needs the blocked head's
    gradient ring, ``resident_choice``)."""

    count: int
    cast: bool
    reason: str
    head_schedule: str = "auto"


def _device_need(hf_config: Any, *, tokens: int, engine: EngineConfig, deferred: bool, gpu_budget_bytes: int,
                 count: int, cast: bool) -> tuple[int, int, int, str]:
    """(allocation + reserve, streaming buffers, reserve, head schedule) of the plan with ``count`` resident layers:
    what that run would allocate (the CUDA context excluded), plus the allocator's reserve of its streaming buffers."""
    from slideformer.planner import CUDA_CONTEXT_BYTES, Hardware, make_plan

    plan = make_plan(hf_config, seq_len=tokens, batch_size=1, grad_accum=1, clipping=deferred,
                     engine=replace(engine, resident_layers=count, resident_weights="cast" if cast else "keep",
                                    schedule="deferred" if deferred else engine.schedule),
                     hardware=Hardware(gpu_memory_bytes=gpu_budget_bytes, host_memory_bytes=1 << 50))
    alloc = sum(plan.gpu.values()) - CUDA_CONTEXT_BYTES
    streaming = alloc - sum(v for k, v in plan.gpu.items() if k.startswith("resident layers"))
    reserve = reserve_bytes(streaming, gpu_budget_bytes)
    return alloc + reserve, streaming, reserve, str(plan.settings["head_schedule"])


class Fit(NamedTuple):
    """Resident layers that fit, why, and the head schedule of the plan at that count."""

    count: int
    reason: str
    head: str = "tokens"


def resident_layers_that_fit(hf_config: Any, *, tokens: int, engine: EngineConfig, deferred: bool,
                             gpu_budget_bytes: int, cast: bool = False) -> Fit:
    """Resident decoder layers that fit ``gpu_budget_bytes`` for micro-batches of ``tokens``, with their
    compute-dtype weights kept, or (``cast``) cast into one shared buffer before each use.

    ``gpu_budget_bytes`` is device memory this process may still allocate (free memory, or a cap), the CUDA
    context already excluded. A first count comes from the plan without resident layers; the count is then checked
    against the plan at that count, whose streaming buffers can differ (the split embedding update's rows, the head
    schedule: ``engine.head_schedule`` as given), and moved up or down until the next layer would not fit.
    """
    from slideformer.planner import CUDA_CONTEXT_BYTES, Hardware, make_plan

    if engine.device == "cpu":
        return Fit(0, "the device is the CPU")
    if engine.offload != "none":
        return Fit(0, "the disk tier (engine.offload) is on")
    base = make_plan(hf_config, seq_len=tokens, batch_size=1, grad_accum=1, clipping=False,
                     engine=EngineConfig(**{**asdict(engine), "resident_layers": 0}),
                     hardware=Hardware(gpu_memory_bytes=gpu_budget_bytes, host_memory_bytes=1 << 50))
    layers = int(base.settings["layers"])
    largest = int(base.params["largest_layer"])
    elt = 2 if engine.compute_dtype in ("auto", "bfloat16", "float16") else 4
    streamed_need = sum(v for k, v in base.gpu.items()) - CUDA_CONTEXT_BYTES
    vocab_bytes = int(hf_config.vocab_size) * int(hf_config.hidden_size) * elt
    room = (gpu_budget_bytes - reserve_bytes(streamed_need, gpu_budget_bytes) - streamed_need
            - resident_scratch_bytes(largest, elt, cast, deferred=deferred, vocab_slot_bytes=vocab_bytes))
    per_layer = largest * resident_bytes_per_param(elt, cast, deferred)
    count = max(0, min(layers, int(room // per_layer))) if room > 0 else 0
    kw = {"tokens": tokens, "engine": engine, "deferred": deferred, "gpu_budget_bytes": gpu_budget_bytes, "cast": cast}
    at = _device_need(hf_config, count=count, **kw)  # each count's plan once: up while the next fits, else down
    if at[0] <= gpu_budget_bytes:
        while count < layers and (nxt := _device_need(hf_config, count=count + 1, **kw))[0] <= gpu_budget_bytes:
            count, at = count + 1, nxt
    while count > 0 and at[0] > gpu_budget_bytes:
        count -= 1
        at = _device_need(hf_config, count=count, **kw)
    _, streaming, reserve, head = at
    gib = 2**30
    return Fit(count, (f"{count} of {layers} layers ({per_layer / gib:.2f} GiB each"
                       f"{', weights cast on use' if cast else ''}) fit next to {streaming / gib:.2f} GiB of streaming "
                       f"buffers{' (the blocked head)' if head == 'vocab' else ''} and {reserve / gib:.2f} GiB of "
                       f"allocator reserve in {gpu_budget_bytes / gib:.1f} GiB"), head)


def resident_bytes_per_param(elt: int, cast: bool, deferred: bool) -> int:
    """Device bytes per resident parameter: FP32 master + two moments, the kept compute-dtype weights unless
    ``cast``, and the deferred schedule's FP32 accumulator."""
    return 12 + (0 if cast else elt) + (4 if deferred else 0)


def resident_scratch_bytes(largest_layer: int, elt: int, cast: bool, *, deferred: bool, vocab_slot_bytes: int) -> int:
    """Device bytes resident layers need once, whatever their count: with ``cast`` the compute-dtype buffer they all
    share, and one FP32 gradient scratch of the largest layer, except where the overlap schedule keeps it in the
    vocabulary slot's weights (``vocab_slot_bytes``; ``runtime/resident.scratch_fits``)."""
    from slideformer.runtime.resident import scratch_fits

    aliased = not deferred and scratch_fits(vocab_slot_bytes, largest_layer)
    return largest_layer * ((0 if aliased else 4) + (elt if cast else 0))


def resident_choice(hf_config: Any, *, tokens: int, engine: EngineConfig, deferred: bool,
                    gpu_budget_bytes: int) -> ResidentChoice:
    """``resident_layers=-1`` under ``engine.resident_weights`` and ``engine.head_schedule``.

    'auto' casts when that fits more layers and the plan with the weights kept is bound by the host: its AdamW and
    the copies' bytes on its memory bus (``plan_time.host_seconds``) outlast the GPU's compute. There, each layer
    moved to the GPU takes its AdamW and transfers off that bus (the bound),
    and the casts cost the GPU one pass over the layer's master per forward and per backward. Where the GPU
    bounds the step, those passes would only add to it. The head schedule is then chosen with the count
    (``_with_blocked_head``).
    """
    from slideformer.plan_time import host_seconds
    from slideformer.planner import Hardware, make_plan

    kw = {"tokens": tokens, "engine": engine, "deferred": deferred, "gpu_budget_bytes": gpu_budget_bytes}
    keep = resident_layers_that_fit(hf_config, **kw)
    if engine.resident_weights == "keep":
        return _with_blocked_head(hf_config, keep, False, keep.reason, **kw)
    cast = resident_layers_that_fit(hf_config, **kw, cast=True)
    if engine.resident_weights == "cast":
        return _with_blocked_head(hf_config, cast, True, cast.reason, **kw)
    if cast.count <= keep.count:
        return _with_blocked_head(hf_config, keep, False, keep.reason, **kw)
    hw = Hardware(gpu_memory_bytes=gpu_budget_bytes, host_memory_bytes=1 << 50)
    times = make_plan(hf_config, seq_len=tokens, batch_size=1, grad_accum=1, clipping=deferred,
                      engine=replace(engine, resident_layers=keep.count, resident_weights="keep"),
                      hardware=hw).step_seconds
    if host_seconds(times, hw) <= times["gpu compute"]:
        return _with_blocked_head(hf_config, keep, False, f"{keep.reason}; weights kept (the GPU, not the host's "
                                  "AdamW and copies, bounds the step)", **kw)
    return _with_blocked_head(hf_config, cast, True, f"{cast.reason} (the host's AdamW and copies bound the step: "
                              f"{cast.count - keep.count} more than with the weights kept)", **kw)


def _with_blocked_head(hf_config: Any, fit: Fit, cast: bool, reason: str, **kw: Any) -> ResidentChoice:
    """The count and the head schedule chosen together under ``engine.head_schedule='auto'``.

    The plan's head rule (``plan_time.pick_head_schedule``) takes the blocked head where the host bounds the step;
    its gradient is then a ring of two vocabulary blocks instead of the whole matrix (``runtime/head_blocks.py``),
    which can make room for more resident layers. One more layer takes its AdamW and copies off the host's bus again,
    so the count keeps the blocked head for them, even where the plan at the larger count would call the step the
    GPU's and take the one-pass head (which would not fit there). Measured on the H100 box (Llama-3.2-3B, b8, a
    24 GiB cap; ``pair16`` in benchmarks/results/performance_h100_202611.md): 17 cast layers with the blocked head
    0.442 / 0.435 s per step against 16 (the count of the one-pass head's memory) 0.472 / 0.441 s, ABBA in one run.
    """
    engine: EngineConfig = kw["engine"]
    choice = ResidentChoice(fit.count, cast, reason)
    # (the plan at the count kept the one-pass head: the GPU bounds the step there)
    if engine.head_schedule != "auto" or not fit.count or fit.head != "vocab":
        return choice
    more = resident_layers_that_fit(hf_config, **{**kw, "engine": replace(engine, head_schedule="vocab")}, cast=cast)
    if more.count <= fit.count:
        return choice
    return ResidentChoice(more.count, cast, f"{more.reason}: {more.count - fit.count} more than the one-pass head's "
                                            f"memory leaves (the host bounds the step at {fit.count}; "
                                            "engine.head_schedule='vocab')", "vocab")


def engine_resident_count(hf_config: Any, cfg: EngineConfig, cuda_device: torch.device | None, *,
                          clipping: bool) -> ResidentChoice:
    """The engine's ``resident_layers=-1``; the budget is ``cfg.gpu_memory_gib`` or the device's free memory."""
    tokens = cfg.max_tokens_per_micro_batch
    if not tokens:
        raise ConfigError("engine.resident_layers=-1 sizes the resident layers for a micro-batch: set "
                          "engine.max_tokens_per_micro_batch (slideformer train sets it to batch_size x seq_len)")
    if cuda_device is None:
        return ResidentChoice(0, False, "the device is the CPU")
    free, _ = torch.cuda.mem_get_info(cuda_device)
    budget = int(cfg.gpu_memory_gib * 2**30) if cfg.gpu_memory_gib else int(free)
    return resident_choice(hf_config, tokens=tokens, engine=replace(cfg, device="cuda"),
                           deferred=cfg.schedule == "deferred" or clipping, gpu_budget_bytes=budget)


def device_memory_advice(hf_config: Any, cfg: EngineConfig, *, tokens: int, resident: int, deferred: bool,
                         budget_bytes: int | None, detail: str) -> str:
    """The message for a CUDA out-of-memory inside a step: what the plan puts on the GPU, and what to change."""
    from slideformer.planner import Hardware, make_plan

    gib = 2**30
    plan = make_plan(hf_config, seq_len=tokens, batch_size=1, grad_accum=1, clipping=deferred,
                     engine=replace(cfg, device="cuda", resident_layers=resident),
                     hardware=Hardware(gpu_memory_bytes=budget_bytes or 0, host_memory_bytes=1 << 50))
    need = sum(plan.gpu.values())
    top = sorted(plan.gpu.items(), key=lambda kv: -kv[1])[:3]
    where = ", ".join(f"{k} {v / gib:.1f} GiB" for k, v in top)
    of = f" of the {budget_bytes / gib:.1f} GiB available" if budget_bytes else ""
    advice = [f"a smaller micro-batch ({tokens:,} tokens now): lower train.batch_size and raise train.grad_accum "
              "to keep the global batch"]
    if resident:
        each = next((v for k, v in plan.gpu.items() if k.startswith("resident layers")), 0) / resident / gib
        advice.insert(0, f"fewer resident layers (engine.resident_layers={resident} now, ~{each:.2f} GiB each)")
    _, chunk = cross_entropy.planned(cfg.loss_kernel, cfg.loss_chunk_tokens, hf_config)
    if chunk > 256:
        advice.append(f"engine.loss_chunk_tokens=256 (now {chunk})")
    if cfg.window > 1:
        advice.append(f"engine.window=1 (now {cfg.window})")
    return (f"CUDA ran out of memory inside a training step ({detail.splitlines()[0] if detail else 'no detail'}). "
            f"The plan for {tokens:,} tokens per micro-batch puts {need / gib:.1f} GiB on the GPU{of} (largest: "
            f"{where}); other processes on the GPU count too. Try: " + "; ".join(advice) +
            ". `slideformer plan` prints the GPU budget per setting.")
