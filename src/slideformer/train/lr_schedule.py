"""Learning rate as a pure function of the optimizer step: linear warmup, then cosine/linear/constant decay.

Invariant: ``lr_at(step)`` depends only on the config and ``step`` (no hidden state), so a resumed run
needs nothing but the step number to continue the schedule exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slideformer.train.args import ScheduleArgs


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each optimizer step of a run of ``total_steps`` steps."""

    peak_lr: float
    """optim.lr: the rate reached at the end of warmup."""
    total_steps: int
    """Number of optimizer steps in the run."""
    args: ScheduleArgs
    """Warmup length, decay shape, final ratio."""

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based).

        Warmup ramps linearly to ``peak_lr`` over ``warmup_steps`` steps, its first step already
        non-zero; the decay then reaches ``min_lr_ratio * peak_lr`` at the last step.
        """
        warmup = min(self.args.warmup_steps, max(self.total_steps - 1, 0))
        if step < warmup:
            return self.peak_lr * (step + 1) / (warmup + 1)
        floor = self.peak_lr * self.args.min_lr_ratio
        if self.args.decay == "constant":
            return self.peak_lr
        span = max(self.total_steps - 1 - warmup, 1)
        progress = min(max((step - warmup) / span, 0.0), 1.0)
        if self.args.decay == "linear":
            return floor + (self.peak_lr - floor) * (1.0 - progress)
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
