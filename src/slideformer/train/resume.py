"""Resuming a run: which checkpoint it continues from, and the trainer state saved and put back.

Owns ``trainer_state.json``'s contents beside the engine state (data position, RNG states, schedule
length, non-finite streak, per-unit optimizer steps, last loss) and the ``train.resume`` choice: ``""``
refuses a checkpoint directory that already holds checkpoints, ``"auto"`` takes the latest one, anything
else names a checkpoint. Invariant: ``restore`` puts back exactly what ``capture`` took (the RNG states
byte for byte), so a resumed run continues as the uninterrupted run would have; trainer state that does
not fit is a ``CheckpointError``, never a half-restored run.
"""

from __future__ import annotations

import ast
import base64
import random
from pathlib import Path
from typing import Any

import torch

from slideformer.errors import ConfigError, SlideformerError
from slideformer.train import checkpoint
from slideformer.train.args import RunConfig
from slideformer.train.data import BatchStream


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


def resume_source(cfg: RunConfig, ckpt_root: Path) -> Path | None:
    """The checkpoint this run continues from (None: a fresh run), as ``train.resume`` asks."""
    if cfg.train.resume == "":
        if checkpoint.latest(ckpt_root) is not None:
            raise ConfigError(
                f"{ckpt_root} already holds checkpoints; pass --resume to continue that run, or choose "
                "another "
                "train.output_dir"
            )
        return None
    if cfg.train.resume == "auto":
        return checkpoint.latest(ckpt_root)
    return checkpoint.resolve(Path(cfg.train.resume).expanduser())


def capture(
    engine: Any, stream: BatchStream, *, total_steps: int, streak: int, last_loss: float | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The engine state and the trainer state to save after a step (``restore`` puts both back)."""
    st = dict(
        data=stream.state_dict(),
        rng=_rng_state(),
        total_steps=total_steps,
        nonfinite_streak=streak,
        unit_steps=None,
        last_loss=last_loss,
    )
    sd = engine.state_dict()
    st["unit_steps"] = [int(s) for s in sd.get("unit_steps", [])] or None
    return sd, st


def restore(path: Path, engine: Any, stream: BatchStream, verify: bool = True) -> tuple[int, int]:
    """Load checkpoint ``path`` into ``engine``, ``stream`` and the RNGs; return (step, non-finite streak).

    Raises:
        CheckpointError: the checkpoint is damaged or does not belong to this model and data (anything
            malformed that got past the manifest, e.g. with ``verify`` off, is reported the same way).
    """
    sd = engine.state_dict()
    state = checkpoint.load(path, sd, verify)
    try:
        sd["step"], sd["unit_steps"] = int(state["engine_step"]), state.get("unit_steps")
        engine.load_state_dict(sd)
        stream.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        return int(state["step"]), int(state.get("nonfinite_streak", 0))
    except (KeyError, TypeError, ValueError, SyntaxError, RuntimeError, AttributeError) as e:
        if isinstance(e, SlideformerError) and not isinstance(e, ConfigError):
            raise
        raise checkpoint.CheckpointError(
            f"{path}: trainer_state.json is damaged or belongs to another run ({type(e).__name__}: {e})"
        ) from e
