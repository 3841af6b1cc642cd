"""Finding and opening the model a run fine-tunes: its directory, config, tokenizer, and the engine.

Owns the checks made before any large allocation: the model directory exists and is complete, the
tokenizer loads, and data.seq_len fits the model. Invariant: every failure here is a
``ModelPathError`` or ``ConfigError`` that names the path or field to fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from slideformer.errors import ConfigError, ModelPathError
from slideformer.train.args import RunConfig


def check_model_dir(path: Path, need_weights: bool) -> None:
    """Raise ModelPathError unless ``path`` holds config.json (and *.safetensors when ``need_weights``)."""
    if not path.exists():
        raise ModelPathError(
            f"model directory {path} does not exist (set model.path to a local Hugging Face model)"
        )
    if not path.is_dir():
        raise ModelPathError(f"model.path {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelPathError(f"model directory {path} has no config.json")
    if need_weights and not any(path.glob("*.safetensors")):
        raise ModelPathError(
            f"model directory {path} has no *.safetensors weights (convert .bin checkpoints to safetensors, "
            "or set model.random_init=true to train from scratch)"
        )


def load_hf_config(path: Path) -> Any:
    """The transformers config of the model directory."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ModelPathError(f"{path}/config.json could not be read: {e}") from e


def load_tokenizer(path: Path) -> Any:
    """The HF fast tokenizer of ``path``, with a pad token (EOS when the tokenizer defines none)."""
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise ModelPathError(f"tokenizer directory {path} does not exist (set model.tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ModelPathError(f"no usable tokenizer in {path}: {e}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelPathError(f"the tokenizer in {path} is not a fast tokenizer (tokenizer.json is needed)")
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def check_seq_len(cfg: RunConfig, hf_config: Any) -> None:
    """Raise ConfigError when data.seq_len exceeds the model's max_position_embeddings."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings={limit}; "
            "lower data.seq_len"
        )


def build_engine(cfg: RunConfig, hf_config: Any, dist: Any = None) -> Any:
    """An ``Engine`` holding the model: loaded from safetensors, or randomly initialised (seeded).

    ``dist``: the run's ``slideformer.dist.DistContext`` (data-parallel), or None.
    """
    from slideformer import Engine

    engine_cfg = cfg.engine
    if engine_cfg.resident_layers < 0:  # as many as fit: sized for this run's micro-batches (placement.py)
        updates: dict[str, Any] = {}
        if not engine_cfg.max_tokens_per_micro_batch:
            updates["max_tokens_per_micro_batch"] = cfg.train.batch_size * cfg.data.seq_len
        engine_cfg = dataclasses.replace(engine_cfg, **updates)
    if cfg.model.is_builtin or cfg.model.random_init:
        return Engine.from_config(hf_config, engine_cfg, cfg.optim, seed=cfg.train.seed, dist=dist)
    return Engine.from_pretrained(str(cfg.model.resolved_path()), engine_cfg, cfg.optim, dist=dist)
