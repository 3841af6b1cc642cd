"""``benchmarks/profile_step.py``'s instrumentation: the optimizer's ranges name the unit they served and still
land in the CPU-optimizer lane (the timeline's reading of which unit the GPU waited for depends on it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _profile_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports its sibling shapes.py
    try:
        spec = importlib.util.spec_from_file_location("bench_profile_step", ROOT / "benchmarks" / "profile_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


class _Unit:
    name = "layers.3"


def test_adamw_ranges_name_the_unit_and_stay_in_the_optimizer_lane() -> None:
    mod = _profile_step()
    seen: list[int] = []
    update = mod._ranged(lambda unit, lo: seen.append(lo), "sf/cpu_adamw")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        update(_Unit(), 0)
        update(7, 1)  # a first argument without a name keeps the plain range
    names = {e.name for e in prof.events()}
    assert seen == [0, 1]
    assert "sf/cpu_adamw/layers.3" in names and "sf/cpu_adamw" in names
    for name in ("sf/cpu_adamw/layers.3", "sf/cpu_adamw"):
        assert mod.lane_of({"cat": "user_annotation", "name": name}, set()) == "cpu_adamw"
