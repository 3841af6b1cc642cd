"""The step's global gradient norm and its clip coefficient, computed on the optimizer thread.

Owns how the two halves of the squared norm meet: the host-updated units' squares (``HostUnit.sq_norm``, summed by
the gradient pipeline as it consumes them, over ranks when data-parallel) and the device-side square of the
resident units (or of every unit, when the norm is taken on the device), copied to a page-locked pair behind the
step's backward. Invariant: it runs after every gradient of the step was consumed (a task of the gradient
pipeline), and reads the device-side pair only after the copy's event (``sq_ready``) completed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from slideformer.memory.host_state import HostUnit
from slideformer.runtime.device import DeviceOps
from slideformer.runtime.grad_pipeline import GradPipeline


def clip_coefficient(drain: GradPipeline, ops: DeviceOps, units: list[HostUnit], resident_units: set[int],
                     max_norm: float | None, host_norm: bool, sq_host: torch.Tensor,
                     sq_ready: Any) -> tuple[float, float]:
    """(global norm, clip coefficient): ``host_norm``: the host-updated units' squares plus the resident units'
    device-side one (``sq_host[1]``); else the device-side square of all (``sq_host[0]``)."""
    if host_norm:
        sq = drain.global_sq([u for u in units if u.index not in resident_units])
        if resident_units:
            ops.host_wait(sq_ready)  # the copy of the resident units' device-side norm has landed
            sq += float(sq_host[1])
    else:
        ops.host_wait(sq_ready)  # the copy of the device-side norm has landed
        sq = float(sq_host[0])
    total = math.sqrt(sq)
    if max_norm is None:
        return total, 1.0
    # torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1.
    return total, min(1.0, max_norm / (total + 1e-6))
