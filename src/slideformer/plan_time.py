"""The planner's step-time model: roofline terms and the two-phase estimate of one training step.

Owns the seconds of a plan (``planner.make_plan`` owns the bytes): GPU compute, PCIe, CPU AdamW and disk
terms at the stated hardware rates, the host's busy time (``host_seconds``) and the head schedule it decides, and
the step as two phases per micro-batch (forward: compute | uploads;
backward: compute | re-uploads and downloads | the CPU AdamW of the units whose gradients landed) plus the
optimizer's tail (the embedding's gradient lands last, so its AdamW follows the backward: the whole matrix, or
with the split update only the batch's rows). Invariant: every
second is derived from the arguments and the hardware rates; nothing here reads a model or a measurement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slideformer.plan_types import Hardware


def step_times(hardware: Hardware, *, n: int, tail: int, n_res: int, spread: bool, tokens: int,
               grad_accum: int, elt: int, device_cast: bool, deferred: bool, disk_bytes: int,
               cast: bool = False) -> dict[str, float]:
    """Seconds per step: ``gpu compute``, ``pcie``, ``cpu adamw``, ``disk`` (when ``disk_bytes``), ``step``.

    ``n``: parameters; ``n_res`` of them in resident layers (no transfers, AdamW on the GPU), placed
    ``spread`` over the depth or as one block of the lowest layers, their weights ``cast`` from the FP32 master
    before each forward and backward (4 B read + ``elt`` written per param, per pass, on the GPU's memory) or
    kept. ``tail``: parameters whose host AdamW can
    start only after the backward (the embedding's, or its batch rows' with the split update).
    ``disk_bytes``: read and written per step.
    """
    compute = 8.0 * n * tokens * grad_accum / (hardware.gpu_tflops * 1e12)  # fwd 2 + recompute 2 + bwd 4 flop
    # FP32 masters cast on the device, or compute-dtype bytes (cast on the host, or the optimizer's BF16 copy).
    up_bytes = 4.0 if device_cast else float(elt)
    streamed = n - n_res  # resident layers never cross PCIe and are updated on the GPU
    pcie_s = hardware.pcie_gbs * 1e9
    pcie = (2 * up_bytes * grad_accum + elt) * streamed / pcie_s  # weights up twice per micro-batch, grads once
    adam_rate = hardware.adam_gparams * 1e9
    adam = streamed / adam_rate
    # Resident layers as one block of the lowest layers need no transfers, and their compute does not hide
    # the streamed layers' uploads (the window prefetches only `window` layers ahead): only the streamed share
    # of the compute overlaps PCIe. Spread over the depth, every streamed layer's upload runs beside resident
    # compute, so the whole compute overlaps PCIe. Their AdamW runs on the GPU in backward. The deferred
    # schedule runs every update during the next forward instead. Checked against the H100 box's measured
    # steps (overlap: 1B/3B/8B, batch 8-32, 0-20 resident layers first or spread, with and without the BF16
    # copy; deferred: 8B b8 +3%, 1B b8 +38%, the host-side accumulation pass is not modelled): tests/test_planner.py.
    c_mb = compute / grad_accum
    res_share = n_res / n
    res_adam = n_res * 40 / (hardware.gpu_hbm_gbs * 1e9)
    res_cast = n_res * (4 + elt) / (hardware.gpu_hbm_gbs * 1e9) if cast else 0.0  # one pass, per micro-batch
    hidden_share = 0.0 if spread else res_share  # compute that cannot hide uploads
    fwd = res_cast + hidden_share * c_mb / 4 + max((1 - hidden_share) * c_mb / 4, streamed * up_bytes / pcie_s)
    bwd = (res_cast + hidden_share * 3 * c_mb / 4 + res_adam
           + max((1 - hidden_share) * 3 * c_mb / 4, streamed * max(up_bytes, elt) / pcie_s))
    tail_s = min(tail, streamed) / adam_rate
    if deferred:
        phases = max(fwd, adam) + bwd + (grad_accum - 1) * (fwd + bwd)
    else:
        phases = fwd + max(bwd, adam - tail_s) + tail_s
    times = {"gpu compute": compute, "pcie": pcie, "cpu adamw": adam}
    if disk_bytes:  # one disk: its reads and writes add up
        times["disk"] = disk_bytes / (hardware.disk_read_gbs * 1e9) + disk_bytes / (hardware.disk_write_gbs * 1e9)
    times["step"] = max(phases, *times.values())
    return times


def host_seconds(times: dict[str, float], hardware: Hardware) -> float:
    """The host's busy time of a step: its AdamW plus the copies' bytes through host memory, the two sharing one
    memory bus (measured on the H100 box: ~140-150 GB/s in all, AdamW alone or beside the copies; session 9 of
    performance_h100_202611.md). The copies' bytes are the PCIe term's, at the AdamW's bytes rate (28 B/param)."""
    bus = hardware.adam_gparams * 1e9 * 28
    return times["cpu adamw"] + times["pcie"] * hardware.pcie_gbs * 1e9 / bus


BACKWARD_SHARE = 0.75
"""The backward's share of a step's GPU compute: recompute 2 + backward 4 of the 8 flop per parameter and token."""


def park_backlog_bytes(times: dict[str, float], hardware: Hardware, *, host_params: int, elt: int) -> int:
    """Gradient bytes the overlap schedule's backward produces ahead of the host's AdamW: the host's busy time
    (``host_seconds``) left over when a backward at the GPU's pace ends, as a share of its ``host_params``
    gradients. A parking pool (``engine.grad_park_mib``) smaller than this fills mid-backward: from then on each
    slot is released only as AdamW frees chunks, so the backward runs at the host's pace and the host idles in the
    next forward once the pool's backlog is done (the 8B b8 on a 24 GiB cap on the H100 box, session 19 of
    benchmarks/results/performance_h100_202611.md: 419 ms of a 2.24 s step). There this estimate is ~7.8 GiB (5
    resident layers planned, 6 measured), and 8 and 12 GiB pools ran 1.79 / 1.81 s against 2 GiB's 1.95-2.06 s in
    one run."""
    host_s = host_seconds(times, hardware)
    if host_s <= 0:
        return 0
    return int(max(0.0, 1.0 - BACKWARD_SHARE * times["gpu compute"] / host_s) * host_params * elt)


HOST_BOUND_SHARE = 0.95
"""The head schedule counts a step as the host's where its busy time (``host_seconds``) is at least this share of
the GPU's compute: on the H100 box the 3B on a 24 GiB cap with 16 cast layers, planned at 0.374 s of host against
0.383 s of GPU, measured host-bound (0.426-0.439 s steps, the GPU's own 0.361 s): the blocked head 0.435 / 0.426
against the one-pass head's 0.444 / 0.461 s (session 14 of benchmarks/results/performance_h100_202611.md)."""


def pick_head_schedule(choice: str, *, tied: bool, on_gpu: bool, fused: bool, split: bool, host_s: float,
                       gpu_s: float, softcap: bool = False) -> str:
    """``engine.head_schedule`` of a plan: 'vocab' only where the tied embedding's split update consumes the head's
    blocks and the head does not soft-cap its logits (the engine then runs one pass: ``runtime/build.head_blocks``);
    'auto' takes it on a GPU with the fused loss kernel where the host's busy time reaches the GPU's compute
    (``HOST_BOUND_SHARE``: the head's extra matmul then hides behind the host; on a GPU-bound step it would add to
    it)."""
    if not (tied and split) or softcap or choice == "tokens":
        return "tokens"
    return "vocab" if choice == "vocab" or (on_gpu and fused and host_s >= HOST_BOUND_SHARE * gpu_s) else "tokens"
