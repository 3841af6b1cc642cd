"""The ``slideformer plan`` command's inputs: a run config and flags turned into a ``Plan``, plus suggestions.

Owns how the command reads the machine (GPU and host memory, free disk space where the offload directory
lives) and the run (YAML config, ``--model``, overrides), and which settings it suggests: ones the plan
leaves off that the same model is predicted to run faster with and that still fit. Invariant: the numbers
themselves all come from ``planner.make_plan``; nothing here estimates a byte or a second of its own.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import torch

from slideformer.config import EngineConfig
from slideformer.errors import ConfigError, ModelPathError
from slideformer.planner import CUDA_CONTEXT_BYTES, GIB, Hardware, Plan, make_plan


def _free_bytes(directory: str) -> int:
    """Free bytes of the file system that holds (or will hold) ``directory``."""
    path = Path(directory).expanduser().resolve()
    while not path.exists():
        path = path.parent
    return int(shutil.disk_usage(path).free)


def _gpu_memory_default() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return 80 * GIB


def _gpu_memory_bytes(ns: argparse.Namespace, engine: EngineConfig) -> int:
    """The GPU memory the plan is for, as the card's whole memory (``make_plan`` takes the CUDA context out of it):
    ``--gpu-memory-gib``; else the config's ``engine.gpu_memory_gib``, which is the engine's own budget beside the
    context (``placement.engine_resident_count``), so the context is added back and the plan counts the resident
    layers the run will keep; else the visible GPU, else 80 GiB."""
    if ns.gpu_memory_gib:
        return int(ns.gpu_memory_gib * GIB)
    if engine.gpu_memory_gib:
        return int(engine.gpu_memory_gib * GIB) + CUDA_CONTEXT_BYTES
    return _gpu_memory_default()


def plan_from_args(ns: argparse.Namespace) -> Plan:
    """The plan for ``slideformer plan`` arguments (a YAML config and/or --model and overrides)."""
    from slideformer.train.args import RunConfig
    from slideformer.train.config_io import apply_override, from_dict, load_yaml
    from slideformer.train.model_loading import load_hf_config

    tree = load_yaml(ns.config) if ns.config else {}
    for key, value in getattr(ns, "unknown_overrides", []):  # train's --section.key=value, applied the same way
        apply_override(tree, key, value)
    cfg = from_dict(RunConfig, tree)
    model = Path(ns.model).expanduser() if ns.model else cfg.model.resolved_path()
    if model.is_file() and model.name.endswith(".json"):
        model = model.parent
    if not (model / "config.json").is_file():
        raise ModelPathError(f"{model} has no config.json (pass --model DIR or a config with model.path)")
    engine = cfg.engine
    window = ns.window if ns.window is not None else engine.window
    if window < 1:
        raise ConfigError("--window must be >= 1")
    overrides: dict[str, Any] = {"window": window}
    if ns.offload is not None:
        overrides["offload"] = ns.offload
    if ns.offload_dir is not None:
        overrides["offload_dir"] = ns.offload_dir
    if getattr(ns, "host_copy", None) is not None:
        overrides["host_copy"] = ns.host_copy
    if getattr(ns, "offload_activations", False):
        overrides["offload_activations"] = True
    engine = EngineConfig(**{**asdict(engine), **overrides})
    clip = ns.max_grad_norm if ns.max_grad_norm is not None else cfg.optim.max_grad_norm
    hw = Hardware(
        gpu_memory_bytes=_gpu_memory_bytes(ns, engine),
        host_memory_bytes=int(ns.host_memory_gib * GIB)
        if ns.host_memory_gib
        else psutil.virtual_memory().total,
        disk_free_bytes=_free_bytes(engine.offload_dir) if engine.offload_dir else None,
    )
    kwargs = dict(seq_len=ns.seq_len or cfg.data.seq_len, batch_size=ns.batch_size or cfg.train.batch_size,
                  grad_accum=ns.grad_accum or cfg.train.grad_accum, clipping=clip is not None and clip > 0,
                  hardware=hw, keep_checkpoints=cfg.checkpoint.keep_last)
    hf_config = load_hf_config(model)
    nodes = getattr(ns, "nnodes", None) or 1
    world = (getattr(ns, "nproc_per_node", None) or 1) * nodes
    if world > 1:
        from slideformer.plan_dist import data_parallel_plan

        return data_parallel_plan(hf_config, world=world, nodes=nodes, engine=engine, **kwargs)
    plan = make_plan(hf_config, engine=engine, **kwargs)
    plan.notes.extend(_suggestions(hf_config, engine, kwargs, plan))
    return plan


def _suggestions(hf_config: Any, engine: EngineConfig, kwargs: dict[str, Any], plan: Plan) -> list[str]:
    """Settings this plan leaves off that the same model predicts faster with, and that still fit."""
    if engine.device == "cpu" or engine.offload == "moments":
        return []
    out = []
    options = [("engine.resident_layers=-1", {"resident_layers": -1}) if engine.resident_layers == 0 else None,
               ("engine.host_copy=bf16", {"host_copy": "bf16"}) if engine.host_copy == "none" else None]
    for label, change in filter(None, options):
        alt = make_plan(hf_config, engine=EngineConfig(**{**asdict(engine), **change}), **kwargs)
        faster = alt.step_seconds["step"] < 0.97 * plan.step_seconds["step"]
        if alt.fits and faster:
            extra = (f"{alt.settings['resident_layers']} layers resident, "
                     if "resident_layers" in change else f"+{(alt.host_total - plan.host_total) / GIB:.1f} GiB "
                                                         "of pinned host RAM, ")
            out.append(f"suggestion: {label} ({extra}predicted step {alt.step_seconds['step']:.2f} s instead of "
                       f"{plan.step_seconds['step']:.2f} s)")
    return out
