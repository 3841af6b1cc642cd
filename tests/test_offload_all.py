"""``engine.offload='all'``: the streamed decoder layers' FP32 masters on disk too train bitwise like all-in-RAM.

* Parity: losses, every parameter and every moment after several steps are *equal* with the masters and
  moments on disk and with everything in RAM (BF16 compute on the CPU, the reference without an upload copy),
  for the overlap schedule and the deferred one (clipping + 2 micro-batches), units spanning many pieces; the
  disk path really ran (no master in RAM for the decoder layers, 12 B/param of them moved each way per step)
  and the files are gone after close.
* Readers of the masters outside the optimizer: ``state_dict``/``load_state_dict`` and ``train.checkpoint``
  between an 'all' engine and an in-RAM one (both ways) continue bitwise; the train loop resumed through the
  files matches a straight run in RAM; ``hf_model`` is the trained model; the upload copies are the masters.
* Start-up (``from_config``/``from_pretrained``) writes each layer's master to disk as soon as it is filled:
  one layer's FP32 master in RAM at a time, the same weights as in RAM; a start-up that fails midway leaves
  no files.
* Accounting and configuration: ``memory_report`` drops the layers' masters; 'auto' picks 'all' only when the
  moments-only layout does not fit and a BF16 copy is possible; invalid combinations are ConfigErrors; the
  planner shows the tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.reference import make_model, tiny_config
from tests.test_offload import (
    _assert_checkpoints_continue_bitwise,
    _assert_equal_states,
    _assert_resume_through_disk_is_straight,
    _engine,
    _state,
    _train,
)

from slideformer import ConfigError, EngineConfig
from slideformer.memory.budget import choose_offload, engine_host_bytes
from slideformer.memory.disk_owner import SUFFIX

BF16 = dict(compute_dtype="bfloat16")


def _all(model: torch.nn.Module, directory: Path, **kw: object):
    return _engine(model, directory, offload="all", host_copy="bf16", **BF16, **kw)


def _check_layout(e) -> None:
    """Decoder layers: no master and no moments in RAM; embedding and head: the master in RAM."""
    for u in e.units[1:-1]:
        assert u.master_on_disk and u.flat is None and u.upload_copy is not None, u.name
        assert all(s.param.data.untyped_storage().nbytes() <= 4 for s in u.params), u.name  # the placeholder
        with pytest.raises(Exception, match="on disk"):
            u.master  # noqa: B018
    for u in (e.units[0], e.units[-1]):
        assert not u.master_on_disk and u.flat.numel() == u.numel, u.name


def _parity(tmp_path: Path, family: str, window: int, accumulate: int, max_norm: float | None,
            steps: int = 3, device: str = "cpu", **kw: object) -> None:
    cfg = tiny_config(family, layers=3)
    model = make_model(cfg)
    ram = _engine(model, None, device, window=window, max_norm=max_norm, **BF16, **kw)
    ram_losses = _train(ram, cfg.vocab_size, steps, accumulate, device)
    ram_state = _state(ram)
    ram.close()
    d = tmp_path / "off"
    off = _all(model, d, device=device, window=window, max_norm=max_norm, offload_prefetch=2, **kw)
    try:
        _check_layout(off)
        assert off.offload.piece < max(u.numel for u in off.units[1:-1])  # a layer spans several pieces
        off_losses = _train(off, cfg.vocab_size, steps, accumulate, device)
        assert off_losses == ram_losses
        _assert_equal_states(_state(off), ram_state)
        for u in off.units:  # what uploads read is the master, bitwise (round to nearest even)
            if u.upload_copy is not None:
                master = off.offload.mapped_masters().get(u.index, None)
                assert torch.equal(u.upload_copy, (u.master if master is None else master).to(torch.bfloat16))
        stats = off.memory_report()["disk"]
        layers = sum(u.numel for u in off.units[1:-1])
        total = sum(8 * u.numel for u in off.units) + 4 * layers
        assert stats["bytes_written"] >= steps * total + 4 * layers  # + the masters' first write
        assert stats["bytes_read"] >= (steps - 1) * total
    finally:
        off.close()
    assert not d.exists()


@pytest.mark.parametrize("family,window", [("llama", 1), ("llama", 2), ("llama_tied", 2)])
def test_overlap_schedule_is_bitwise_equal(tmp_path: Path, family: str, window: int) -> None:
    _parity(tmp_path, family, window, accumulate=1, max_norm=None)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_deferred_schedule_with_clipping_and_accumulation_is_bitwise_equal(tmp_path: Path, family: str) -> None:
    _parity(tmp_path, family, 2, accumulate=2, max_norm=0.5)


def test_checkpoints_between_all_on_disk_and_ram_continue_bitwise(tmp_path: Path) -> None:
    cfg = tiny_config("llama", layers=2)
    model = make_model(cfg)

    def check(off, ram, off2) -> None:
        # hf_model: the trained FP32 model (the layers' parameters are views of the files).
        ref = dict(ram.hf_model().named_parameters())
        for name, p in off.hf_model().named_parameters():
            assert torch.equal(p, ref[name]), name

    _assert_checkpoints_continue_bitwise(tmp_path, cfg.vocab_size, lambda d: _all(model, d),
                                         lambda: _engine(model, None, **BF16), _check_layout, check)


@pytest.mark.parametrize("extra", [{}, {"train__grad_accum": 2, "optim__max_grad_norm": 0.5}],
                         ids=["overlap", "deferred-accum-clip"])
def test_training_run_resumed_with_all_on_disk_matches_a_straight_run_in_ram(tmp_path: Path, extra: dict) -> None:
    """The train loop end to end: checkpoint save and resume through the offload files, bitwise."""
    _assert_resume_through_disk_is_straight(
        tmp_path, {"train__max_steps": 5, "engine__compute_dtype": "bfloat16", **extra},
        {"engine__offload": "all", "engine__host_copy": "bf16"}, stop_at=2)


def test_memory_report_drops_the_layers_masters(tmp_path: Path) -> None:
    cfg = tiny_config("llama", layers=3)
    model = make_model(cfg)
    moments = _engine(model, tmp_path / "m", host_copy="bf16", **BF16)
    off = _all(model, tmp_path / "a")
    try:
        a, m = off.memory_report(), moments.memory_report()
        layers = sum(u.numel for u in off.units[1:-1])
        outer = off.units[0].numel + off.units[-1].numel
        assert a["offload"] == "all" and a["masters_on_disk_params"] == layers
        assert a["host_state_bytes"] == 4 * outer + a["upload_copy_bytes"]
        assert m["host_state_bytes"] - a["host_state_bytes"] == 4 * layers
        assert a["offload_ring_bytes"] == 3 * m["offload_ring_bytes"] // 2  # a third part per piece
        assert len(list((tmp_path / "a").glob(f"*{SUFFIX}"))) == len(off.units)
    finally:
        off.close()
        moments.close()


def test_invalid_combinations_are_config_errors(tmp_path: Path) -> None:
    d = str(tmp_path / "x")
    with pytest.raises(ConfigError, match="host_copy"):
        EngineConfig(offload="all", offload_dir=d)  # host_copy defaults to 'none'
    with pytest.raises(ConfigError, match="compute_dtype"):
        EngineConfig(offload="all", offload_dir=d, host_copy="bf16", compute_dtype="float32")
    with pytest.raises(ConfigError, match="offload_dir"):
        EngineConfig(offload="all", host_copy="bf16")
    model = make_model(tiny_config("llama", layers=2))
    with pytest.raises(ConfigError, match="compute dtype"):  # 'auto' compute dtype is float32 on the CPU
        _engine(model, tmp_path / "y", offload="all", host_copy="auto")
    with pytest.raises(ConfigError, match="resident_layers"):
        _all(model, tmp_path / "z", resident_layers=1)
    assert not (tmp_path / "z").exists()
    e = _engine(model, tmp_path / "w", offload="all", host_copy="auto", **BF16)  # 'auto' copy: turned on
    try:
        assert e.host_copy and e.offload_mode == "all"
    finally:
        e.close()


def test_auto_picks_all_only_when_the_moments_layout_does_not_fit() -> None:
    def need(mode: str) -> dict[str, int]:
        return {"state": {"none": 12, "moments": 6, "all": 3}[mode] << 30}

    cfg = EngineConfig(offload="auto", offload_dir="/nvme", host_copy="auto")
    assert choose_offload(cfg, need, 20 << 30, allow_all=True) == "none"
    assert choose_offload(cfg, need, 8 << 30, allow_all=True) == "moments"
    assert choose_offload(cfg, need, 4 << 30, allow_all=True) == "all"
    assert choose_offload(cfg, need, 4 << 30, allow_all=False) == "moments"  # no BF16 copy possible
    # The engine's own byte counts: 'all' keeps 4 B/param of the embedding and head, 2 B/param of copies.
    eng = EngineConfig(device="cpu", offload="all", offload_dir="/nvme", host_copy="bf16", compute_dtype="bfloat16")
    got = engine_host_bytes(1000, [300, 300], 400, eng, False, 2, offload="all", largest_unit=400)
    assert got["embedding + head masters (4 B/param; the rest on disk)"] == 4 * 400
    assert got["BF16 upload copies (2 B/param, pinned)"] == 2 * 1000


@pytest.mark.parametrize("init", ["random", "load"])
@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_start_up_writes_each_layer_master_as_it_is_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           init: str, family: str) -> None:
    """``from_config`` / ``from_pretrained`` with 'all' never hold every layer's FP32 master at once: each
    layer's master goes to disk once its initial weights are complete; the result trains bitwise like the
    same start in RAM."""
    from slideformer import Engine, OptimConfig
    from slideformer.memory.offload import OffloadedMoments

    cfg = tiny_config(family, layers=4)
    model_dir = tmp_path / "model"
    if init == "load":
        make_model(cfg, seed=7).save_pretrained(str(model_dir), max_shard_size="100KB")  # several shards

    def build(**kw: object) -> Engine:
        ecfg = EngineConfig(device="cpu", loss_chunk_tokens=16, chunk_mib=1 / 64, **BF16, **kw)
        ocfg = OptimConfig(lr=1e-3, weight_decay=0.1)
        return (Engine.from_config(cfg, ecfg, ocfg, seed=3) if init == "random"
                else Engine.from_pretrained(str(model_dir), ecfg, ocfg))

    ram = build()
    ram_state, ram_losses = _state(ram), _train(ram, cfg.vocab_size, 2, 1)
    ram_trained = _state(ram)
    ram.close()

    live: list[int] = []  # layer masters in RAM each time one goes to disk
    store = OffloadedMoments.store_master

    def spy(self: OffloadedMoments, u, *args, **kwargs):
        live.append(sum(1 for v in self.units[1:-1] if v.flat is not None and not v.master_on_disk))
        return store(self, u, *args, **kwargs)

    monkeypatch.setattr(OffloadedMoments, "store_master", spy)
    off = build(offload="all", offload_dir=str(tmp_path / "off"), host_copy="bf16")
    try:
        _check_layout(off)
        assert len(live) == 4 and max(live) == 1  # one layer at a time, never the whole model
        _assert_equal_states(_state(off), ram_state)
        assert _train(off, cfg.vocab_size, 2, 1) == ram_losses
        _assert_equal_states(_state(off), ram_trained)
    finally:
        off.close()
    assert not (tmp_path / "off").exists()


def test_a_start_up_that_fails_midway_leaves_no_offload_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slideformer import Engine, OptimConfig
    from slideformer.errors import ModelPathError
    from slideformer.memory.offload import OffloadedMoments

    cfg = tiny_config("llama", layers=4)
    model_dir = tmp_path / "model"
    make_model(cfg, seed=7).save_pretrained(str(model_dir), max_shard_size="100KB")
    shards = sorted(model_dir.glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:100])  # the last shard is damaged
    stored: list[str] = []
    store = OffloadedMoments.store_master
    monkeypatch.setattr(OffloadedMoments, "store_master",
                        lambda self, u, *a, **k: (stored.append(u.name), store(self, u, *a, **k))[1])
    ecfg = EngineConfig(device="cpu", loss_chunk_tokens=16, chunk_mib=1 / 64, offload="all", host_copy="bf16",
                        offload_dir=str(tmp_path / "off"), **BF16)
    with pytest.raises(ModelPathError, match="truncated or corrupted shard"):
        Engine.from_pretrained(str(model_dir), ecfg, OptimConfig())
    assert stored  # layers had gone to disk before the damaged shard was reached
    assert not (tmp_path / "off").exists()  # and their files were removed with the directory
