"""The engine: public API over the host state, the device window and the step schedule.

``Engine`` owns the model split (adapter), the host units, the device slots, the worker threads and
the activation store (built by ``runtime.build`` and ``runtime.window_setup``); ``runtime.step.StepRunner``
runs one training step over them.

Invariant: after construction the HF parameters alias host FP32 master weights or device slot views (or,
for the layers whose masters are on disk, ``engine.offload='all'``, a zero-byte placeholder); ``flush()``
makes every scheduled update land, after which ``hf_model()`` is the trained FP32 model (those layers' params
then alias views of their offload files).
Any worker failure marks the engine failed: later calls raise instead of training on broken state.

Data-parallel (``dist``, a ``slideformer.dist.DistContext``): every rank runs this engine on its own
micro-batches; the context shards the units, reduces gradients and gathers weights (see
``docs/distributed.md``); the schedule is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from slideformer.config import EngineConfig, OptimConfig
from slideformer.errors import ConfigError, DeviceMemoryError, SlideformerError, WorkerError
from slideformer.kernels import cross_entropy
from slideformer.memory.activations import ActivationStore
from slideformer.memory.activations_disk import DiskActivationStore
from slideformer.memory.offload import OffloadedMoments
from slideformer.models import get_adapter
from slideformer.runtime import build, engine_state, window_setup
from slideformer.runtime.batch import prepare_batch
from slideformer.runtime.device import DeviceOps
from slideformer.runtime.embedding_split import EmbeddingSplit
from slideformer.runtime.head_blocks import HeadGradRing

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one ``train_step`` returns."""

    loss: float
    """Token-weighted mean loss over all micro-batches of the step."""
    tokens: int
    """Label tokens that contributed to the loss."""
    micro_batches: int
    _norm: Future
    skipped: bool = False
    """True when the loss was NaN/inf and the step's update was skipped (``EngineConfig.skip_nonfinite``)."""

    @property
    def grad_norm(self) -> float:
        """Global gradient norm before clipping (waits until the step's last gradient is processed)."""
        try:
            return float(self._norm.result()[0])
        except Exception as exc:
            raise WorkerError(f"gradient worker failed: {exc}") from exc


class Engine:
    """Full-parameter training of an HF causal LM through a sliding window of device slots."""

    acts: ActivationStore | DiskActivationStore
    """Layer inputs kept for backward (host RAM, or a file with ``offload_activations``); ``window_setup``."""

    def __init__(self, model: nn.Module, engine: EngineConfig | None = None, optim: OptimConfig | None = None,
                 *, init: str = "copy", weights: Any = None, dist: Any = None) -> None:
        """Build an engine around ``model`` (an HF CausalLM on the CPU, FP32, or on the meta device).

        ``init``: 'copy' takes the model's own weights; 'load' streams them from ``weights`` (a
        ``models.loading.WeightSource``); 'random' applies the model's own initialiser. ``dist``: a
        ``slideformer.dist.DistContext`` for data-parallel training (None: single process).
        """
        self.cfg = engine or EngineConfig()
        self.optim_cfg = optim or OptimConfig()
        self.hf_config = model.config
        self.model_type = str(model.config.model_type)
        self.adapter = get_adapter(self.model_type)
        self.parts = self.adapter.split(model)
        self.device = self.cfg.resolve_device()
        self.dtype = self.cfg.resolve_dtype(self.device)
        self.kernels_patched = self._apply_kernels(model)
        """Modules running Liger's kernels (``engine.kernels``); empty on the torch path."""
        self.head_ce = cross_entropy.resolve(self.cfg.loss_kernel, self.device.type, self.parts.logit_softcap)
        """The head's per-chunk loss and gradient (``engine.loss_kernel``): the Triton kernel, or None (torch)."""
        self.loss_chunk_tokens = cross_entropy.chunk_tokens(self.cfg.loss_chunk_tokens, self.head_ce is not None)
        self._failed: BaseException | None = None
        self._closed = False
        self.dist = dist
        self.resident_reason = ""
        """Why ``resident_layers=-1`` chose its count (empty when the count was given)."""
        self.resident_head = "auto"
        """'vocab' where ``resident_layers=-1`` counted its layers with the blocked head (``build._run_plan``)."""
        self.embed_split: EmbeddingSplit | None = None
        """The input embedding's two-part update (``engine.embedding_update``), set up with the window."""
        self.park_hint = ""
        """The plan's advice for a larger ``engine.grad_park_mib`` where the backward outruns the host's AdamW
        (``build.park_hint``); empty: none."""
        self.head_blocks = 0
        """Rows per vocabulary block of the head's second pass (``engine.head_schedule``), 0: the one-pass head."""
        self.vocab_ring: HeadGradRing | None = None
        """Where the blocked head writes the tied matrix's gradient, a few blocks at a time
        (``runtime/head_blocks.py``); None: the vocabulary slot's gradient buffer holds the whole matrix's."""
        self.ops = DeviceOps(self.device, self.cfg.pin_memory, self.cfg.sync_copies)
        self.units = build.make_units(self, model)
        self.offload: OffloadedMoments | None = None
        self.offload_mode = build.check_host_memory(self)
        try:
            build.init_weights(self, model, init, weights)
            window_setup.setup_device(self)
        except BaseException:
            self.close()
            raise

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, engine: EngineConfig | None = None,
                        optim: OptimConfig | None = None, dist: Any = None) -> Engine:
        """Build from a local HF model directory, streaming safetensors shards into host buffers."""
        from slideformer.models.loading import meta_model, weight_source

        source = weight_source(path)
        return cls(meta_model(source.config), engine, optim, init="load", weights=source, dist=dist)

    @classmethod
    def from_config(cls, config: Any, engine: EngineConfig | None = None, optim: OptimConfig | None = None,
                    seed: int = 0, dist: Any = None) -> Engine:
        """Build a randomly initialised model straight into host buffers (no FP32 model copy)."""
        from slideformer.models.loading import meta_model

        torch.manual_seed(seed)
        return cls(meta_model(config), engine, optim, init="random", dist=dist)

    def _apply_kernels(self, model: nn.Module) -> list[str]:
        """``engine.kernels``: patch the layers' instances with Liger's kernels before any slot is bound."""
        from slideformer.kernels import liger

        if not liger.resolve(self.cfg.kernels, self.device, self.model_type):
            return []
        patched = liger.apply(model, self.model_type)
        logger.info("engine.kernels=%s: Liger kernels on %d modules", self.cfg.kernels, len(patched))
        return patched

    def ensure_capacity(self, tokens: int) -> None:
        """Size activation and embedding buffers for micro-batches of ``tokens`` tokens."""
        self.acts.ensure(tokens)
        if self.embed_split is not None:
            self.embed_split.ensure(tokens)
        if tokens > self.x0_capacity:
            n = tokens * self.hidden
            self.x0_dev = self.ops.empty(n, self.dtype)
            if self.ops.is_cuda:
                self.x0_stage = self.ops.host_empty(n, self.dtype)
                self.x0_scratch = torch.empty(n, dtype=torch.float32)
            else:
                self.x0_stage = self.x0_dev
                self.x0_scratch = self.x0_dev if self.dtype == torch.float32 else torch.empty(n)
            self.x0_capacity = tokens

    # -- training ----------------------------------------------------------------------------------
    def train_step(self, batch: Any, lr: float | None = None) -> StepResult:
        """Forward, backward and AdamW for one step; ``batch`` may be a list of micro-batches.

        With several micro-batches the gradient is accumulated exactly (token-weighted, as one big
        batch). Returns once the loss is known; updates of the last layers may still be running and
        are waited for by whatever reads those weights next.
        """
        self._check_usable()
        max_pos = getattr(self.hf_config, "max_position_embeddings", None)
        mbs = prepare_batch(batch, self.vocab, max_pos, self.device, rows=True)  # the embedding backward's rows
        lr_now = self.optim_cfg.lr if lr is None else float(lr)
        if not math.isfinite(lr_now) or lr_now < 0:
            raise ConfigError(f"learning rate must be a finite number >= 0, got {lr}")
        deferred = self._deferred(len(mbs))
        try:
            loss, norm_fut, skipped = self.runner.step(mbs, deferred, lr_now)
        except BaseException as exc:
            self._fail("training step", exc, mbs, deferred)
        if skipped:
            warnings.warn(f"slideformer: non-finite loss at step {self.step_count + 1}; the update was skipped",
                          RuntimeWarning, stacklevel=2)
        return StepResult(loss, sum(m.tokens for m in mbs), len(mbs), norm_fut, skipped)

    def eval_loss(self, batch: Any) -> tuple[float, int]:
        """(token-weighted mean loss, label tokens) of ``batch`` (a dict or a list of micro-batches) under
        the current weights: a forward-only pass through the window, no update, no gradient."""
        self._check_usable()
        max_pos = getattr(self.hf_config, "max_position_embeddings", None)
        mbs = prepare_batch(batch, self.vocab, max_pos, self.device, require_labels=False)
        self.ensure_capacity(max(m.shape.numel() for m in mbs))
        try:
            total = torch.stack([self.runner.eval_micro(m) for m in mbs]).sum()
        except BaseException as exc:
            self.runner.abort(exc)  # fail the pass's pending slot releases: no upload worker waits on them forever
            self._fail("evaluation", exc, mbs, False)
        tokens = sum(m.tokens for m in mbs)
        return (float(total.item()) / tokens if tokens else math.nan), tokens

    def _deferred(self, micro_batches: int) -> bool:
        if micro_batches > 1 and self.cfg.grad_accumulator == "compute":
            raise ConfigError("engine.grad_accumulator='compute' keeps one micro-batch's gradient as the device "
                              "produced it; accumulating several micro-batches needs 'fp32'")
        need = micro_batches > 1 or self.optim_cfg.max_grad_norm is not None
        if self.cfg.schedule == "overlap" and need:
            raise ConfigError("schedule='overlap' updates each layer inside backward, so it cannot clip the "
                              "global norm or accumulate micro-batches; use schedule='auto' or 'deferred'")
        return self.cfg.schedule == "deferred" or need

    def flush(self) -> None:
        """Wait until every scheduled optimizer update has been applied to the host state."""
        self.settle_host()
        if self.resident is not None:
            for index in list(self.runner.resident_pending):
                self.runner.apply_resident_update(index)  # deferred updates of resident layers, on the device
            self.resident.sync_to_host()

    def settle_host(self) -> None:
        """Wait for the host-side updates and disk writes in flight, leaving the resident layers' device state
        alone (``flush`` then copies it to the host; ``load_state_dict`` replaces it from the host instead)."""
        self._check_usable(allow_failed=False)
        for u in self.units:
            self.runner.wait(u.update_future, f"the optimizer update of {u.name}")
        if self.offload is not None:
            self.offload.wait_writes(self.cfg.watchdog_s)

    def _fail(self, what: str, exc: BaseException, mbs: list[Any], deferred: bool) -> NoReturn:
        """Mark the engine failed and re-raise ``exc``: as a DeviceMemoryError with advice when a CUDA
        out-of-memory is anywhere in its chain, as is when it is ours, else as a WorkerError."""
        self._failed = exc
        self._raise_device_oom(exc, max(m.shape.numel() for m in mbs), deferred)
        if isinstance(exc, SlideformerError):
            raise exc
        raise WorkerError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    def _raise_device_oom(self, exc: BaseException, tokens: int, deferred: bool) -> None:
        """Turn a CUDA out-of-memory anywhere in ``exc``'s chain into a DeviceMemoryError with advice."""
        seen: BaseException | None = exc
        while seen is not None and not isinstance(seen, torch.OutOfMemoryError):
            seen = seen.__cause__ or seen.__context__
        if seen is None:
            return
        from slideformer.placement import device_memory_advice

        budget = None
        if self.ops.is_cuda:
            budget = int(self.cfg.gpu_memory_gib * 2**30) or int(torch.cuda.mem_get_info(self.device)[1])
        raise DeviceMemoryError(device_memory_advice(
            self.hf_config, self.cfg, tokens=tokens, resident=len(self.resident_idx), deferred=deferred,
            budget_bytes=budget, detail=str(seen))) from exc

    def _check_usable(self, allow_failed: bool = False) -> None:
        if self._closed:
            raise SlideformerError("the engine is closed")
        if self._failed is not None and not allow_failed:
            raise SlideformerError(
                f"an earlier step failed ({type(self._failed).__name__}: {self._failed}); the training state "
                "may be partly updated: reload the last checkpoint into a new engine"
            ) from self._failed

    # -- state ---------------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(u.numel for u in self.units)

    @property
    def step_count(self) -> int:
        return self.units[0].step

    def state_dict(self) -> dict[str, Any]:
        """Master weights and moments keyed by HF parameter name (views of host buffers, no copy; moments on
        disk, and masters with ``engine.offload='all'``, are views of their files, read through the page cache,
        and writes into them count once ``load_state_dict`` runs).

        Data-parallel: the values are ``slideformer.dist.state.ShardedTensor`` handles (collective: every
        rank must read or load them in the same order).
        """
        return engine_state.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load master weights and (if present) moments and step counts; missing params are an error."""
        engine_state.load_state_dict(self, state)

    def hf_model(self) -> nn.Module:
        """The HF model whose parameters are the FP32 master weights (all updates applied).

        Masters on disk (``engine.offload='all'``): those parameters are views of the offload files, read
        through the page cache, valid until the next ``train_step`` (which rebinds them); do not write them.
        """
        self.flush()
        if self.dist is not None:
            raise SlideformerError("a data-parallel engine holds only this rank's shard of the weights: save a "
                                   "checkpoint (gathered to rank 0) and export it")
        on_disk: dict[int, torch.Tensor] = {}
        if self.offload is not None and self.offload.masters:
            self.offload.sync(self.cfg.watchdog_s)  # every write-back is in the files before they are mapped
            on_disk = self.offload.mapped_masters()
        for u in self.units:
            u.point_params_to_master(on_disk.get(u.index))
        return self.parts.model

    def memory_report(self) -> dict[str, Any]:
        """Host and device bytes the engine holds, by kind."""
        state = sum(u.host_bytes() for u in self.units)
        n = self.num_params
        resident_params = sum(self.units[j + 1].numel for j in self.resident_idx)
        staging = sum(t.numel() * t.element_size() for w in (self.layer_up, self.vocab_up) for t in w.ring)
        staging += self.drain.staging_bytes()
        acts = self.acts.host_bytes()
        ring = self.offload.host_bytes() if self.offload is not None else 0
        staging += ring
        return {
            "num_params": n,
            "host_state_bytes": state,
            "bytes_per_param": state / n,
            "staging_bytes": staging,
            "activation_host_bytes": acts,
            "host_bytes": state + staging + acts,
            "pinned_bytes": self.ops.pinned_bytes,
            "pinned_fallbacks": self.ops.pinned_fallbacks,
            "pageable_fallback_bytes": self.ops.pageable_fallback_bytes,
            "registered_bytes": self.ops.registered_bytes,
            "upload_cast": "copy" if self.host_copy else "device" if any(u.registered for u in self.units) else "host",
            "upload_copy_bytes": sum(u.upload_copy.numel() * u.upload_copy.element_size() for u in self.units
                                     if u.upload_copy is not None),
            "host_updated_params": n - resident_params,
            "streamed_params": n - resident_params,
            "device_bytes": self.ops.device_bytes,
            "window": len(self.layer_pool.slots),
            "resident_layers": len(self.resident_idx),
            "resident_weights": "cast" if self.resident is not None and self.resident.cast else "keep",
            "embedding_update": "split" if self.embed_split is not None else "whole",
            "head_schedule": "vocab" if self.head_blocks else "tokens",
            "slot_numel": self.layer_pool.numel,
            "vocab_slot_numel": self.vocab_slot.weight.numel(),
            "offload": self.offload_mode,
            "masters_on_disk_params": sum(u.numel for u in self.units if u.master_on_disk),
            "offload_ring_bytes": ring,
            "disk": self.offload.stats() if self.offload is not None else None,
            "activation_disk": self.acts.stats() if isinstance(self.acts, DiskActivationStore) else None,
        }

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker threads and drop device and pinned buffers."""
        if self._closed:
            return
        self._closed = True
        # The optimizer thread and the activation transfers stop before the files go.
        for name in ("layer_up", "vocab_up", "drain", "acts", "offload"):
            worker = getattr(self, name, None)
            if worker is not None:
                worker.close()
        for u in self.units:
            if u.flat is not None:
                u.point_params_to_master()
            u.registered = False
            u.upload_copy = None
        for name in ("_unregister", "_release_copies"):  # page-locked memory is unregistered before it is freed
            if getattr(self, name, None) is not None:
                getattr(self, name)()
        self.embed_split = None  # its device row buffer
        self.vocab_ring = None  # a view of the vocabulary slot's gradient buffer
        if getattr(self, "resident", None) is not None:
            # Updates a failed step left on the resident stream finish before their memory goes back to the allocator
            # (whose reuse follows the compute stream only); after a sticky device error nothing queued runs anyway.
            with contextlib.suppress(RuntimeError):
                self.resident.join()
        for name in ("resident", "layer_pool", "vocab_slot", "acts", "x0_dev", "x0_stage", "x0_scratch", "runner"):
            if hasattr(self, name):
                delattr(self, name)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
