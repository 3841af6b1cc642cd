"""AdamW over a unit's flat host buffers, one chunk at a time.

The engine hands this a slice ``[lo, hi)`` of a unit together with that slice's gradient (BF16 from a
pinned staging chunk, or the FP32 accumulator); it applies decoupled weight decay only to the
unit's matrix segment, as HF Trainer does (no decay on norms and biases).

Invariant: the arithmetic is ``torch.optim.AdamW``'s (bias correction, decoupled decay, eps outside
the square root), with the step count and learning rate fixed for the whole unit's update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slideformer.config import OptimConfig
from slideformer.memory.host_state import HostUnit
from slideformer.optim.cpu_adam import adamw_step


def adamw_range(unit: HostUnit) -> str:
    """The profiler range of a host AdamW call on ``unit``: ``sf/cpu_adamw/<unit name>`` (benchmarks/profile_step.py
    draws every ``sf/cpu_adamw`` range as the CPU optimizer's lane; timeline_read.py reads the unit from it)."""
    return f"sf/cpu_adamw/{unit.name}"


@dataclass(frozen=True)
class UpdateSpec:
    """What one unit update needs besides the gradient: frozen when the update is scheduled."""

    step: int
    lr: float
    grad_scale: float = 1.0


class FlatAdamW:
    """Applies AdamW to chunks of ``HostUnit`` buffers (called from the gradient worker thread)."""

    def __init__(self, cfg: OptimConfig) -> None:
        self.cfg = cfg

    def hyperparams(self, spec: UpdateSpec, decay: bool) -> dict[str, float | int]:
        """The AdamW keyword arguments of ``cpu_adam`` for one update (decayed or not)."""
        b1, b2 = self.cfg.betas
        return {"step": spec.step, "lr": spec.lr, "beta1": b1, "beta2": b2, "eps": self.cfg.eps,
                "weight_decay": self.cfg.weight_decay if decay else 0.0, "grad_scale": spec.grad_scale}

    def update(self, unit: HostUnit, lo: int, hi: int, grad: torch.Tensor, spec: UpdateSpec,
               out: torch.Tensor | None = None) -> None:
        """Update elements ``[lo, hi)`` of ``unit`` with ``grad`` (``hi - lo`` elements).

        ``out``, when given, receives the updated weights in the compute dtype (the next upload copy), written
        with non-temporal stores: the copy is read next by the GPU's DMA, not by this CPU, and skipping its
        read-for-ownership ran the kernel 5% faster at 16 threads on the H100 box's host (4.70 vs 4.47
        Gparam/s, 15% at 8; ``cpu_adam_h100host_202611.json``, variants ``ext_bf16_nt`` / ``ext_bf16``).
        """
        for s_lo, s_hi, decay in unit.decay_segments(lo, hi):
            a, b = s_lo - lo, s_hi - lo
            exp_avg, exp_avg_sq = unit.moment_slices(s_lo, s_hi)
            adamw_step(unit.master_slice(s_lo, s_hi), grad[a:b], exp_avg, exp_avg_sq,
                       out=None if out is None else out[a:b], stream_out=out is not None,
                       **self.hyperparams(spec, decay))
