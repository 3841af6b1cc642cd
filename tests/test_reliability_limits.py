"""Resource limits: a refused pinned allocation falls back to pageable memory with one costed warning;
the host RAM an engine needs is checked against what is available before anything is allocated; the
same seed and data give bitwise-identical engine runs on the CPU."""

from __future__ import annotations

import threading
import warnings
from types import SimpleNamespace

import psutil
import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config

from slideformer import Engine, EngineConfig, HostMemoryError, OptimConfig, SlideformerError
from slideformer.memory.budget import HOST_MARGIN_MIN_BYTES, engine_host_bytes
from slideformer.memory.host_state import HostUnit
from slideformer.runtime.device import DeviceOps


def _fake_cuda_ops() -> DeviceOps:
    """A DeviceOps that believes it is on CUDA and pins its host buffers (no GPU needed)."""
    ops = DeviceOps(torch.device("cpu"))
    ops.is_cuda, ops.pin = True, True
    return ops


@pytest.fixture
def pinning_refused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """torch.empty raises as CUDA does when page-locking fails; returns the list of refused sizes."""
    real_empty = torch.empty
    refused: list[int] = []

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        if kwargs.get("pin_memory"):
            refused.append(int(args[0]))  # type: ignore[call-overload]
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc failed)")
        return real_empty(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(torch, "empty", empty)
    return refused


def test_refused_pinned_allocation_falls_back_with_one_costed_warning(pinning_refused):
    ops = _fake_cuda_ops()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ops.host_empty(1024, torch.bfloat16)
        b = ops.host_empty(4096, torch.float32)
    assert pinning_refused == [1024, 4096]  # both tried pinned first
    assert (a.numel(), a.dtype, b.numel(), b.dtype) == (1024, torch.bfloat16, 4096, torch.float32)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    msg = str(runtime[0].message)
    for needle in ("memlock", "WSL", "5.4 GB/s", "55 GB/s", "pageable", "cudaHostAlloc failed"):
        assert needle in msg, f"{needle!r} missing from: {msg}"
    assert ops.pinned_fallbacks == 2
    assert ops.pageable_fallback_bytes == 1024 * 2 + 4096 * 4
    assert ops.pinned_bytes == 0


def test_pinned_allocation_that_succeeds_is_counted_as_pinned(monkeypatch):
    ops = _fake_cuda_ops()
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **{**k, "pin_memory": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.host_empty(256, torch.float32)
    assert (ops.pinned_bytes, ops.pinned_fallbacks) == (1024, 0)


def test_non_runtime_errors_are_not_swallowed(monkeypatch):
    ops = _fake_cuda_ops()

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        raise TypeError("bad dtype")

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(TypeError):
        ops.host_empty(16, torch.float32)


# -- host RAM ---------------------------------------------------------------------------------------
def _available(monkeypatch: pytest.MonkeyPatch, nbytes: int) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=nbytes, total=nbytes))


def _need(cfg: EngineConfig, layers: int = 2) -> int:
    """What the engine should count for tiny_config('llama', layers): from a real engine's units."""
    with Engine.from_config(tiny_config("llama", layers=layers), cfg) as eng:
        n = eng.num_params
        layer_numels = [u.numel for u in eng.units[1:-1]]
        vocab = eng.vocab_slot.weight.numel()
        report = eng.memory_report()
    need = engine_host_bytes(n, layer_numels, vocab, cfg, on_cuda=False, elt=4)
    # The count matches what the engine really allocates (state and staging; slots = device bytes).
    assert need["master weights + Adam moments (12 B/param)"] == report["host_state_bytes"]
    assert need["upload staging rings"] + need["gradient pool"] == report["staging_bytes"]
    assert need["device slots on the cpu (weights + grads)"] == report["device_bytes"]
    return sum(need.values())


def test_host_ram_is_checked_before_allocating(monkeypatch):
    cfg = EngineConfig(device="cpu")
    need = _need(cfg)
    allocated: list[str] = []
    real_allocate = HostUnit.allocate

    def allocate(self: HostUnit, *args: object, **kwargs: object) -> None:
        allocated.append(self.name)
        real_allocate(self, *args, **kwargs)

    monkeypatch.setattr(HostUnit, "allocate", allocate)
    threads = threading.active_count()
    _available(monkeypatch, need)  # no room for the margin
    with pytest.raises(HostMemoryError) as info:
        Engine.from_config(tiny_config("llama", layers=2), cfg)
    msg = str(info.value)
    assert isinstance(info.value, SlideformerError) and isinstance(info.value, MemoryError)
    assert "nothing was allocated" in msg and "12 B/param" in msg and "gradient pool" in msg
    assert f"{need / 2**30:.2f} GiB" in msg, msg
    assert allocated == [] and threading.active_count() == threads

    _available(monkeypatch, need + HOST_MARGIN_MIN_BYTES)  # exactly enough, margin included
    with Engine.from_config(tiny_config("llama", layers=2), cfg):
        pass
    assert allocated


def test_deferred_schedule_counts_the_gradient_accumulator():
    cfg = EngineConfig(device="cpu", schedule="deferred")
    need = engine_host_bytes(1000, [100, 100], 200, cfg, on_cuda=False, elt=4)
    assert need["gradient accumulator (4 B/param)"] == 4000
    auto = engine_host_bytes(1000, [100, 100], 200, EngineConfig(), on_cuda=True, elt=2)
    assert "gradient accumulator (4 B/param)" not in auto and sum(need.values()) > 12_000


# -- determinism --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "micro, clip", [(1, None), (2, 0.5)], ids=["overlap", "deferred-accum-clip"]
)
def test_engine_runs_are_bitwise_deterministic(micro, clip):
    cfg = tiny_config("llama", layers=3)

    def run() -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(7)
        batches = [random_batch(cfg.vocab_size, 3, 24, gen) for _ in range(micro)]
        losses, norms = [], []
        with Engine.from_config(cfg, EngineConfig(device="cpu", window=2),
                                OptimConfig(lr=1e-2, max_grad_norm=clip), seed=3) as eng:
            for _ in range(4):
                res = eng.train_step(batches)
                losses.append(res.loss)
                norms.append(res.grad_norm)
            sd = eng.state_dict()
            state = {f"{part}.{k}": v.clone() for part in ("params", "exp_avg", "exp_avg_sq")
                     for k, v in sd[part].items()}
        return losses, norms, state

    (l1, n1, s1), (l2, n2, s2) = run(), run()
    assert l1 == l2 and n1 == n2  # exact float equality, step by step
    assert l1[-1] < l1[0]  # it trained (on the same batches each step)
    diff = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    assert s1.keys() == s2.keys() and not diff, diff[:5]


def test_cuda_out_of_memory_in_a_step_is_reported_with_the_plans_advice(monkeypatch):
    """An OOM raised anywhere in the step (here: by the layer loop, as the CUDA allocator would) becomes a
    DeviceMemoryError naming the GPU plan and what to change; the engine refuses further steps."""
    from slideformer.errors import DeviceMemoryError
    from slideformer.runtime.step import StepRunner

    cfg = tiny_config("llama")
    engine = Engine(make_model(cfg), EngineConfig(device="cpu", window=2), OptimConfig(lr=1e-3))
    try:
        def oom(*args, **kwargs):
            try:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            except torch.OutOfMemoryError as e:  # as a worker would hand it on: wrapped
                raise RuntimeError("upload worker failed") from e

        monkeypatch.setattr(StepRunner, "step", oom)
        batch = {"input_ids": torch.randint(0, cfg.vocab_size, (4, 32))}
        with pytest.raises(DeviceMemoryError) as info:
            engine.train_step(batch)
        msg = str(info.value)
        assert "Tried to allocate 2.00 GiB" in msg and "128 tokens per micro-batch" in msg
        assert "train.batch_size" in msg and "slideformer plan" in msg and "engine.window=1" in msg
        with pytest.raises(SlideformerError, match="earlier step failed"):
            engine.train_step(batch)
    finally:
        engine.close()
