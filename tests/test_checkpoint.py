"""Checkpoints: atomic layout with checksums, keep-last-K, disk full, corruption, and bitwise resume."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from tests.run_config import tiny_run

from slideformer.train import checkpoint, tensor_io
from slideformer.train.args import RunConfig
from slideformer.train.loop import train


def _fake_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (7, 3),
        "model.layers.0.mlp.up_proj.weight": (5, 3),
        "model.norm.weight": (3,),
    }
    return {
        part: {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        for part in ("params", "exp_avg", "exp_avg_sq")
    } | {"step": seed}


def _zeros_like(state: dict) -> dict:
    return {
        p: {n: torch.zeros_like(t) for n, t in state[p].items()} for p in ("params", "exp_avg", "exp_avg_sq")
    }


def test_save_load_roundtrip_and_manifest(tmp_path):
    state = _fake_state(3)
    path = checkpoint.save(
        tmp_path, 3, state, {"data": {"epoch": 0}}, lambda d: (d / "extra.txt").write_text("x")
    )
    assert path.name == "step-00000003" and not list(tmp_path.glob(".tmp-*"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "extra.txt",
    }
    assert manifest["files"]["model.safetensors"]["sha256"] == tensor_io.sha256_file(
        path / "model.safetensors"
    )
    target = _zeros_like(state)
    trainer = checkpoint.load(path, target)
    assert trainer["step"] == 3 and trainer["data"] == {"epoch": 0}
    for part in ("params", "exp_avg", "exp_avg_sq"):
        for name, t in state[part].items():
            assert torch.equal(target[part][name], t), (part, name)
    # plain safetensors: the library reads our streamed files
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(str(path / "model.safetensors"))["model.norm.weight"], state["params"]["model.norm.weight"]
    )


def test_keep_last_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, _fake_state(step), {}, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert checkpoint.latest(tmp_path).name == "step-00000004"
    assert checkpoint.resolve(tmp_path.parent / tmp_path.name).name == "step-00000004"


def test_disk_full_keeps_previous_checkpoint_loadable(tmp_path, monkeypatch):
    good = checkpoint.save(tmp_path, 1, _fake_state(1), {"marker": 1})
    real_write = tensor_io.write_file
    calls = []

    def failing_write(path, specs, metadata=None):
        calls.append(path.name)
        if path.name == "optimizer.safetensors":  # fail half-way through the checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, specs, metadata)

    monkeypatch.setattr(tensor_io, "write_file", failing_write)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"the disk is full; the previous checkpoint .*step-00000001 is intact",
    ):
        checkpoint.save(tmp_path, 2, _fake_state(2), {})
    assert calls == ["model.safetensors", "optimizer.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # no partial directory left
    target = _zeros_like(_fake_state(1))
    assert checkpoint.load(good, target)["marker"] == 1
    assert torch.equal(target["params"]["model.norm.weight"], _fake_state(1)["params"]["model.norm.weight"])


def test_corruption_and_incomplete_dirs_are_detected(tmp_path):
    path = checkpoint.save(tmp_path, 5, _fake_state(5), {})
    (tmp_path / ".tmp-step-00000006-1").mkdir()  # a crashed save
    (tmp_path / "step-00000007").mkdir()  # no manifest: not complete
    assert checkpoint.latest(tmp_path) == path
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(raw))
    checkpoint.verify(path, checksums=False)  # same size passes the cheap check
    with pytest.raises(checkpoint.CheckpointError, match="fails its SHA-256 check"):
        checkpoint.load(path, _zeros_like(_fake_state(5)))
    checkpoint.save(tmp_path, 8, _fake_state(8), {})
    assert not list(tmp_path.glob(".tmp-*"))  # stale temp dirs are cleaned by the next save


def _cfg(out: Path, **overrides: object) -> RunConfig:
    # This file's runs: 8 steps, eval every 3, the last 3 checkpoints kept (overridable per test).
    return tiny_run(out, **{"train__max_steps": 8, "train__eval_every": 3, "checkpoint__keep_last": 3, **overrides})


@pytest.mark.parametrize(
    "extra",
    [{}, {"train__grad_accum": 2, "optim__max_grad_norm": 0.5},
     # Resident layers: the resumed engine's device state must come from the checkpoint, not its start-up weights.
     {"engine__resident_layers": 1}, {"engine__resident_layers": 1, "optim__max_grad_norm": 0.5}],
    ids=["overlap", "deferred-accum-clip", "resident", "resident-clip"],
)
def test_resume_is_bitwise_identical(tmp_path, extra):
    straight = train(_cfg(tmp_path / "a", **extra))
    first = train(_cfg(tmp_path / "b", **extra), stop_at=4)
    assert first.steps == 4 and first.checkpoint.name == "step-00000004"
    second = train(_cfg(tmp_path / "b", train__resume="auto", **extra))
    assert second.steps == 8
    assert first.losses + second.losses == straight.losses
    assert straight.eval_losses == first.eval_losses + second.eval_losses
    a = straight.checkpoint
    b = second.checkpoint
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = tensor_io.read_all(a / name), tensor_io.read_all(b / name)
        assert ta.keys() == tb.keys()
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not diff, f"{name}: tensors differ after resume: {diff[:5]}"
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 9)]  # no duplicate steps


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    train(_cfg(tmp_path / "r", train__max_steps=1))
    from slideformer.errors import ConfigError

    with pytest.raises(ConfigError, match="already holds checkpoints; pass --resume"):
        train(_cfg(tmp_path / "r", train__max_steps=1))
