"""A small CPU training-run config for tests of the loop, checkpoints and resume (packaged tiny model)."""

from __future__ import annotations

from pathlib import Path

from slideformer.train.args import RunConfig
from slideformer.train.config_io import apply_override, from_dict


def tiny_run(out: Path, **overrides: object) -> RunConfig:
    """The default tiny run, short and quiet, writing to ``out``; ``a__b=v`` overrides ``a.b``."""
    tree: dict = {
        "data": {"seq_len": 32, "max_rows": 400, "val_fraction": 0.05},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 6, "progress_bar": False,
                  "eval_every": 0, "eval_batches": 2, "tensorboard": False, "plot": False, "log_every": 100},
        "engine": {"device": "cpu"},
    }
    for key, value in overrides.items():
        apply_override(tree, key.replace("__", "."), str(value))
    return from_dict(RunConfig, tree)
