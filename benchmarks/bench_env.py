"""The machine a benchmark ran on, for its record: GPU, CPU, RAM, versions of the packages that matter, git commit.

Owns ``environment`` (written into every result JSON's ``meta``) and ``gpu_name``. Invariant: reads the machine only;
a tool or package that is missing reads as None, never an error.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA context is created in the parent)."""
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def environment(repo_root: Path) -> dict[str, Any]:
    """Hardware, software versions and the git commit, read by the parent before any child runs.

    GPU facts come from nvidia-smi, so the parent never holds a CUDA context (and its memory).
    """
    import psutil
    import torch

    gpu: dict[str, Any] = {"name": gpu_name(), "cuda": torch.version.cuda}
    gpu["nvidia_smi"] = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current,clocks.max.sm",
            "--format=csv,noheader",
        ]
    )
    return {
        "gpu": gpu,
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": psutil.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "ram_bytes": psutil.virtual_memory().total,
        },
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            p: _version(p)
            for p in (
                "torch",
                "transformers",
                "deepspeed",
                "liger-kernel",
                "triton",
                "slideformer",
                "psutil",
                "matplotlib",
            )
        },
        "git_commit": _run(["git", "-C", str(repo_root), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_run(["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"])),
    }
