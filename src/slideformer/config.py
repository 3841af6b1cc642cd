"""Engine and optimizer configuration: frozen dataclasses whose fields carry their own docs.

Invariant: every knob of the engine lives here with a default and a validation in
``__post_init__``; model hyperparameters never do (they come from the HF ``config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from slideformer.errors import ConfigError

Schedule = Literal["auto", "overlap", "deferred"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW hyperparameters (decoupled weight decay, bias correction, as ``torch.optim.AdamW``)."""

    lr: float = 1e-5
    """Learning rate; ``Engine.train_step(lr=...)`` overrides it for one step."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam coefficients for the first and second moment."""
    eps: float = 1e-8
    """Term added to the denominator."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (never to norms and biases, as HF Trainer)."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value (exact, over all parameters); None disables."""

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ConfigError(f"optim.lr must be >= 0, got {self.lr}")
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"optim.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")


@dataclass(frozen=True)
class EngineConfig:
    """How the sliding window runs: device, dtypes, window depth, schedule and pool sizes."""

    device: str = "auto"
    """'cuda', 'cuda:N', 'cpu', or 'auto' (the GPU when there is one). On 'cpu' the CPU plays the device."""
    compute_dtype: str = "auto"
    """Dtype of the weights on the device and of the compute: 'bfloat16', 'float32', or 'auto'
    (bfloat16 on a GPU, float32 on the CPU). Master weights and Adam moments are always float32."""
    window: int = 2
    """Number of decoder-layer slots on the device (one computing, the others being filled)."""
    resident_layers: int = 0
    """Decoder layers kept on the device for good, with their FP32 master weights and AdamW moments
    (14 bytes/param of device memory each): never uploaded, their gradients never cross PCIe, their AdamW
    runs on the device (under the deferred schedule, after the step's clip coefficient, with 4 more bytes/param
    for the FP32 gradient accumulator). -1: as many as fit in the GPU
    memory (``gpu_memory_gib``) next to the streaming buffers for ``max_tokens_per_micro_batch`` tokens
    (placement.py; 0 where they cannot be used)."""
    resident_weights: Literal["auto", "keep", "cast"] = "auto"
    """How resident layers get their compute-dtype weights. 'keep': a copy per layer, refreshed after each
    update (compute dtype + 12 bytes/param). 'cast': none kept; each use casts the FP32 master into one shared
    buffer on the GPU (12 bytes/param, more layers per GiB, one cast pass over the layer per forward and per
    backward). 'auto': 'cast' only with ``resident_layers=-1`` when it fits more layers and the planner
    predicts the host (its AdamW plus the copies' bytes on its memory bus), not the GPU, bounds the step
    (placement.py); else 'keep'."""
    gpu_memory_gib: float = 0.0
    """GPU memory (GiB) the engine may plan for with ``resident_layers=-1``; 0: the device's free memory. A budget
    for the allocator, beside the CUDA context (as the benchmarks' ``--gpu-memory-gib`` cap); ``slideformer plan`` of
    a config that sets it plans for it so (its ``--gpu-memory-gib`` is a whole card's, context included)."""
    resident_placement: Literal["auto", "first", "spread", "spread_top"] = "auto"
    """Which layers stay resident. 'first': the lowest ones, whose updates would otherwise be the CPU
    optimizer's tail at the end of backward and whose uploads would start the next forward. 'spread':
    evenly over the depth, giving the link time to catch up between streamed layers. 'spread_top': spread's
    spacing with the streamed layers counted down from the top, so the lowest layers stay resident (the host's
    time to update the lowest streamed one, whose gradient lands last). 'auto': spread_top when
    resident layers outnumber the streamed ones (the streamed stretch would be bound by its uploads), else
    first (the host's AdamW bounds the step and wants the slack); measured in ``runtime/resident.py``."""
    schedule: Schedule = "auto"
    """'overlap': each layer's AdamW runs during backward, as soon as its gradient lands (no clipping,
    no accumulation). 'deferred': gradients are accumulated on the host, the global norm is clipped, and
    the updates run during the next step's forward. 'auto' picks 'overlap' unless clipping or
    accumulation needs 'deferred'."""
    grad_accumulator: Literal["fp32", "compute"] = "fp32"
    """Dtype of the deferred schedule's host gradient buffer. 'fp32' (4 B/param) sums micro-batches exactly
    as ``torch`` does. 'compute' (2 B/param in BF16) stores the gradient as the GPU produced it: exact
    for one micro-batch per step (clipping without accumulation), refused with several."""
    chunk_mib: float = 32
    """Size of one staging chunk (MiB) for FP32->BF16 upload and gradient download (fractions allowed,
    down to 1/64, so tests can make units span many chunks)."""
    staging_chunks: int = 4
    """Number of pinned staging chunks per direction (the shared pool)."""
    grad_park_mib: int = 2048
    """Pinned pool (MiB, GPU runs) where gradients wait for the CPU optimizer, so the GPU never waits for
    AdamW; the backlog left at the end of backward is then worked off bottom-up during the next forward.
    On the CPU the pool is twice ``staging_chunks``. Where the host's AdamW bounds the step by far, a full pool
    paces the backward to the host and leaves the host idle in the next forward: ``slideformer plan`` (and the
    train log's ``hint:`` line) then names a pool that holds the backlog (the 8B b8 on a 24 GiB cap: 8192, 1.79
    instead of 1.95-2.06 s/step on the H100 box, +6 GiB of pinned RAM). The default stays 2 GiB, inside the
    host-RAM budget of 12.5 B/param + checkpoints + 3 GiB."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the linear cross-entropy; the [tokens, vocab] logits never exist at once. 0: 2,048 with
    the fused loss kernel (``loss_kernel``: 2 B per logit on the GPU, 0.5 GB at 2,048 x 128,256), 512 on the torch
    path (~20 B per logit, 1.3 GB at 512 x 128,256: memory the planner otherwise gives to resident layers; on the
    24 GiB-capped 3B, 512 instead of 2,048 kept 12 layers resident instead of 9 and measured +15%)."""
    loss_kernel: Literal["auto", "triton", "torch"] = "auto"
    """The LM head's softmax pass (kernels/cross_entropy.py). 'triton': one Triton kernel writes each chunk's loss
    and gradient in place over its compute-dtype logits. 'torch': FP32 upcast, log-softmax and autograd's backward.
    'auto': 'triton' on CUDA when triton imports. A soft-capped head (Gemma-2) takes the torch path either way."""
    head_schedule: Literal["auto", "tokens", "vocab"] = "auto"
    """The order of the LM head's work (kernels/vocab_head.py). 'tokens': one pass over token chunks; the weight's
    gradient is final only after the last. 'vocab': a log-sum-exp pass, then the gradient a vocabulary block at a
    time (8 blocks), each block's download and host AdamW starting while the head still runs, for one more logits
    matmul (~+25% of the head's GPU time). Only the tied embedding's split update (``embedding_update``) consumes
    the blocks; elsewhere 'vocab' runs as 'tokens'. 'auto': 'vocab' where the planner predicts a host-bound step
    (the host's AdamW and copies at least 95% of the GPU's compute, ``plan_time.HOST_BOUND_SHARE``), on CUDA."""
    kernels: Literal["torch", "liger", "auto"] = "torch"
    """Kernels of the decoder layers. 'torch': HF's own modules. 'liger': Liger-Kernel's Triton RMSNorm,
    SwiGLU MLP and RoPE, patched onto this model's instances (kernels/liger.py; llama, mistral, qwen2,
    qwen3); a ConfigError names what is missing without a CUDA device, triton or liger_kernel. 'auto':
    'liger' where it can run, else 'torch'. Attention is SDPA either way, and the LM head always stays on
    the exact chunked linear cross-entropy (not Liger's fused one)."""
    optimizer_threads: int = 0
    """Intra-op threads for the CPU optimizer and conversions. 0: torch's default in one process; under
    torchrun, this node's cores divided by its ranks (torchrun sets OMP_NUM_THREADS=1 in every rank, which
    would leave the CPU AdamW on one core)."""
    upload_cast: Literal["auto", "device", "host"] = "auto"
    """Where FP32 master weights become the compute dtype on their way up. 'device': the FP32 master is
    page-locked in place and copied as is, and the GPU casts it (twice the PCIe bytes, no CPU work: the
    host's memory bandwidth is left to AdamW). 'host': the CPU casts chunk by chunk into pinned staging
    (half the PCIe bytes). 'auto': 'device' on CUDA when page-locking succeeds, else 'host'."""
    host_copy: Literal["none", "bf16", "auto"] = "none"
    """A pinned BF16 copy of every streamed unit's master weights (2 B/param of host RAM, allocated once),
    written by the CPU AdamW in the same pass as the update, so uploads DMA 2 B/param straight into the slot
    (no FP32 device ring, no cast, and the FP32 master is not page-locked). Results are bitwise those
    without it. 'bf16': on (needs compute_dtype bfloat16; a ConfigError otherwise). 'auto': on when the
    device is CUDA, the compute dtype is bfloat16 and the host state with the copy fits ``host_memory_gib``
    (the planner's total), else off. 'none': uploads read the FP32 master (``upload_cast``)."""
    embedding_update: Literal["auto", "split", "whole"] = "auto"
    """How the CPU AdamW updates the input embedding in the overlap schedule (one process, no disk tier).
    'split': the rows outside the batch are updated during backward, as background work of the optimizer
    thread (untied: their gradient is exactly zero; tied: it is the LM head's, complete at the start of
    backward), and only the batch's rows wait for the embedding backward (``runtime/embedding_split.py``).
    'whole': one update of the whole matrix after the embedding backward. 'auto' (default): split when the
    embedding is untied (its early part is a zero gradient: no download); when it is tied, split only where the
    planner's step model predicts a gain of at least 3% for this run (the CPU has slack in backward), else whole
    (``EmbeddingSplit.used``, ``runtime/build.tied_split_pays``). Results are bitwise the same. Same-run H100
    measurements (performance_h100_202611.md):
    untied 8B b8, 22 resident: split 1.241 vs whole 1.365 s/step (session 7), 1.298 vs 1.342 (session 6); tied 3B
    b8 on a 24 GiB cap: whole 0.656 vs split 0.679 with 12 resident layers (session 7), 0.567 vs 0.601 (session 6),
    0.963 vs 0.977 with none (session 6); since session 8's optimizer order (only completed copies) the tied
    pairs are even: 0.565 vs 0.564 and 0.960 vs 0.933, so 'auto' keeps whole there; with the resident weights cast
    on use (14 resident, session 9) split 0.526 vs whole 0.547, where the plan predicts 5%, and with every layer
    resident on 80 GB 0.441 vs 0.499. A hidden size that is not
    a multiple of 8 (the CPU kernel's tail width) keeps the whole update."""
    pin_memory: bool = True
    """Use page-locked host memory for staging and activation checkpoints (GPU only)."""
    check_host_memory: bool = True
    """Refuse to start (before allocating) when the host buffers exceed the available RAM. Turn off on
    machines whose RAM is granted on demand and reported small at start (some VMs)."""
    watchdog_s: float = 600.0
    """Fail (with a report naming what was awaited and a stack dump of every pipeline thread) when the
    main thread waits this long for an upload, a gradient download or an optimizer update."""
    skip_nonfinite: bool = True
    """Check each micro-batch's loss once the forward is done (one host sync per micro-batch, before any
    update of the step can start) and skip the whole step when it is NaN/inf: no update, no step count.
    A non-finite gradient under a finite loss is not caught (the overlap schedule updates in backward)."""
    sync_copies: bool = False
    """Debugging aid: make every host<->device copy synchronous (serialises the pipeline; results must
    not change, which is how the race tests use it)."""
    offload: Literal["none", "moments", "all", "auto"] = "none"
    """The disk tier. 'moments': the AdamW moments (8 of the 12 B/param of host state) live in one file per
    unit under ``offload_dir``, read ahead of each unit's update into a small ring of host buffers and
    written back after it, piece by piece, overlapped with the GPU (results are bitwise those of the all-in-RAM run).
    'all': the FP32 master weights of the streamed decoder layers go to disk too, next to their moments, through
    the same ring (the embedding and head masters stay in RAM): host state is then ~2 B/param for those layers,
    the pinned BF16 upload copy, which is what uploads read, so 'all' needs ``host_copy`` 'bf16' or 'auto' (which
    it turns on; 'none' is a ConfigError) and compute_dtype bfloat16; the disk traffic is 12 B/param each way
    per step. 'auto': 'none' when the host state fits ``host_memory_gib``, else 'moments', else (host_copy not
    'none', BF16 compute) 'all'. 'none': all in RAM. Not combined with data-parallel runs or resident layers."""
    offload_dir: str | None = None
    """Directory (on a local NVMe disk) for the offloaded state; owned by one engine at a time, emptied on
    exit; a crashed run's leftovers are cleared at the next start."""
    offload_io: Literal["auto", "posix", "kvikio"] = "auto"
    """Disk I/O path. 'posix': O_DIRECT preadv/pwritev from a thread pool (buffered, with a warning, where
    the file system refuses O_DIRECT). 'kvikio': kvikio's CuFile (GDS where present). 'auto': kvikio when
    it imports and the device is CUDA, else posix."""
    offload_prefetch: int = 4
    """Pieces of moments read ahead of the one being updated. A piece is one optimizer chunk (``chunk_mib``
    of the compute dtype: 16 Mi elements, 128 MiB of moments, by default); the ring holds prefetch + 2."""
    offload_io_threads: int = 4
    """Threads issuing the posix backend's reads and writes (8 MiB pieces in parallel)."""
    offload_activations: bool = False
    """Put the activation checkpoints (each decoder layer's input, kept from forward to backward) on disk too:
    one file under ``offload_dir`` (shared with the moments' files and owner when ``offload`` is on, removed on
    close), written from a ring of 4 page-aligned host buffers of one layer input each as forward produces
    them, and read back ahead of backward (3 layers in backward order) into that ring and then the two-deep
    device ring. Host RAM for checkpoints drops from (layers - 1) layer inputs to 4; results are bitwise
    those of the in-RAM store. Needs ``offload_dir``; not with data-parallel training yet."""
    host_memory_gib: float = 0.0
    """Host RAM budget (GiB) for ``offload='auto'`` and the start-up check; 0: the RAM available now."""
    max_tokens_per_micro_batch: int = 0
    """Pre-size activation buffers for this many tokens (0: size them on the first batch)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form notes carried into run metadata; ignored by the engine."""

    def __post_init__(self) -> None:
        if self.grad_accumulator not in ("fp32", "compute"):
            raise ConfigError(f"engine.grad_accumulator must be fp32 or compute, got {self.grad_accumulator!r}")
        if self.resident_layers < -1:
            raise ConfigError("engine.resident_layers must be >= 0, or -1 for as many as fit, got "
                              f"{self.resident_layers}")
        if self.resident_placement not in ("auto", "first", "spread", "spread_top"):
            raise ConfigError("engine.resident_placement must be auto, first, spread or spread_top, got "
                              f"{self.resident_placement!r}")
        if self.resident_weights not in ("auto", "keep", "cast"):
            raise ConfigError(f"engine.resident_weights must be auto, keep or cast, got {self.resident_weights!r}")
        if self.window < 1:
            raise ConfigError(f"engine.window must be >= 1, got {self.window}")
        if self.schedule not in ("auto", "overlap", "deferred"):
            raise ConfigError(f"engine.schedule must be auto, overlap or deferred, got {self.schedule!r}")
        if self.compute_dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ConfigError(
                f"engine.compute_dtype must be auto, bfloat16, float16 or float32, got {self.compute_dtype!r}"
            )
        if self.chunk_mib < 1 / 64 or self.staging_chunks < 2:
            raise ConfigError("engine.chunk_mib must be >= 1/64 and engine.staging_chunks >= 2")
        if self.upload_cast not in ("auto", "device", "host"):
            raise ConfigError(f"engine.upload_cast must be auto, device or host, got {self.upload_cast!r}")
        if self.host_copy not in ("none", "bf16", "auto"):
            raise ConfigError(f"engine.host_copy must be none, bf16 or auto, got {self.host_copy!r}")
        if self.embedding_update not in ("auto", "split", "whole"):
            raise ConfigError(f"engine.embedding_update must be auto, split or whole, got {self.embedding_update!r}")
        if self.watchdog_s <= 0:
            raise ConfigError(f"engine.watchdog_s must be > 0, got {self.watchdog_s}")
        if self.offload not in ("none", "moments", "all", "auto"):
            raise ConfigError(f"engine.offload must be none, moments, all or auto, got {self.offload!r}")
        if self.offload in ("moments", "all") and not self.offload_dir:
            raise ConfigError(f"engine.offload={self.offload!r} needs engine.offload_dir (a directory on a local "
                              "NVMe disk)")
        if self.offload == "all" and self.host_copy == "none":
            raise ConfigError("engine.offload='all' puts the FP32 masters of the streamed layers on disk, so uploads "
                              "must read the pinned BF16 copy: set engine.host_copy='bf16' (or 'auto'), or use "
                              "engine.offload='moments'")
        if self.offload == "all" and self.compute_dtype in ("float32", "float16"):
            raise ConfigError(f"engine.offload='all' uploads the BF16 copy of the masters, but compute_dtype is "
                              f"{self.compute_dtype}; set engine.compute_dtype=bfloat16 or engine.offload='moments'")
        if self.offload_io not in ("auto", "posix", "kvikio"):
            raise ConfigError(f"engine.offload_io must be auto, posix or kvikio, got {self.offload_io!r}")
        if self.offload_activations and not self.offload_dir:
            raise ConfigError("engine.offload_activations needs engine.offload_dir (a directory on a local NVMe disk)")
        if self.offload_prefetch < 1 or self.offload_io_threads < 1:
            raise ConfigError("engine.offload_prefetch and engine.offload_io_threads must be >= 1")
        if self.host_memory_gib < 0:
            raise ConfigError(f"engine.host_memory_gib must be >= 0, got {self.host_memory_gib}")
        if self.loss_chunk_tokens < 0:
            raise ConfigError("engine.loss_chunk_tokens must be >= 1, or 0 for the kernel's default")
        if self.head_schedule not in ("auto", "tokens", "vocab"):
            raise ConfigError(f"engine.head_schedule must be auto, tokens or vocab, got {self.head_schedule!r}")
        if self.loss_kernel not in ("auto", "triton", "torch"):
            raise ConfigError(f"engine.loss_kernel must be auto, triton or torch, got {self.loss_kernel!r}")
        if self.kernels not in ("torch", "liger", "auto"):
            raise ConfigError(f"engine.kernels must be torch, liger or auto, got {self.kernels!r}")

    def resolve_device(self) -> torch.device:
        """The torch device this config names ('auto' picks CUDA when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"engine.device={self.device!r} but no CUDA GPU is visible; use device='cpu'")
        if dev.type not in ("cuda", "cpu"):
            raise ConfigError(f"engine.device must be cuda or cpu, got {self.device!r}")
        return dev

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype for ``device``."""
        if self.compute_dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.compute_dtype)
