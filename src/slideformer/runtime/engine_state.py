"""An engine's training state as a state dict: reading it out and loading it back.

Owns the mapping between the engine's per-unit flat host state (``[master | exp_avg | exp_avg_sq]`` in
RAM, or views of the offload files for state on disk) and the HF-named ``params`` / ``exp_avg`` /
``exp_avg_sq`` dicts that checkpoints, resumes and exports use. Invariant: both directions run after
``flush`` (every scheduled update has landed), and a load leaves every derived copy consistent: the
resident layers' device state, the BF16 upload copies and the slots' cached weights are refreshed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slideformer.errors import ConfigError
from slideformer.memory.host_state import refresh_upload_copies
from slideformer.runtime.window import invalidate

if TYPE_CHECKING:
    from slideformer.runtime.engine import Engine


def host_state(e: Engine) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(master, exp_avg, exp_avg_sq) per unit index: host views, or views of the offload files (read
    through; every update has landed: after ``flush``)."""
    if e.offload is None:
        return {u.index: (u.master, u.exp_avg, u.exp_avg_sq) for u in e.units}
    e.offload.sync(e.cfg.watchdog_s)
    on_disk = e.offload.mapped_masters()
    return {i: (on_disk[i] if i in on_disk else e.units[i].master, m, v)
            for i, (m, v) in e.offload.mapped().items()}


def state_dict(e: Engine) -> dict[str, Any]:
    """``Engine.state_dict``: views, no copies (see there)."""
    e.flush()
    if e.dist is not None:
        return e.dist.state_dict(e)
    out: dict[str, Any] = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}, "step": e.step_count,
                           "unit_steps": [u.step for u in e.units]}
    state = host_state(e)
    for u in e.units:
        master, exp_avg, exp_avg_sq = state[u.index]
        for spec in u.params:
            out["params"][spec.name] = u.view(master, spec)
            out["exp_avg"][spec.name] = u.view(exp_avg, spec)
            out["exp_avg_sq"][spec.name] = u.view(exp_avg_sq, spec)
    return out


def load_state_dict(e: Engine, state: dict[str, Any]) -> None:
    """``Engine.load_state_dict``: missing params are an error, missing moments are zeros.

    ``state`` may be ``state_dict()``'s own views of the host buffers, already filled from a checkpoint
    (``train.resume`` does that): nothing here may write the host state before reading it, so the resident
    layers' device state is not flushed to the host first (it is replaced from the host below), and their
    deferred updates still pending are dropped (they belong to the state being replaced).
    """
    e.settle_host()
    if e.resident is not None:
        e.runner.resident_pending.clear()
    if e.dist is not None:
        e.dist.load_state_dict(e, state)
        if e.resident is not None:
            e.resident.load_from_host()  # this rank's loaded shards, then the other ranks' gathered
        refresh_upload_copies(e.units)
        invalidate(e.layer_pool.slots + [e.vocab_slot])
        return
    for key in ("params",):
        if key not in state:
            raise ConfigError(f"state dict has no {key!r} entry")
    views = host_state(e)
    for u in e.units:
        master, exp_avg, exp_avg_sq = views[u.index]
        for spec in u.params:
            for part, buf in (("params", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
                src = state.get(part, {}).get(spec.name)
                if src is None:
                    if part == "params":
                        raise ConfigError(f"state dict is missing parameter {spec.name}")
                    u.view(buf, spec).zero_()
                    continue
                if tuple(src.shape) != tuple(spec.shape):
                    raise ConfigError(f"{part}[{spec.name}] has shape {tuple(src.shape)}, "
                                      f"expected {tuple(spec.shape)}")
                u.view(buf, spec).copy_(src)
    if e.offload is not None:
        e.offload.commit_mapped()
    steps = state.get("unit_steps") or [int(state.get("step", 0))] * len(e.units)
    for u, s in zip(e.units, steps):
        u.step = int(s)
        u.version += 1
    if e.resident is not None:
        e.resident.load_from_host()
    refresh_upload_copies(e.units, {i: m for i, (m, _, _) in views.items()})
    invalidate(e.layer_pool.slots + [e.vocab_slot])
