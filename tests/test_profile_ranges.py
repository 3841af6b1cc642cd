"""The engine's host AdamW ranges name the unit they served (``optim.adamw.adamw_range``) and land in
``benchmarks/profile_step.py``'s CPU-optimizer lane: the timeline's reading of which unit the GPU waited for
(``benchmarks/timeline_read.py``) depends on it."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from tests.bench_modules import load
from tests.reference import make_model, tiny_config

from slideformer import Engine, EngineConfig, OptimConfig
from slideformer.runtime import embedding_split, grad_pipeline


@pytest.mark.parametrize("family,update", [("llama", "split"), ("llama_tied", "whole"), ("llama_tied", "split")])
def test_adamw_ranges_name_the_unit_and_stay_in_the_optimizer_lane(monkeypatch, family: str, update: str) -> None:
    names: list[str] = []

    @contextlib.contextmanager
    def recorded(name: str):
        names.append(name)
        yield

    for module in (grad_pipeline, embedding_split):  # the optimizer thread's ranges, recorded by name
        monkeypatch.setattr(module, "record_function", recorded)
    cfg = EngineConfig(device="cpu", embedding_update=update, chunk_mib=1 / 64)
    with Engine(copy.deepcopy(make_model(tiny_config(family, vocab=512))), cfg, OptimConfig(lr=1e-3)) as engine:
        for _ in range(2):
            engine.train_step({"input_ids": torch.randint(0, 512, (2, 16))})
        engine.flush()
        units = {u.name for u in engine.units}
    adamw = {n for n in names if n.startswith("sf/cpu_adamw")}
    assert {n.removeprefix("sf/cpu_adamw/") for n in adamw} == units  # every unit, each call named
    mod = load("profile_step")
    for name in adamw:
        assert mod.lane_of({"cat": "user_annotation", "name": name}, set()) == "cpu_adamw"
