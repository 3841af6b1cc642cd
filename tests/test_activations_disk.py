"""Activation checkpoints on disk (``engine.offload_activations``) train bitwise like the in-RAM store.

* Parity: losses, every parameter and every moment after several steps are *equal* (not close) with the
  checkpoints on disk and in RAM, for a tiny Llama and a tiny Qwen3, windows 1 and 2, the overlap schedule and
  the deferred one (clipping; clipping + 2 micro-batches), micro-batch sizes growing and shrinking between
  steps (so ``ensure`` re-sizes the ring and the file mid-run); the disk path really ran (bytes read back,
  layers found in the ring too, only the ring in RAM).
* Both tiers on: moments and checkpoints share one directory and owner file, bitwise as above.
* Errors: no ``offload_dir`` is a ConfigError; a failing write (ENOSPC) or read (EIO) fails the step with the
  file's path and the OS error, without hanging, and the files still go on close.
* The GPU test (``-m gpu``) checks the same bitwise parity on CUDA in BF16, windows 1-3, both schedules.
"""

from __future__ import annotations

import copy
import errno
from pathlib import Path

import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config
from tests.test_offload import _assert_equal_states, _state

from slideformer import ConfigError, Engine, EngineConfig, OptimConfig
from slideformer.memory import disk
from slideformer.memory.activations_disk import KEY, RING, DiskActivationStore
from slideformer.memory.disk_owner import OWNER_FILE, SUFFIX

SHAPES = [(2, 11), (3, 13), (1, 7), (3, 16), (2, 9)]
"""(batch, sequence) per step: the second and fourth steps grow the buffers, the others reuse them."""


def _engine(model: torch.nn.Module, directory: Path | None, device: str = "cpu", max_norm: float | None = None,
            **kw: object) -> Engine:
    extra = dict(offload_activations=True, offload_dir=str(directory)) if directory is not None else {}
    cfg = EngineConfig(device=device, loss_chunk_tokens=16, **{"chunk_mib": 1 / 64, **kw, **extra})
    return Engine(copy.deepcopy(model), cfg, OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=max_norm))


def _batch(vocab: int, bsz: int, seq: int, gen: torch.Generator, device: str) -> dict[str, torch.Tensor]:
    b = random_batch(vocab, bsz, seq, gen)
    if device != "cpu":
        # Distinct token ids: the embedding's gradient scatter (index_add_) then adds one row per id, so its
        # CUDA atomics cannot reorder a sum and both engines see the same bits.
        ids = torch.randperm(vocab, generator=gen)[:b["input_ids"].numel()].view_as(b["input_ids"])
        b["labels"] = torch.where(b["labels"] == -100, b["labels"], ids)
        b["input_ids"] = ids
    return {k: v.to(device) for k, v in b.items()}


def _train(engine: Engine, vocab: int, steps: int, accumulate: int, device: str = "cpu") -> list[float]:
    gen = torch.Generator().manual_seed(1)
    losses = []
    for k in range(steps):
        bsz, seq = SHAPES[k % len(SHAPES)]
        mbs = [_batch(vocab, bsz, seq - i, gen, device) for i in range(accumulate)]  # micro-batches differ too
        losses.append(engine.train_step(mbs if accumulate > 1 else mbs[0]).loss)
    return losses


def _parity(tmp_path: Path, family: str, window: int, accumulate: int, max_norm: float | None,
            device: str = "cpu", steps: int = 5, layers: int = 7, **kw: object) -> dict:
    cfg = tiny_config(family, layers=layers)
    model = make_model(cfg)
    ram = _engine(model, None, device, window=window, max_norm=max_norm, **kw)
    ram_losses = _train(ram, cfg.vocab_size, steps, accumulate, device)
    ram_state = _state(ram)
    ram.close()
    off = _engine(model, tmp_path / "acts", device, window=window, max_norm=max_norm, **kw)
    try:
        assert isinstance(off.acts, DiskActivationStore)
        off_losses = _train(off, cfg.vocab_size, steps, accumulate, device)
        assert off_losses == ram_losses
        _assert_equal_states(_state(off), ram_state)
        report = off.memory_report()
        stats = report["activation_disk"]
        largest = max(b * s for b, s in SHAPES[:steps])
        per_layer = -(-largest * cfg.hidden_size * off.acts.elt // 4096) * 4096
        assert report["activation_host_bytes"] == RING * per_layer  # only the ring is in RAM
        assert stats["activation_file_bytes"] == (layers - 1) * per_layer
        assert stats["bytes_written"] > 0 and stats["bytes_read"] > 0 and stats["cache_hits"] > 0
        assert (tmp_path / "acts" / f"{KEY}{SUFFIX}").exists()
    finally:
        off.close()
    assert not (tmp_path / "acts").exists()  # the file, the owner file and the directory the store created
    return stats


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("accumulate,max_norm", [(1, None), (1, 0.5), (2, 0.5)],
                         ids=["overlap", "deferred-clip", "deferred-accum-clip"])
def test_disk_checkpoints_are_bitwise_equal(tmp_path: Path, family: str, window: int, accumulate: int,
                                            max_norm: float | None) -> None:
    _parity(tmp_path, family, window, accumulate, max_norm)


def test_with_the_moments_on_disk_too_both_share_the_directory(tmp_path: Path) -> None:
    cfg = tiny_config("llama_tied", layers=6)
    model = make_model(cfg)
    ram = _engine(model, None, max_norm=0.5)
    ram_losses = _train(ram, cfg.vocab_size, 4, 2)
    ram_state = _state(ram)
    ram.close()
    d = tmp_path / "both"
    d.mkdir()
    (d / "user-file.txt").write_text("not ours")
    off = _engine(model, d, max_norm=0.5, offload="moments")
    try:
        assert off.acts.store is off.offload.store and not off.acts.owns_store
        assert _train(off, cfg.vocab_size, 4, 2) == ram_losses
        _assert_equal_states(_state(off), ram_state)
        names = {p.name for p in d.iterdir()}
        assert OWNER_FILE in names and f"{KEY}{SUFFIX}" in names
        assert len([n for n in names if n.endswith(SUFFIX)]) == len(off.units) + 1
        assert off.memory_report()["activation_disk"]["bytes_read"] > 0
    finally:
        off.close()
    assert sorted(p.name for p in d.iterdir()) == ["user-file.txt"]


def test_needs_an_offload_dir() -> None:
    with pytest.raises(ConfigError, match="offload_activations needs engine.offload_dir"):
        EngineConfig(offload_activations=True)
    EngineConfig(offload_activations=True, offload_dir="/nvme/x")  # fine


@pytest.mark.parametrize("call,code", [("pwritev", errno.ENOSPC), ("preadv", errno.EIO)])
def test_io_errors_fail_the_step_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str,
                                         code: int) -> None:
    cfg = tiny_config("llama", layers=7)
    d = tmp_path / "err"
    e = _engine(make_model(cfg), d, watchdog_s=60.0)  # a hang would fail after 60 s instead of blocking the suite
    path = d / f"{KEY}{SUFFIX}"
    try:
        _train(e, cfg.vocab_size, 1, 1)

        def broken(*_: object) -> int:
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Input/output error")

        monkeypatch.setattr(disk.os, call, broken)
        with pytest.raises(disk.DiskError, match=str(path)) as info:
            _train(e, cfg.vocab_size, 3, 1)
        message = str(info.value)
        assert "activation checkpoint" in message and f"[Errno {code}]" in message
        with pytest.raises(Exception, match="an earlier step failed"):
            _train(e, cfg.vocab_size, 1, 1)
    finally:
        monkeypatch.undo()
        e.close()
    assert not d.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("accumulate,max_norm", [(1, None), (2, 0.5)], ids=["overlap", "deferred-accum-clip"])
def test_gpu_disk_checkpoints_are_bitwise_equal(tmp_path: Path, window: int, accumulate: int,
                                                max_norm: float | None) -> None:
    stats = _parity(tmp_path, "llama", window, accumulate, max_norm, device="cuda", steps=5, layers=8,
                    compute_dtype="bfloat16", chunk_mib=1 / 16)
    assert stats["cache_hits"] > 0


def test_the_plan_counts_only_the_ring() -> None:
    from slideformer.planner import checkpoint_layers

    assert checkpoint_layers(EngineConfig(), 32) == 31
    assert checkpoint_layers(EngineConfig(offload_activations=True, offload_dir="/nvme"), 32) == RING
    assert checkpoint_layers(EngineConfig(offload_activations=True, offload_dir="/nvme"), 3) == 2
