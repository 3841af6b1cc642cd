"""A description of the run's environment: package versions, hardware, command line.

Owns ``run.json`` in the output directory, which benchmark reports and bug reports reuse. Invariant:
collecting it never fails the run (missing packages are reported as absent, not raised) and never
initialises CUDA when the run does not use it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

PACKAGES = (
    "slideformer",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "triton",
    "liger-kernel",
    "numpy",
)


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter to a run (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["slideformer"] is None:  # running from a source checkout (not pip-installed)
        import slideformer

        out["slideformer"] = f"{slideformer.__version__} (source)"
    out["cuda"] = torch.version.cuda
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, Any]:
    """CPU, memory and (when ``device`` is CUDA) GPU description."""
    vm = psutil.virtual_memory()
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "host_memory_gib": round(vm.total / 2**30, 2),
        "host_memory_available_gib": round(vm.available / 2**30, 2),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 2)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def write(out_dir: Path, device: torch.device, extra: dict[str, Any]) -> Path:
    """Write ``run.json`` (versions, hardware, argv, start time, plus ``extra``) and return its path."""
    info = {
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv,
        "versions": versions(),
        "hardware": hardware(device),
        **extra,
    }
    path = out_dir / "run.json"
    path.write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
    return path
