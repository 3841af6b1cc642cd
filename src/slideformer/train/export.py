"""``slideformer export``: a training checkpoint -> a Hugging Face model directory.

Owns the exported layout: ``config.json`` (dtype updated), tokenizer files, ``generation_config.json``,
and the weights as safetensors shards (``model.safetensors``, or ``model-0000k-of-0000n.safetensors``
plus ``model.safetensors.index.json``). Invariant: tensors are read from the checkpoint and written to
the shards one at a time, so peak extra memory is one tensor, whatever the model size; the output is
loadable by ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from slideformer.errors import ConfigError
from slideformer.train import checkpoint, tensor_io

_NOT_EXPORTED = {
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
    "manifest.json",
    "run_config.yaml",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _export_dtype(dtype: str, config: dict[str, Any]) -> torch.dtype:
    if dtype == "auto":
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    if dtype not in _DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(_DTYPES)} or auto, got {dtype!r}")
    return _DTYPES[dtype]


def _shards(specs: list[tensor_io.TensorSpec], max_bytes: int) -> list[list[tensor_io.TensorSpec]]:
    shards: list[list[tensor_io.TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _write_model(out_dir: Path, specs: list[tensor_io.TensorSpec], config: dict[str, Any],
                 out_dtype: torch.dtype, max_shard_bytes: int) -> None:
    """Write ``specs`` as safetensors shards (+ index) and ``config.json`` with the exported dtype."""
    shards = _shards(specs, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        fname = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        tensor_io.write_file(out_dir / fname, shard, {"format": "pt"})
        weight_map.update({s.name: fname for s in shard})
    if n > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )
    config = dict(config)
    config.pop("dtype", None)
    config["torch_dtype"] = str(out_dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if not (out_dir / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(out_dir)))
        gen.save_pretrained(str(out_dir))


def _prepare(out_dir: Path, max_shard_bytes: int) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"export target {out_dir} exists and is not an empty directory")
    if max_shard_bytes < 1:
        raise ConfigError("max shard size must be positive")
    out_dir.mkdir(parents=True, exist_ok=True)


def _exported_names(names: list[str], config: dict[str, Any]) -> list[str]:
    if config.get("tie_word_embeddings") and "model.embed_tokens.weight" in names:
        return [n for n in names if n != "lm_head.weight"]  # HF re-ties it on load
    return names


def export(ckpt: Path, out_dir: Path, dtype: str = "auto", max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write checkpoint ``ckpt`` (or the newest one under a run/checkpoint directory) as an HF model.

    Args:
        ckpt: a checkpoint directory, a checkpoint root, or a run directory.
        out_dir: the model directory to create; it must be absent or empty.
        dtype: 'float32', 'bfloat16', 'float16', or 'auto' (the dtype named in config.json).
        max_shard_bytes: the largest shard; bigger models are split with an index file.

    Returns:
        ``out_dir``.
    """
    src = checkpoint.resolve(ckpt.expanduser())
    checkpoint.verify(src, checksums=False)
    _prepare(out_dir, max_shard_bytes)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    out_dtype = _export_dtype(dtype, config)
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _NOT_EXPORTED and path.name != "config.json":
            shutil.copyfile(path, out_dir / path.name)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        specs = []
        for name in _exported_names(list(f.keys()), config):
            shape = tuple(f.get_slice(name).get_shape())

            def get(name: str = name) -> torch.Tensor:
                return f.get_tensor(name)

            specs.append(tensor_io.TensorSpec(name, shape, out_dtype, get))
        _write_model(out_dir, specs, config, out_dtype, max_shard_bytes)
    return out_dir


def exported_values(params: dict[str, Any], config: dict[str, Any]) -> list[Any]:
    """The values ``export_engine`` reads, in its order (data-parallel ranks other than 0 read the same)."""
    return [params[n] for n in _exported_names(list(params), config)]


def export_engine(params: dict[str, Any], out_dir: Path, config: dict[str, Any],
                  write_extra: Callable[[Path], None] | None = None, dtype: str = "auto",
                  max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a live engine's weights (``Engine.state_dict()['params']``) straight to an HF model directory.

    This is the end-of-training export for models whose full checkpoint (12 B/param with the Adam
    moments) would not fit the disk: only the weights are written, in ``dtype``, one tensor at a time.
    ``write_extra`` adds the tokenizer and generation config; ``config.json`` is written from ``config``.
    """
    _prepare(out_dir, max_shard_bytes)
    out_dtype = _export_dtype(dtype, config)
    if write_extra is not None:
        write_extra(out_dir)
    specs = [checkpoint.value_spec(n, params[n], out_dtype) for n in _exported_names(list(params), config)]
    _write_model(out_dir, specs, config, out_dtype, max_shard_bytes)
    return out_dir
