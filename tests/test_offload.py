"""The disk tier: AdamW moments in files under ``engine.offload_dir`` train bitwise like the all-in-RAM run.

* Parity: losses, every parameter and every moment after several steps are *equal* (not close) with the
  moments on disk and in RAM, for the overlap schedule and the deferred one (clipping + 2 micro-batches),
  windows 1 and 2, units spanning many chunks; and the disk path really ran (bytes moved, no moments in RAM).
* The ring alone: any order of pieces (mispredicted prefetches included) keeps every piece's newest data.
* Checkpoints: state_dict/load_state_dict read and write through the files, between offloaded and
  in-RAM engines, and through ``train.checkpoint`` save/load.
* Ownership and crash safety: files removed on close and at interpreter exit without close; a crashed
  run's directory (dead owner PID) is cleared with a log line; a live owner, an unwritable directory and a
  full disk give a ConfigError; a file system that refuses O_DIRECT falls back to buffered I/O with a warning.
* The GPU tests (``-m gpu``) check the same bitwise parity on CUDA in BF16, moments on disk and, with
  ``offload='all'``, the decoder layers' masters too (``tests/test_offload_all.py`` has the CPU tests of that tier).
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config
from tests.run_config import tiny_run

from slideformer import ConfigError, Engine, EngineConfig, OptimConfig
from slideformer.memory import disk
from slideformer.memory.budget import choose_offload
from slideformer.memory.disk import DiskStore
from slideformer.memory.disk_owner import OWNER_FILE, SUFFIX
from slideformer.memory.host_state import HostUnit
from slideformer.memory.offload import OffloadedMoments, file_bytes, key_of
from slideformer.train import checkpoint, tensor_io
from slideformer.train.loop import train

REPO = Path(__file__).resolve().parents[1]


def _engine(model: torch.nn.Module, directory: Path | None, device: str = "cpu", **kw: object) -> Engine:
    max_norm = kw.pop("max_norm", None)
    mode = kw.pop("offload", "moments") if directory is not None else None
    extra = dict(offload=mode, offload_dir=str(directory)) if directory is not None else {}
    cfg = EngineConfig(device=device, loss_chunk_tokens=16, **{"chunk_mib": 1 / 64, **kw, **extra})
    return Engine(copy.deepcopy(model), cfg, OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=max_norm))


def _batch(vocab: int, gen: torch.Generator, device: str) -> dict[str, torch.Tensor]:
    b = random_batch(vocab, 3, 11, gen)
    if device != "cpu":
        # Distinct token ids: the embedding's gradient scatter (index_add_) then adds one row per id, so its
        # CUDA atomics cannot reorder a sum and both engines see the same bits.
        ids = torch.randperm(vocab, generator=gen)[:b["input_ids"].numel()].view_as(b["input_ids"])
        b["labels"] = torch.where(b["labels"] == -100, b["labels"], ids)
        b["input_ids"] = ids
    return {k: v.to(device) for k, v in b.items()}


def _train(engine: Engine, vocab: int, steps: int, accumulate: int, device: str = "cpu",
           seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        mbs = [_batch(vocab, gen, device) for _ in range(accumulate)]
        losses.append(engine.train_step(mbs if accumulate > 1 else mbs[0]).loss)
    return losses


def _state(engine: Engine) -> dict[str, dict[str, torch.Tensor]]:
    sd = engine.state_dict()
    return {k: {n: t.detach().clone() for n, t in sd[k].items()} for k in ("params", "exp_avg", "exp_avg_sq")}


def _assert_equal_states(a: dict, b: dict) -> None:
    for part in ("params", "exp_avg", "exp_avg_sq"):
        assert set(a[part]) == set(b[part])
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)


def _parity(tmp_path: Path, family: str, window: int, accumulate: int, max_norm: float | None,
            device: str = "cpu", prefetch: int = 1, steps: int = 4, **kw: object) -> dict:
    cfg = tiny_config(family, layers=3)
    model = make_model(cfg)
    ram = _engine(model, None, device, window=window, max_norm=max_norm, **kw)
    ram_losses = _train(ram, cfg.vocab_size, steps, accumulate, device)
    ram_state = _state(ram)
    ram.close()
    off = _engine(model, tmp_path / "off", device, window=window, max_norm=max_norm, offload_prefetch=prefetch, **kw)
    try:
        assert all(u.flat.numel() == u.numel and u.moments is None for u in off.units)  # moments not in RAM
        off_losses = _train(off, cfg.vocab_size, steps, accumulate, device)
        assert off_losses == ram_losses
        _assert_equal_states(_state(off), ram_state)
        stats = off.memory_report()["disk"]
        total = sum(8 * u.numel for u in off.units)
        assert stats["bytes_written"] >= steps * total and stats["bytes_read"] >= (steps - 1) * total
    finally:
        off.close()
    return stats


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_overlap_schedule_is_bitwise_equal(tmp_path: Path, family: str, window: int) -> None:
    _parity(tmp_path, family, window, accumulate=1, max_norm=None)


@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_deferred_schedule_with_clipping_and_accumulation_is_bitwise_equal(tmp_path: Path, family: str,
                                                                          window: int) -> None:
    _parity(tmp_path, family, window, accumulate=2, max_norm=0.5)


def test_deep_prefetch_and_a_schedule_that_changes_between_steps(tmp_path: Path) -> None:
    """Prefetch deeper than the model and steps alternating overlap/deferred (every prediction wrong once)."""
    cfg = tiny_config("llama_tied", layers=2)
    model = make_model(cfg)
    results = []
    for d in (None, tmp_path / "off"):
        e = _engine(model, d, offload_prefetch=6)
        gen = torch.Generator().manual_seed(4)
        losses = [e.train_step([random_batch(cfg.vocab_size, 2, 9, gen) for _ in range(1 + k % 2)]).loss
                  for k in range(5)]
        results.append((losses, _state(e)))
        e.close()
    assert results[0][0] == results[1][0]
    _assert_equal_states(results[0][1], results[1][1])


def test_ring_keeps_the_newest_data_in_any_order(tmp_path: Path) -> None:
    """Pieces of 1024 elements bound in a random order (most prefetches mispredicted) and in the predicted one."""
    sizes = [300, 3000, 2, 4097, 50]
    units = [HostUnit(i, f"u{i}", [(f"p{i}", torch.nn.Parameter(torch.zeros(n)))]) for i, n in enumerate(sizes)]
    for u in units:
        u.allocate(False, moments_on_disk=True)
    store = DiskStore(tmp_path / "ring", {key_of(u): file_bytes(u) for u in units}, probe=False)
    ring = OffloadedMoments(units, store, prefetch=2, piece=1024)
    expect = {u.index: (torch.zeros(u.numel), torch.zeros(u.numel)) for u in units}
    gen = torch.Generator().manual_seed(0)

    def touch(u: HostUnit, lo: int, hi: int, value: float, direction: int) -> None:
        ring.enter(u, lo, hi, direction)
        m, v = u.moment_slices(lo, hi)
        assert torch.equal(m, expect[u.index][0][lo:hi]) and torch.equal(v, expect[u.index][1][lo:hi])
        for t in (m, v, expect[u.index][0][lo:hi], expect[u.index][1][lo:hi]):
            t.add_(value)

    try:
        for step in range(80):
            u = units[int(torch.randint(0, len(units), (1,), generator=gen))]
            lo = 1024 * int(torch.randint(0, -(-u.numel // 1024), (1,), generator=gen))
            touch(u, lo, min(lo + 1024, u.numel), float(step + 1), 1 if step % 3 else -1)
            if step % 2:
                ring.leave()
        misses = ring.demand_reads
        for direction in (1, -1):  # whole units in the predicted order: chunks of 512 inside pieces of 1024
            for u in units if direction > 0 else reversed(units):
                for lo in range(0, u.numel, 512):
                    touch(u, lo, min(lo + 512, u.numel), 0.5, direction)
                ring.leave()
        ring.sync()
        for u, (m, v) in zip(units, ring.mapped().values()):
            assert torch.equal(m, expect[u.index][0]) and torch.equal(v, expect[u.index][1])
        assert 0 < misses < 80 and ring.demand_reads - misses <= 2  # predicted: only the first of each pass
    finally:
        ring.close()


def _assert_checkpoints_continue_bitwise(tmp_path: Path, vocab: int, make_off: Callable[[Path], Engine],
                                         make_ram: Callable[[], Engine],
                                         loaded: Callable[[Engine], None] | None = None,
                                         check: Callable[[Engine, Engine, Engine], None] | None = None) -> None:
    """An offloaded engine trains 2 steps; its state goes into an in-RAM engine; a checkpoint of that is loaded
    into a second offloaded engine through its mapped files. All three then continue bitwise alike.
    ``loaded(off2)`` runs right after the load, ``check(off, ram, off2)`` on the trained engines."""
    engines = [make_off(tmp_path / "a")]
    try:
        off = engines[0]
        _train(off, vocab, 2, 1)
        engines.append(ram := make_ram())
        ram.load_state_dict(off.state_dict())  # offloaded -> RAM
        engines.append(off2 := make_off(tmp_path / "b"))
        path = checkpoint.save(tmp_path / "ckpt", 2, ram.state_dict(), {})
        sd = off2.state_dict()
        checkpoint.load(path, sd)  # writes into the mapped files
        sd["step"], sd["unit_steps"] = 2, None  # as train.resume.restore does (steps live in the trainer state)
        off2.load_state_dict(sd)
        if loaded is not None:
            loaded(off2)
        _assert_equal_states(_state(off2), _state(off))
        runs = [_train(e, vocab, 2, 1, seed=9) for e in engines]
        assert runs[0] == runs[1] == runs[2]
        states = [_state(e) for e in engines]
        _assert_equal_states(states[0], states[1])
        _assert_equal_states(states[0], states[2])
        if check is not None:
            check(off, ram, off2)
    finally:
        for e in engines:
            e.close()


def test_checkpoints_read_and_write_through_the_files(tmp_path: Path) -> None:
    cfg = tiny_config("llama", layers=2)
    model = make_model(cfg)
    _assert_checkpoints_continue_bitwise(tmp_path, cfg.vocab_size, lambda d: _engine(model, d),
                                         lambda: _engine(model, None))


@pytest.mark.parametrize("extra", [{}, {"train__grad_accum": 2, "optim__max_grad_norm": 0.5}],
                         ids=["overlap", "deferred-accum-clip"])
def test_training_run_resumed_with_moments_on_disk_matches_a_straight_run_in_ram(tmp_path: Path, extra: dict) -> None:
    """The train loop end to end: checkpoint save and resume through the offload files, bitwise."""
    _assert_resume_through_disk_is_straight(tmp_path, {"train__max_steps": 6, **extra},
                                            {"engine__offload": "moments"}, stop_at=3)


def _assert_resume_through_disk_is_straight(tmp_path: Path, base: dict, disk_opts: dict, stop_at: int) -> None:
    """A run stopped at ``stop_at`` and resumed with ``disk_opts`` (offload under tmp_path/off) gives the same
    losses and final checkpoint, bitwise, as a straight run in RAM; the offload directory is gone after."""
    disk_opts = {**disk_opts, "engine__offload_dir": str(tmp_path / "off")}
    straight = train(tiny_run(tmp_path / "ram", **base))
    first = train(tiny_run(tmp_path / "disk", **base, **disk_opts), stop_at=stop_at)
    second = train(tiny_run(tmp_path / "disk", **base, **disk_opts, train__resume="auto"))
    assert first.losses + second.losses == straight.losses
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (tensor_io.read_all(r.checkpoint / name) for r in (straight, second))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not (tmp_path / "off").exists()


def test_files_are_removed_on_close(tmp_path: Path) -> None:
    cfg = tiny_config("llama", layers=1)
    d = tmp_path / "keep"
    d.mkdir()
    (d / "user-file.txt").write_text("not ours")
    e = _engine(make_model(cfg), d)
    _train(e, cfg.vocab_size, 1, 1)
    assert len(list(d.glob(f"*{SUFFIX}"))) == len(e.units) and (d / OWNER_FILE).exists()
    e.close()
    assert sorted(p.name for p in d.iterdir()) == ["user-file.txt"]
    fresh = tmp_path / "fresh"
    e = _engine(make_model(cfg), fresh)
    e.close()
    assert not fresh.exists()  # a directory the store created is removed too


def _child(code: str, offload_dir: Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from tests.reference import make_model, random_batch, tiny_config
        from slideformer import Engine, EngineConfig
        cfg = tiny_config("llama", layers=1)
        e = Engine(make_model(cfg), EngineConfig(device="cpu", offload="moments", offload_dir={str(offload_dir)!r}))
        e.train_step(random_batch(cfg.vocab_size, 2, 8, torch.Generator().manual_seed(0)))
        e.flush()
    """) + code
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


def test_files_are_removed_at_exit_without_close(tmp_path: Path) -> None:
    d = tmp_path / "exit"
    proc = _child("print('trained')\n", d)
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr
    assert not d.exists()


def test_crashed_run_is_cleared_and_a_live_owner_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "crash"
    proc = _child("os._exit(3)\n", d)
    assert proc.returncode == 3, proc.stderr
    assert (d / OWNER_FILE).exists() and list(d.glob(f"*{SUFFIX}"))  # what a crash leaves behind
    cfg = tiny_config("llama", layers=1)
    with caplog.at_level(logging.WARNING, logger="slideformer.memory"):
        e = _engine(make_model(cfg), d)
    assert any("crashed" in r.getMessage() for r in caplog.records)
    try:
        _train(e, cfg.vocab_size, 1, 1)
        with pytest.raises(ConfigError, match="in use by a running process"):
            _engine(make_model(cfg), d)
    finally:
        e.close()
    assert list(d.iterdir()) == []  # the directory itself predates this engine: only its files go


def test_unwritable_directory_and_full_disk_are_config_errors(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config("llama", layers=1)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match="cannot be created"):
        _engine(make_model(cfg), not_a_dir / "sub")

    class Usage:
        free = 10 << 20

    monkeypatch.setattr(disk.shutil, "disk_usage", lambda _: Usage)
    with pytest.raises(ConfigError, match="GiB free"):
        _engine(make_model(cfg), tmp_path / "full")
    assert not (tmp_path / "full").exists()  # nothing left behind
    with pytest.raises(ConfigError, match="offload_dir"):
        EngineConfig(offload="moments")


def test_refused_o_direct_falls_back_to_buffered_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(disk.os, "open", no_direct)
    with pytest.warns(RuntimeWarning, match="refuses O_DIRECT"):
        stats = _parity(tmp_path, "llama", 2, accumulate=1, max_norm=None, steps=2)
    assert stats["o_direct"] is False


def test_io_errors_fail_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config("llama", layers=1)
    e = _engine(make_model(cfg), tmp_path / "eio")

    def broken(*_: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(disk.os, "preadv", broken)
    try:
        with pytest.raises(Exception, match="Input/output error"):
            _train(e, cfg.vocab_size, 2, 1)
            e.flush()
    finally:
        e.close()


def test_auto_offloads_only_when_ram_is_short(tmp_path: Path) -> None:
    cfg = tiny_config("llama", layers=2)
    model = make_model(cfg)
    roomy = _engine(model, None, offload="auto", offload_dir=str(tmp_path / "a"), host_memory_gib=64)
    assert roomy.offload_mode == "none" and roomy.offload is None
    roomy.close()
    # A budget below the all-in-RAM layout (the check is off: the margin alone exceeds this budget).
    tight = _engine(model, None, offload="auto", offload_dir=str(tmp_path / "b"), host_memory_gib=0.001,
                    check_host_memory=False)
    try:
        assert tight.offload_mode == "moments"
        assert tight.memory_report()["host_state_bytes"] == 4 * tight.num_params
    finally:
        tight.close()


def test_choose_offload_follows_the_budget() -> None:
    def need(mode: str) -> dict[str, int]:
        return {"state": (12 if mode == "none" else 4) << 30}

    cfg = EngineConfig(offload="auto", offload_dir="/nvme")
    assert choose_offload(cfg, need, 20 << 30) == "none"
    assert choose_offload(cfg, need, 10 << 30) == "moments"
    assert choose_offload(EngineConfig(offload="auto"), need, 10 << 30) == "none"  # no directory: RAM or error
    assert choose_offload(EngineConfig(offload="moments", offload_dir="/x"), need, 20 << 30) == "moments"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window,accumulate,max_norm", [(1, 1, None), (2, 1, None), (1, 2, 0.5), (2, 2, 0.5)])
def test_gpu_offload_is_bitwise_equal(tmp_path: Path, window: int, accumulate: int, max_norm: float | None) -> None:
    _parity(tmp_path, "llama_tied", window, accumulate, max_norm, device="cuda", steps=5, chunk_mib=1 / 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window,accumulate,max_norm", [(1, 1, None), (2, 1, None), (1, 2, 0.5), (2, 2, 0.5)])
def test_gpu_masters_on_disk_are_bitwise_equal(tmp_path: Path, window: int, accumulate: int,
                                               max_norm: float | None) -> None:
    """``engine.offload='all'`` on CUDA in BF16 (uploads from the BF16 copy) against all-in-RAM without a copy."""
    from tests.test_offload_all import _parity as parity_all

    parity_all(tmp_path, "llama_tied", window, accumulate, max_norm, device="cuda", steps=5, chunk_mib=1 / 16)
