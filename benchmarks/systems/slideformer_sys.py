"""``slideformer``: our engine, built from the HF config with random weights straight into host buffers.

Uses the public API only: ``Engine.from_config(hf_config, EngineConfig, OptimConfig, seed=)``,
``train_step(batch)``, ``memory_report()``, ``close()``. Batches are handed over as CPU tensors, as
a data loader would. The step time is taken between consecutive returns of ``train_step`` (device
synchronised), so work the engine overlaps into the next step is charged to that step; a full
drain (``engine.flush()``: every scheduled optimizer update applied) ends the measured window.
"""

from __future__ import annotations

from typing import Any

import torch

import shapes
from systems.base import BenchSpec, BenchSystem, StepFn

DRAIN_METHODS = ("flush", "synchronize")
"""Engine methods that, when present, wait for all in-flight work (CPU optimizer included)."""


class Slideformer(BenchSystem):
    """The sliding-window engine with FP32 master weights and Adam moments on the host."""

    mode = "slideformer"

    def __init__(self, spec: BenchSpec) -> None:
        super().__init__(spec)
        from slideformer import Engine, EngineConfig, OptimConfig

        self.hf_config = shapes.hf_config(spec.model)
        options = dict(spec.engine_options)
        if options.setdefault("kernels", spec.kernels) != spec.kernels:  # one kernel choice for every system
            raise ValueError(f"engine option kernels={options['kernels']!r} differs from --kernels {spec.kernels}: "
                             "the step benchmark runs every system with the same kernels; use --kernels")
        # The micro-batch size the engine plans for, as `slideformer train` sets it: the resident count (-1), the
        # tied embedding's split update and the head's schedule ('auto') are sized or decided for it. (Before session
        # 14 only -1 set it, so a forced count ran the whole update and the one-pass head.)
        options.setdefault("max_tokens_per_micro_batch", max(spec.batch_sizes) * spec.seq_len)
        if options.get("resident_layers") == -1:  # as many as fit: sized for the largest batch and the cap
            if spec.gpu_memory_gib:
                options.setdefault("gpu_memory_gib", spec.gpu_memory_gib)
        options.setdefault("window", spec.window)  # --window, unless a system variant sets its own (window=3)
        self.engine_config = EngineConfig(device=str(self.device), **options)
        self.optim_config = OptimConfig(lr=spec.lr)
        if hasattr(Engine, "from_config"):
            self.engine = Engine.from_config(self.hf_config, self.engine_config, self.optim_config, seed=spec.seed)
            self.built_with = "Engine.from_config"
        else:  # older engines: an FP32 HF model on the host (4 B/param of extra host RAM while building)
            model = shapes.build_model(spec.model, device="cpu", dtype=torch.float32)
            self.engine = Engine(model, self.engine_config, self.optim_config)
            del model
            self.built_with = "Engine(hf_model)"

    def prepare(self, batch_size: int) -> StepFn:
        batch = shapes.random_batch(
            batch_size, self.spec.seq_len, self.hf_config.vocab_size, device="cpu", seed=self.spec.seed
        )
        engine = self.engine

        def step() -> Any:
            return engine.train_step(batch).loss

        return step

    def drain(self) -> None:
        for name in DRAIN_METHODS:
            fn = getattr(self.engine, name, None)
            if callable(fn):
                fn()
                break
        self.sync()

    def info(self) -> dict[str, Any]:
        report = dict(self.engine.memory_report())
        return {
            "pinned_bytes": report.get("pinned_bytes"),
            "engine_memory_report": report,
            "built_with": self.built_with,
            "kernels_patched": len(self.engine.kernels_patched),
            "config": {"engine": _plain(self.engine_config), "optim": _plain(self.optim_config)},
        }

    def close(self) -> None:
        self.engine.close()


def _plain(cfg: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {k: v for k, v in dataclasses.asdict(cfg).items()}
    return {"repr": repr(cfg)}


def make(spec: BenchSpec) -> Slideformer:
    return Slideformer(spec)
