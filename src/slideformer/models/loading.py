"""Getting weights into the host layout: HF directories streamed shard by shard, or random init.

The model skeleton is built on the meta device (no memory), the engine allocates its flat buffers and
points the parameters at them, and only then are values written: read tensor by tensor from the
safetensors shards (``load_into``) or drawn by the model's own ``_init_weights`` (``random_init``).
Module buffers (RoPE frequencies) are materialised on the compute device.

Invariant: no second full copy of the model exists at any time; a missing or malformed directory is
reported before any large allocation; a shard whose tensors are not floating point or hold NaN/inf (a
corrupted file: HF shards carry no checksum) is an error, never a model that trains on garbage.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slideformer.errors import ConfigError, ModelPathError
from slideformer.memory.host_state import HostUnit
from slideformer.models import get_adapter
from slideformer.models.adapter import ModelParts


def meta_model(config: Any) -> nn.Module:
    """An HF CausalLM skeleton for ``config`` with every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    get_adapter(str(config.model_type))  # unsupported architectures fail before anything is built
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass
class WeightSource:
    """A local HF model directory: its config and the safetensors files that hold its weights."""

    path: Path
    config: Any
    files: list[Path]

    def load_into(self, units: list[HostUnit], prepare: Callable[[HostUnit], None] | None = None,
                  done: Callable[[HostUnit], None] | None = None) -> None:
        """Copy every parameter from the shards into the units' master buffers, one tensor at a time.

        ``prepare(unit)`` runs before a unit's first tensor is written, ``done(unit)`` after its last
        (data-parallel runs allocate and shard units as the files stream by).
        """
        from safetensors import SafetensorError, safe_open

        wanted = {spec.name: (u, spec) for u in units for spec in u.params}
        left = {u.index: len(u.params) for u in units}
        seen: set[str] = set()
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        if key not in wanted:
                            continue
                        u, spec = wanted[key]
                        t = f.get_tensor(key)
                        if tuple(t.shape) != tuple(spec.shape):
                            raise ModelPathError(f"{file.name}: {key} has shape {tuple(t.shape)}, the config "
                                                 f"implies {tuple(spec.shape)}; config.json and weights disagree")
                        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                            what = f"dtype {t.dtype}" if not t.is_floating_point() else "NaN or inf values"
                            raise ModelPathError(f"{file.name}: {key} holds {what}; the shard is corrupted "
                                                 "(or was saved from a diverged model)")
                        if prepare is not None and left[u.index] == len(u.params):
                            prepare(u)
                        u.view(u.master, spec).copy_(t)
                        if key not in seen:
                            seen.add(key)
                            left[u.index] -= 1
                            if done is not None and left[u.index] == 0:
                                done(u)
            except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
                if isinstance(exc, ModelPathError):
                    raise
                raise ModelPathError(f"cannot read {file}: {exc} (truncated or corrupted shard?)") from exc
        missing = sorted(set(wanted) - seen)
        if missing:
            raise ModelPathError(f"{self.path}: {len(missing)} parameters missing from the safetensors files, "
                                 f"e.g. {missing[:3]}")


def weight_source(path: str | Path) -> WeightSource:
    """Check a local HF model directory and describe it (reads only config.json and shard headers)."""
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelPathError(f"model directory {p} does not exist; pass a local Hugging Face model directory")
    if not p.is_dir():
        raise ModelPathError(f"{p} is not a directory; pass the directory holding config.json")
    if not (p / "config.json").is_file():
        raise ModelPathError(f"{p} has no config.json; is it a Hugging Face model directory?")
    try:
        json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelPathError(f"{p / 'config.json'} is unreadable: {exc}") from exc
    config = AutoConfig.from_pretrained(str(p))
    get_adapter(str(config.model_type))
    files = sorted(p.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin files: convert them to safetensors)" if list(p.glob("*.bin")) else ""
        raise ModelPathError(f"{p} has no *.safetensors weight files{hint}")
    return WeightSource(p, config, files)


def init_modules(model: nn.Module, params: set[int]) -> list[nn.Module]:
    """The modules ``random_init`` initialises, in its order: those whose own parameters are all in
    ``params`` (ids)."""
    if getattr(model, "_init_weights", None) is None:
        raise ConfigError(f"{type(model).__name__} has no _init_weights; build it on the CPU and pass it")
    return [m for m in model.modules()
            if (own := list(m.parameters(recurse=False))) and all(id(p) in params for p in own)]


def random_init(model: nn.Module, units: list[HostUnit]) -> None:
    """Apply the model's own initialiser to parameters that already alias the host buffers."""
    mods = init_modules(model, {id(spec.param) for u in units for spec in u.params})
    with torch.no_grad():
        for module in mods:
            model._init_weights(module)


def buffers_on(parts: ModelParts, device: torch.device) -> None:
    """Put the module buffers the compute needs (RoPE frequencies, ...) on ``device``.

    Buffers built on the meta device are materialised and filled by the model's initialiser.
    """
    model = parts.model
    modules = [m for m in ([parts.rotary] if parts.rotary is not None else []) + list(parts.layers.modules())
               + list(parts.norm.modules())]
    for module in modules:
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        if any(b.device.type == "meta" for b in own.values()):
            for name, b in own.items():
                module._buffers[name] = torch.empty_like(b, device=device)
            init = getattr(model, "_init_weights", None)
            if init is None:
                raise ConfigError(f"{type(module).__name__} has uninitialised buffers and no initialiser")
            with torch.no_grad():
                init(module)
        else:
            for name, b in own.items():
                module._buffers[name] = b.to(device)
