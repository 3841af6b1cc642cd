"""``zero2`` / ``zero3``: DeepSpeed ZeRO with CPU offload, single process, no ``deepspeed`` launcher.

- ``zero2``: ZeRO stage 2, optimizer (FP32 master + Adam moments) offloaded to pinned CPU memory,
  DeepSpeedCPUAdam (AdamW mode), BF16; BF16 weights stay on the GPU.
- ``zero3``: ZeRO stage 3, parameters AND optimizer offloaded to pinned CPU memory; the model is
  built under ``zero.Init`` (through ``transformers``' ``HfDeepSpeedConfig``), so the full model
  never sits on the GPU.
Both: HF gradient checkpointing (``use_reentrant=True``: the non-reentrant variant trips ZeRO-3's
partitioned parameters in the recompute check, see transformers#47254 and DeepSpeed#8148), SDPA,
2e8-element buckets, DeepSpeed's other settings at their defaults (the record states the config).
DeepSpeedCPUAdam is JIT-compiled on first use (about a minute; cached in ``~/.cache/torch_extensions``
for the next child).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

import common
import shapes
from systems.base import BenchSpec, BenchSystem, StepFn

BUCKET_ELEMENTS = 200_000_000
"""Reduce/all-gather bucket size (elements): below DeepSpeed's 5e8 default, as a user would set for a
24 GB card (the buckets are doubled by ``overlap_comm``); it changes memory, not the arithmetic."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single_process_env() -> None:
    """The environment ``torch.distributed`` needs for a world of one, as the launcher would set it."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def ds_config(spec: BenchSpec, stage: int) -> dict[str, Any]:
    """The DeepSpeed config of stage ``stage`` with CPU offload (pinned), as the report states it."""
    zero: dict[str, Any] = {
        "stage": stage,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_bucket_size": BUCKET_ELEMENTS,
    }
    if stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    else:
        zero["allgather_bucket_size"] = BUCKET_ELEMENTS
    return {
        "train_micro_batch_size_per_gpu": max(spec.batch_sizes),
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": spec.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
        },
        "gradient_clipping": 0.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _enable_checkpointing(model: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": True}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class DeepSpeedZero(BenchSystem):
    """A DeepSpeed engine over the HF model of the spec's shape, ZeRO ``stage`` 2 or 3, CPU offload."""

    def __init__(self, spec: BenchSpec, stage: int) -> None:
        super().__init__(spec)
        import deepspeed

        self.stage = stage
        self.mode = f"zero{stage}"
        self.config = ds_config(spec, stage)
        single_process_env()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend=backend)
        vocab = shapes.hf_config(spec.model).vocab_size
        self.vocab_size = vocab
        if stage == 3:
            from transformers import AutoModelForCausalLM
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.config)  # must outlive from_config: zero.Init reads it
            model = AutoModelForCausalLM.from_config(
                shapes.hf_config(spec.model), dtype=torch.bfloat16, attn_implementation="sdpa"
            )
        else:
            model = shapes.build_model(spec.model, device=self.device, dtype=torch.bfloat16)
        model.config.use_cache = False
        # --kernels: the engine's Liger patch, on this model's instances, before DeepSpeed wraps it.
        self.kernels_patched = common.apply_kernels(spec.kernels, self.device, str(model.config.model_type), model)
        _enable_checkpointing(model)
        model.train()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=self.config
        )

    def prepare(self, batch_size: int) -> StepFn:
        batch = shapes.random_batch(
            batch_size, self.spec.seq_len, self.vocab_size, device=self.device, seed=self.spec.seed
        )
        engine = self.engine

        def step() -> torch.Tensor:
            loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            engine.backward(loss)
            engine.step()
            return loss.detach()

        return step

    def info(self) -> dict[str, Any]:
        import deepspeed

        return {
            "pinned_bytes": pinned_bytes_reachable(self.engine),
            "pinned_bytes_source": "pinned CPU tensors reachable from the DeepSpeed optimizer and "
            "ZeRO-3 partitions (a lower bound)",
            "deepspeed_version": deepspeed.__version__,
            "kernels_patched": len(self.kernels_patched),
            "config": self.config,
        }


def pinned_bytes_reachable(engine: Any) -> int:
    """Bytes of distinct pinned CPU storages reachable from the engine's optimizer and parameters."""
    seen: set[int] = set()
    total = 0

    def visit(obj: Any, depth: int) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "cpu" and obj.is_pinned():
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            return
        if depth <= 0:
            return
        if isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth - 1)
        elif isinstance(obj, list | tuple):
            for v in obj:
                visit(v, depth - 1)

    opt = getattr(engine, "optimizer", None)
    if opt is not None:
        visit(vars(opt), 4)
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            visit(dict(inner.state), 3)
    for p in engine.module.parameters():
        visit(getattr(p, "ds_tensor", None), 1)
    return total


def make_zero2(spec: BenchSpec) -> DeepSpeedZero:
    return DeepSpeedZero(spec, stage=2)


def make_zero3(spec: BenchSpec) -> DeepSpeedZero:
    return DeepSpeedZero(spec, stage=3)
