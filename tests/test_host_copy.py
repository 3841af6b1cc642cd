"""``engine.host_copy``: the optimizer's pinned BF16 upload copy trains bitwise like uploads from the FP32 master.

* Parity (BF16 compute, the CPU playing the device): losses, every parameter and every moment *equal* with the
  copy on and off, overlap and deferred (clipping + 2 micro-batches) schedules, windows 1 and 2, tied and
  untied heads, units spanning many optimizer chunks; the disk tier combined with the copy; data-parallel
  gloo ranks (tests/test_dist_cpu.py has that case).
* The copy is really used: after training each uploaded unit's copy is bitwise ``master.to(bfloat16)``,
  corrupting one changes the forward, and a tied embedding's rows are gathered from it (a corrupt master does
  not reach them); an untied embedding (only its rows are gathered, from its master) and resident layers have
  none.
* Writes to the master outside the optimizer rebuild it (``load_state_dict``).
* The kernel's BF16 output rounds to nearest even exactly as ``Tensor.to(bfloat16)`` (ties included).
* Config: 'bf16' with FP32 compute is a ConfigError; 'auto' is off on the CPU and in FP32; the planner
  counts 2 B/param pinned and halves the upload bytes of a device-cast run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config

from slideformer import ConfigError, Engine, EngineConfig, OptimConfig
from slideformer.optim import cpu_adam
from slideformer.planner import Hardware, make_plan


def _engine(model: torch.nn.Module, host_copy: str, *, max_norm: float | None = None, dtype: str = "bfloat16",
            **kw: object) -> Engine:
    cfg = EngineConfig(device="cpu", compute_dtype=dtype, host_copy=host_copy, loss_chunk_tokens=16,
                       **{"chunk_mib": 1 / 64, **kw})
    return Engine(copy.deepcopy(model), cfg, OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=max_norm))


def _train(engine: Engine, vocab: int, steps: int, accumulate: int, seed: int = 4) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        mbs = [random_batch(vocab, 3, 11, gen) for _ in range(accumulate)]
        losses.append(engine.train_step(mbs if accumulate > 1 else mbs[0]).loss)
    return losses


def _state(engine: Engine) -> dict[str, dict[str, torch.Tensor]]:
    sd = engine.state_dict()
    return {part: {k: v.clone() for k, v in sd[part].items()} for part in ("params", "exp_avg", "exp_avg_sq")}


def _assert_equal(a: dict, b: dict) -> None:
    for part in a:
        assert set(a[part]) == set(b[part])
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)


def _off_and_on(make: Callable[[str], Engine], run: Callable[[Engine], list[float]],
                check: Callable[[Engine], object]) -> None:
    """``run`` on an engine without the copy and on one with it (then ``check`` it): bitwise the same."""
    results = []
    for host_copy in ("none", "bf16"):
        engine = make(host_copy)
        try:
            losses = run(engine)
            if host_copy == "bf16":
                check(engine)
            results.append((losses, _state(engine)))
        finally:
            engine.close()
    assert results[0][0] == results[1][0]
    _assert_equal(results[0][1], results[1][1])


def _check_copies(engine: Engine) -> int:
    """Every uploaded unit's copy is its master in BF16; returns how many units have one."""
    engine.flush()
    have = 0
    for u in engine.units:
        if u.upload_copy is not None:
            assert u.upload_copy.dtype == torch.bfloat16 and u.upload_copy.numel() == u.shard_len
            assert torch.equal(u.upload_copy, u.master.to(torch.bfloat16)), u.name
            have += 1
    return have


@pytest.mark.parametrize("family,window,accumulate,max_norm", [
    ("llama", 1, 1, None), ("llama", 2, 1, None), ("llama_tied", 1, 1, None), ("llama_tied", 2, 1, None),
    ("llama", 1, 2, 0.5), ("llama_tied", 2, 2, 0.5), ("qwen3", 2, 2, 0.5), ("qwen2", 1, 1, None),
])
def test_bitwise_equal_to_uploads_from_the_master(family: str, window: int, accumulate: int,
                                                 max_norm: float | None) -> None:
    cfg = tiny_config(family, layers=3)
    model = make_model(cfg)
    results = []
    for host_copy in ("none", "bf16"):
        engine = _engine(model, host_copy, max_norm=max_norm, window=window)
        try:
            losses = _train(engine, cfg.vocab_size, 4, accumulate)
            if host_copy == "bf16":
                tied = engine.parts.tied
                # Every layer and the head; the embedding only when tied (uploaded as part of the head).
                assert _check_copies(engine) == cfg.num_hidden_layers + 1 + int(tied)
                assert (engine.units[0].upload_copy is not None) == tied
                rep = engine.memory_report()
                assert rep["upload_cast"] == "copy" and rep["upload_copy_bytes"] > 0
            else:
                assert _check_copies(engine) == 0
            results.append((losses, _state(engine)))
        finally:
            engine.close()
    (l_off, s_off), (l_on, s_on) = results
    assert l_off == l_on
    _assert_equal(s_off, s_on)


def test_uploads_read_the_copy() -> None:
    """Corrupting a layer's copy changes the forward (so the CPU path really uploads from it)."""
    cfg = tiny_config("llama", layers=2)
    engine = _engine(make_model(cfg), "bf16", window=1)
    try:
        gen = torch.Generator().manual_seed(0)
        batch = random_batch(cfg.vocab_size, 2, 9, gen)
        engine.train_step(batch)
        before, _ = engine.eval_loss(batch)
        engine.flush()
        engine.units[1].upload_copy.mul_(0.5)
        after, _ = engine.eval_loss(batch)
        assert before != after
    finally:
        engine.close()


def test_tied_rows_are_gathered_from_the_copy() -> None:
    """A tied embedding's rows come from its BF16 copy (half the bytes, no cast pass): the gather returns the copy's
    rows bitwise, and corrupting the FP32 master does not reach it, while an untied embedding (no copy) reads its
    master."""
    for family in ("llama_tied", "llama"):
        cfg = tiny_config(family, layers=2)
        engine = _engine(make_model(cfg), "bf16", window=1)
        try:
            gen = torch.Generator().manual_seed(1)
            engine.train_step(random_batch(cfg.vocab_size, 2, 9, gen))
            engine.flush()
            u0 = engine.units[0]
            table = u0.master.view(cfg.vocab_size, cfg.hidden_size)
            ids = torch.tensor([3, 0, 3, cfg.vocab_size - 1])
            want = table[ids].to(torch.bfloat16)
            u0.master.mul_(2.0)  # a corrupt master: only a gather that reads it sees this
            out = torch.empty(ids.numel() * cfg.hidden_size, dtype=torch.bfloat16)
            scratch = torch.empty(out.numel(), dtype=torch.float32)
            landed: Future = Future()
            landed.set_result(None)
            engine.vocab_up.gather_rows(u0, cfg.vocab_size, ids, out, scratch, out, landed, [])
            got = out.view(ids.numel(), cfg.hidden_size)
            if family == "llama_tied":
                assert torch.equal(got, want)
            else:
                assert u0.upload_copy is None
                assert torch.equal(got, table[ids].to(torch.bfloat16))  # the corrupt master's rows
        finally:
            engine.close()


def test_load_state_dict_rebuilds_the_copy() -> None:
    """Weights loaded from another engine reach the copy: training on continues bitwise like without it."""
    cfg = tiny_config("llama_tied", layers=2)
    model = make_model(cfg)
    src = _engine(make_model(cfg, seed=7), "none")
    _train(src, cfg.vocab_size, 2, 1, seed=1)
    state = _state(src)
    state["unit_steps"] = [u.step for u in src.units]
    src.close()

    def run(engine: Engine) -> list[float]:
        _train(engine, cfg.vocab_size, 1, 1)  # the copy now holds this engine's own trained weights
        engine.load_state_dict(state)
        _check_copies(engine)  # rebuilt from the loaded masters (none without the copy)
        return _train(engine, cfg.vocab_size, 2, 1)

    _off_and_on(lambda c: _engine(model, c, window=1), run, _check_copies)


def test_resident_layers_have_no_copy() -> None:
    cfg = tiny_config("llama", layers=4)
    model = make_model(cfg)

    def check(engine: Engine) -> None:
        resident = {j + 1 for j in engine.resident_idx}
        assert all((u.upload_copy is None) == (u.index in resident or u.index == 0) for u in engine.units)
        _check_copies(engine)

    _off_and_on(lambda c: _engine(model, c, resident_layers=2, window=1),
                lambda engine: _train(engine, cfg.vocab_size, 3, 1), check)


@pytest.mark.parametrize("accumulate,max_norm", [(1, None), (2, 0.5)])
def test_with_the_disk_tier(tmp_path: Path, accumulate: int, max_norm: float | None) -> None:
    """The disk tier's optimizer path writes the copy too (same ``_apply`` / ``apply_accumulated``)."""
    cfg = tiny_config("llama_tied", layers=3)
    model = make_model(cfg)

    def check(engine: Engine) -> None:
        assert _check_copies(engine) > 0

    _off_and_on(lambda c: _engine(model, c, max_norm=max_norm, offload="moments", offload_dir=str(tmp_path / c)),
                lambda engine: _train(engine, cfg.vocab_size, 3, accumulate), check)


def test_fp32_compute_refuses_bf16_and_auto_is_off() -> None:
    cfg = tiny_config("llama", layers=2)
    model = make_model(cfg)
    with pytest.raises(ConfigError, match="host_copy"):
        _engine(model, "bf16", dtype="float32")
    for dtype in ("float32", "bfloat16"):  # 'auto' needs CUDA: off on the CPU whatever the dtype
        engine = _engine(model, "auto", dtype=dtype)
        try:
            assert engine.memory_report()["upload_cast"] != "copy"
            assert not engine.host_copy and all(u.upload_copy is None for u in engine.units)
        finally:
            engine.close()
    with pytest.raises(ConfigError, match="host_copy"):
        EngineConfig(host_copy="fp8")


def test_kernel_rounds_ties_to_nearest_even() -> None:
    """With lr=0 the update leaves the master unchanged, so ``out`` is the plain cast of chosen bit patterns:
    halfway cases (low 16 bits 0x8000) with even and odd BF16 mantissas, just above/below, and extremes."""
    hi = torch.tensor([0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x7F7F, 0x0001, 0x4049, 0x404A], dtype=torch.int32)
    lows = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF], dtype=torch.int32)
    bits = ((hi[:, None] << 16) | lows[None, :]).reshape(-1).repeat(40)  # > one SIMD vector, with a tail
    bits = torch.cat([bits, torch.tensor([0x7F7FFFFF, 0x00008000, 0x3F808000], dtype=torch.int32)])
    n = bits.numel()
    for path in ("kernel", "fallback"):
        param = bits.view(torch.float32).clone()
        out = torch.empty(n, dtype=torch.bfloat16)
        kw = dict(step=1, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  out=out)
        grad, m, v = torch.full((n,), 0.5), torch.zeros(n), torch.zeros(n)
        if path == "kernel":
            cpu_adam.adamw_step(param, grad, m, v, **kw)
        else:
            cpu_adam._torch_step(param, grad, m, v, grad_scale=1.0, scratch=None, **kw)
        assert torch.equal(param.view(torch.int32), bits), path
        assert torch.equal(out, param.to(torch.bfloat16)), path
        # And torch's cast is round-to-nearest-even: 1 + 2^-8 (a tie) -> 1.0, 1 + 3 * 2^-8 -> 1 + 2^-6.
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8], dtype=torch.float32).to(torch.bfloat16).float()
    assert ties.tolist() == [1.0, 1 + 2**-6]


def test_planner_counts_the_copy() -> None:
    cfg = tiny_config("llama", layers=4, hidden=256, vocab=4096)
    hw = Hardware(gpu_memory_bytes=80 * 2**30, host_memory_bytes=512 * 2**30)

    def plan(host_copy: str, host_gib: float = 512) -> object:
        return make_plan(cfg, seq_len=128, batch_size=2, grad_accum=1, clipping=False,
                         engine=EngineConfig(device="cuda", host_copy=host_copy),
                         hardware=Hardware(hw.gpu_memory_bytes, int(host_gib * 2**30)))

    off, on, auto = plan("none"), plan("bf16"), plan("auto")
    key = "BF16 upload copies of the masters (2 B/param)"
    copy_params = on.params["total"] - on.params["embedding"]  # untied: the embedding is only gathered
    assert on.pinned[key] == 2 * copy_params and key not in off.pinned
    assert on.host_total == off.host_total + 2 * copy_params
    assert on.gpu["FP32 upload rings (device cast)"] == 0 < off.gpu["FP32 upload rings (device cast)"]
    assert on.step_seconds["pcie"] < off.step_seconds["pcie"]
    assert auto.settings["host_copy"] == "bf16" and off.settings["host_copy"] == "none"
    assert "host_copy" in on.render()
    # 'auto' yields when the host RAM cannot hold the copy.
    tight = plan("auto", host_gib=off.host_total / 2**30 + 2 * copy_params / 2**30 / 2)
    assert tight.settings["host_copy"] == "none"
