"""Memory accounting: host bytes per parameter, and device buffers that do not grow with depth."""

from __future__ import annotations

import torch
from tests.reference import random_batch, tiny_config

from slideformer import Engine, EngineConfig, OptimConfig


def _engine(layers: int, **kw) -> Engine:
    cfg = tiny_config("llama", layers=layers, hidden=128, vocab=2048)
    return Engine.from_config(cfg, EngineConfig(device="cpu", **kw), OptimConfig(lr=1e-3))


def test_host_bytes_per_param_within_budget() -> None:
    eng = _engine(4)
    eng.train_step(random_batch(2048, 2, 16, torch.Generator().manual_seed(0)))
    rep = eng.memory_report()
    # FP32 master + two FP32 moments, nothing else per parameter (update-in-backward schedule).
    assert rep["bytes_per_param"] == 12.0
    assert rep["host_state_bytes"] == 12 * rep["num_params"]
    # Everything else is a fixed pool (staging) or activation checkpoints sized by the batch.
    assert rep["host_bytes"] - rep["host_state_bytes"] == rep["staging_bytes"] + rep["activation_host_bytes"]
    assert rep["activation_host_bytes"] == (4 - 1) * 2 * 16 * 128 * 4
    eng.close()


def test_deferred_schedule_adds_one_fp32_gradient() -> None:
    eng = _engine(2, schedule="deferred")
    eng.train_step(random_batch(2048, 2, 16, torch.Generator().manual_seed(0)))
    assert eng.memory_report()["bytes_per_param"] == 16.0
    eng.close()


def test_device_buffers_do_not_grow_with_layers() -> None:
    reports = []
    for layers in (4, 16):
        eng = _engine(layers)
        eng.train_step(random_batch(2048, 2, 16, torch.Generator().manual_seed(0)))
        reports.append(eng.memory_report())
        eng.close()
    assert reports[0]["device_bytes"] == reports[1]["device_bytes"]
    assert reports[0]["staging_bytes"] == reports[1]["staging_bytes"]
