"""The host-memory budget of an engine: what it allocates on the host, and the decisions that follow.

Owns the byte counts of an ``Engine``'s host buffers at construction (its own layout: 12 B/param of
master + moments, or 4 with the moments on disk, or 4 for the embedding and head only with the decoder
layers' masters on disk too, the deferred schedule's gradient buffer, the BF16 upload copies, the staging
rings and the gradient pool), the choice of where the optimizer state lives and whether the upload copy is
kept (``offload`` / ``host_copy`` = 'auto'), and the fail-early check. Invariant: every
decision compares the same byte counts plus the same margin against the same budget, so 'auto' never
picks a layout that the check then refuses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slideformer.config import EngineConfig
from slideformer.errors import ConfigError, HostMemoryError

GIB = 2**30

HOST_MARGIN_FRACTION = 0.05
HOST_MARGIN_MIN_BYTES = 256 * 2**20  # headroom for what the plan does not count (Python objects, data)


def engine_host_bytes(
    num_params: int, layer_numels: list[int], vocab_slot_numel: int, engine: EngineConfig, on_cuda: bool, elt: int,
    offload: str = "none", largest_unit: int = 0, host_copy: bool = False,
) -> dict[str, int]:
    """Host bytes an ``Engine`` allocates at construction, by kind (the engine's own layout).

    12 B/param of FP32 master weights and Adam moments (+4 B/param of gradient accumulator when
    ``engine.schedule`` is 'deferred'; 'auto' decides per step and is counted at 12), the upload staging
    rings and the gradient pool, and on a CPU 'device' the layer and vocabulary slots. With ``offload`` =
    'moments' the moments are on disk: 4 B/param plus the ring of ``offload_prefetch + 2`` pieces (a chunk
    of both moments, at most the largest unit's, ``largest_unit`` params). With 'all' the decoder layers'
    masters are on disk too: 4 B/param of the embedding and head only (``num_params - sum(layer_numels)``),
    a ring of pieces of three parts, and the upload copies (which 'all' needs: counted whatever
    ``host_copy`` says). Activation buffers grow with the
    first batches and are not counted. ``host_copy``: the pinned BF16 upload copies, 2 B/param (resident
    layers, decided later, are counted too). ``vocab_slot_numel`` is the embedding + head numel
    when tied, else the larger of the two (one slot serves both).
    """
    chunk_bytes = int(engine.chunk_mib * 2**20)
    pool = (max(engine.staging_chunks, engine.grad_park_mib * 2**20 // chunk_bytes) if on_cuda
            else 2 * engine.staging_chunks)
    if offload == "moments":
        need = {"master weights (4 B/param; moments on disk)": 4 * num_params,
                "disk ring buffers (pieces of moments)": offload_ring_bytes(engine, largest_unit, elt)}
    elif offload == "all":
        host_copy = True
        need = {"embedding + head masters (4 B/param; the rest on disk)": 4 * (num_params - sum(layer_numels)),
                "disk ring buffers (pieces of masters + moments)": offload_ring_bytes(engine, largest_unit, elt,
                                                                                      parts=3)}
    else:
        need = {"master weights + Adam moments (12 B/param)": 12 * num_params}
    if engine.schedule == "deferred":
        acc = elt if engine.grad_accumulator == "compute" else 4
        need[f"gradient accumulator ({acc} B/param)"] = acc * num_params
    if host_copy:
        need["BF16 upload copies (2 B/param, pinned)"] = 2 * num_params
    need["upload staging rings"] = (engine.staging_chunks + 2) * chunk_bytes
    need["gradient pool"] = pool * chunk_bytes
    if not on_cuda:
        depth = min(engine.window, len(layer_numels))
        need["device slots on the cpu (weights + grads)"] = (
            depth * max(layer_numels, default=0) + vocab_slot_numel) * 2 * elt
    return need


def offload_ring_bytes(engine: EngineConfig, largest_unit: int, elt: int, parts: int = 2) -> int:
    """Host bytes of the disk tier's ring: ``offload_prefetch + 2`` buffers of one piece's two moments (three
    parts with the masters on disk too, ``parts=3``; a piece is the optimizer chunk, ``chunk_mib`` of the
    compute dtype, or the largest unit if smaller)."""
    piece = min(int(engine.chunk_mib * 2**20) // elt, -(-largest_unit // 1024) * 1024)
    return (engine.offload_prefetch + 2) * parts * (-(-4 * piece // 4096) * 4096)


def _fits(need: dict[str, int], budget: int) -> bool:
    total = sum(need.values())
    return total + max(int(HOST_MARGIN_FRACTION * total), HOST_MARGIN_MIN_BYTES) <= budget


def choose_offload(engine: EngineConfig, need: Callable[[str], dict[str, int]], budget: int,
                   allow_all: bool = False) -> str:
    """Where the optimizer state lives: the configured mode, or for 'auto' with an offload directory set, the
    first of 'none', 'moments' whose layout (``need(mode)``, plus the margin) fits ``budget`` bytes, else 'all'
    when ``allow_all`` (a BF16 upload copy is possible), else 'moments' (which the start-up check may refuse)."""
    if engine.offload != "auto":
        return engine.offload
    if _fits(need("none"), budget) or not engine.offload_dir:
        return "none"
    return "all" if allow_all and not _fits(need("moments"), budget) else "moments"


def choose_host_copy(engine: EngineConfig, need: Callable[[bool], dict[str, int]], budget: int, on_cuda: bool,
                     dtype: torch.dtype, offload: str = "none") -> tuple[bool, str]:
    """(on, why) for ``engine.host_copy``: 'bf16' is on (a ConfigError unless the compute dtype is BF16);
    'auto' is on when the device is CUDA, the compute dtype BF16, and ``need(True)`` plus the margin fits
    ``budget`` bytes (``need(copy)``: the engine's host bytes with or without the copy). With ``offload`` =
    'all' (the resolved mode) the copy is what uploads read: on, or a ConfigError when it cannot be."""
    mode = engine.host_copy
    if offload == "all":
        if mode == "none" or dtype != torch.bfloat16:
            raise ConfigError(f"engine.offload='all' puts the decoder layers' FP32 masters on disk, so uploads read "
                              f"the pinned BF16 copy: it needs engine.host_copy 'bf16' or 'auto' (is {mode!r}) and "
                              f"compute dtype bfloat16 (is {dtype}); or use engine.offload='moments'")
        return True, "engine.offload=all (uploads read the BF16 copy; the masters are on disk)"
    if mode == "none":
        return False, "engine.host_copy=none"
    if dtype != torch.bfloat16:
        if mode == "bf16":
            raise ConfigError(f"engine.host_copy='bf16' keeps a BF16 upload copy, but the compute dtype is {dtype}; "
                              "set engine.compute_dtype=bfloat16 or engine.host_copy=none")
        return False, f"the compute dtype is {dtype}, not bfloat16"
    if mode == "bf16":
        return True, "engine.host_copy=bf16"
    if not on_cuda:
        return False, "the device is not CUDA (nothing crosses PCIe)"
    total = sum(need(True).values())
    if total + max(int(HOST_MARGIN_FRACTION * total), HOST_MARGIN_MIN_BYTES) > budget:
        return False, (f"the host state with the copy ({total / GIB:.1f} GiB + margin) does not fit the "
                       f"{budget / GIB:.1f} GiB budget")
    return True, f"the host state with the copy ({total / GIB:.1f} GiB) fits the {budget / GIB:.1f} GiB budget"


def check_host_memory(need: dict[str, int], available: int, what: str = "the engine") -> None:
    """Raise HostMemoryError, printing the plan, when ``need`` plus a margin exceeds ``available``."""
    total = sum(need.values())
    margin = max(int(HOST_MARGIN_FRACTION * total), HOST_MARGIN_MIN_BYTES)
    if total + margin <= available:
        return
    lines = "\n".join(f"  {k:<48} {v / GIB:10.3f} GiB" for k, v in need.items())
    raise HostMemoryError(
        f"{what} needs {total / GIB:.2f} GiB of host RAM (+{margin / GIB:.2f} GiB margin) but only "
        f"{available / GIB:.2f} GiB is available; nothing was allocated. Plan:\n{lines}\n"
        "Free host memory (other processes, page cache held by them), use a machine with more RAM, or train "
        "a smaller model, or put the AdamW moments on disk (engine.offload=moments or auto with "
        "engine.offload_dir=/nvme/dir: 4 instead of 12 B/param; offload=all with host_copy=bf16 moves the decoder "
        "layers' masters there too: 2 B/param); `slideformer plan` shows the whole plan. Host "
        "state is 12 B/param whatever the batch size or window. If this machine grants RAM on demand and "
        "under-reports it at start, set "
        "engine.check_host_memory=false."
    )
