"""``resident``: plain PyTorch with the whole model on the GPU, or the per-layer peak when it can't fit.

Resident mode: FP32 master weights on the GPU, ``torch.optim.AdamW(fused=True)``, BF16 autocast,
HF gradient checkpointing, SDPA: what a user with a big enough GPU would run. Before building the
model the driver estimates its footprint (16 B/param of weights, gradients and Adam moments, plus
the checkpointed hidden states and the logits); if that exceeds the GPU (or the cap), or the
attempt runs out of memory, the system measures the no-offload per-layer peak instead
(``systems.peak``), and says so in ``mode``.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

import common
import shapes
from systems.base import BenchSpec, BenchSystem, StepFn, error_text, is_oom
from systems.peak import PeakModel, head_desc


def resident_estimate_bytes(stats: shapes.ShapeStats, batch_size: int, seq_len: int) -> int:
    """A lower-bound estimate of the resident run's GPU peak (bytes).

    16 B/param (FP32 weights, grads, Adam m and v) + the FP32 residual stream saved at every layer
    boundary + the BF16 and FP32 logits of HF's loss. The per-layer recompute workspace is left out
    (it does not coexist with the logits), so a marginal case is attempted and may fall back on OOM.
    """
    tokens = batch_size * seq_len
    states = 16 * stats.total_params
    checkpoints = stats.num_layers * tokens * stats.hidden_size * 4
    logits = tokens * stats.vocab_size * (2 + 4)
    return states + checkpoints + logits


class Resident(BenchSystem):
    """The whole model on the GPU when the estimate fits; otherwise (or after OOM) the per-layer peak."""

    def __init__(self, spec: BenchSpec) -> None:
        super().__init__(spec)
        self.stats = shapes.shape_stats(spec.model)
        cap = int(spec.gpu_memory_gib * common.GIB) if spec.gpu_memory_gib else None
        self.capacity = common.gpu_capacity_bytes(self.device, cap)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.peak: PeakModel | None = None
        self.fallback_reason: str | None = None
        self.kernels_patched: list[str] = []
        self.mode = "resident"
        smallest = min(spec.batch_sizes)
        self.estimate_bytes = resident_estimate_bytes(self.stats, smallest, spec.seq_len)
        if self._fits(smallest):
            try:
                self._build_resident()
            except Exception as exc:
                if not is_oom(exc):
                    raise
                self._to_peak(f"resident OOM while building the model: {error_text(exc, 300)}")

    def _build_resident(self) -> None:
        model = shapes.build_model(self.spec.model, device=self.device, dtype=torch.float32)
        self.kernels_patched = common.apply_kernels(self.spec.kernels, self.device, str(model.config.model_type), model)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.2x names it so; the old name warns there
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        fused = self.device.type == "cuda" or hasattr(torch, "_fused_adamw_")
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.spec.lr, fused=fused)
        self.model = model

    def _fits(self, batch_size: int) -> bool:
        """Whether the resident estimate at ``batch_size`` fits; if not, switch to the peak (once)."""
        estimate = resident_estimate_bytes(self.stats, batch_size, self.spec.seq_len)
        if estimate <= self.capacity:
            return True
        if self.mode == "resident":
            self._to_peak(
                f"estimated {estimate / common.GIB:.1f} GiB "
                f"(16 B/param + checkpoints + logits at batch {batch_size}) "
                f"> {self.capacity / common.GIB:.1f} GiB available"
            )
        return False

    def _to_peak(self, reason: str) -> None:
        self.model = None
        self.optimizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.fallback_reason = reason
        self.mode = "peak"
        self.peak = PeakModel(self.spec.model, self.device, kernels=self.spec.kernels)

    def prepare(self, batch_size: int) -> StepFn:
        batch = shapes.random_batch(
            batch_size, self.spec.seq_len, self.stats.vocab_size, device=self.device, seed=self.spec.seed
        )
        if self.mode == "resident" and self._fits(batch_size):
            step = self._resident_step(batch)
            try:  # one trial step: if the resident model OOMs here, measure the peak instead
                step()
                self.sync()
                return step
            except Exception as exc:
                if not is_oom(exc):
                    raise
                self._to_peak(f"resident OOM at batch {batch_size}: {error_text(exc, 300)}")
        peak = self.peak
        if peak is None:
            raise RuntimeError("resident: neither the model nor the peak layers exist")
        return lambda: peak.step(batch)

    def _resident_step(self, batch: dict[str, torch.Tensor]) -> StepFn:
        model, opt = self.model, self.optimizer
        if model is None or opt is None:
            raise RuntimeError("resident model not built")
        dev_type = self.device.type

        def step() -> torch.Tensor:
            with torch.autocast(dev_type, dtype=torch.bfloat16):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pinned_bytes": 0,
            "resident_estimate_bytes": self.estimate_bytes,
            "gpu_capacity_bytes": self.capacity,
            "kernels_patched": len(self.peak.kernels_patched if self.peak is not None else self.kernels_patched),
        }
        if self.mode == "resident":
            out["config"] = (
                "FP32 master on GPU, torch.optim.AdamW(fused=True), BF16 autocast, "
                "HF gradient checkpointing (use_reentrant=False), SDPA"
            )
        else:
            out["config"] = (
                "per-layer no-offload peak: embedding + 1 HF decoder layer fwd/recompute/bwd x L + "
                f"the engine's chunked CE head ({head_desc(self.device)}), BF16, SDPA; no optimizer"
            )
            out["fallback_reason"] = self.fallback_reason
        return out


def make(spec: BenchSpec) -> Resident:
    return Resident(spec)
