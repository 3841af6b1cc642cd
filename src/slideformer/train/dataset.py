"""The run's dataset: the configured files -> its training and validation sequences.

Owns how a run's two splits are chosen and read: ``data.val_path`` when set, else a ``data.val_fraction``
split of the training rows by ``train.seed``; the built-in tiny dataset when no training path is given.
Invariant: the format is decided once, from the training file's first row, so both splits are read the
same way; ``train`` and the tools that reuse ``load_data`` see the same sequences for the same config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slideformer.train.args import RunConfig
from slideformer.train.data import Encoded, build_sequences, detect_format, split_rows
from slideformer.train.sources import DataError, read_rows


@dataclass
class _Data:
    train: list[Encoded]
    val: list[Encoded]
    summary: dict[str, Any]


def load_data(cfg: RunConfig, tokenizer: Any) -> _Data:
    """The run's training and validation sequences, exactly as `train` builds them (tools reuse it)."""
    from slideformer.train.args import builtin_asset_dir

    train_path = (
        Path(cfg.data.train_path).expanduser() if cfg.data.train_path else builtin_asset_dir() / "data.jsonl"
    )
    rows = read_rows(train_path, cfg.data.max_rows)
    if not rows:
        raise DataError(f"dataset {train_path} has no rows")
    # The format is decided once, from the file's first row, so both splits are read the same way.
    args = dataclasses.replace(cfg.data, format=detect_format(rows[0], cfg.data))
    if cfg.data.val_path:
        val_rows = read_rows(cfg.data.val_path, cfg.data.max_rows)
    else:
        rows, val_rows = split_rows(rows, cfg.data.val_fraction, cfg.train.seed)
    train, tstats = build_sequences(rows, tokenizer, args, str(train_path))
    val: list[Encoded] = []
    vstats = None
    if val_rows:
        val, vstats = build_sequences(
            val_rows, tokenizer, args, cfg.data.val_path or f"{train_path} (val split)"
        )
    summary = {"train_path": str(train_path), "train": vars(tstats), "val": vars(vstats) if vstats else None}
    return _Data(train, val, summary)
