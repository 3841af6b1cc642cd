"""The planner's vocabulary: the machine a plan is for (``Hardware``: memory, measured rates) and what a plan says
(``Plan``: bytes per tier, whether they fit, the roofline step time), with its JSON and text renderings.

Invariant: no model logic here; ``planner.make_plan`` fills a ``Plan`` from a model's config.json and these rates.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """The machine the plan is for (defaults: the H100 reference box of docs/design.md section 3)."""

    gpu_memory_bytes: int
    host_memory_bytes: int
    gpu_tflops: float = 550.0
    """Sustained BF16 TFLOP/s of the training kernels, recompute included, at 8 flop per parameter and token
    (measured on the H100 box by the roofline's GPU-only term with the fused loss kernel: 533 for Llama-3.1-8B, 583
    for Llama-3.2-3B with Liger; benchmarks/results/performance_h100_202611.md, session 13). Sessions 1-12 planned
    with 500, fitted to the torch loss path."""
    pcie_gbs: float = 50.0
    """Pinned host<->device GB/s in each direction."""
    adam_gparams: float = 5.2
    """CPU AdamW Gparam/s over FP32 master weights and moments, BF16 gradient in (DRAM-bandwidth bound; the C++
    kernel since session 9: 5.19-6.31 at 16 threads across the H100 box's instances, the lowest taken;
    benchmarks/results/cpu_adam_dma_h100host_202611.json). Sessions 1-12 planned with 4.5, the earlier kernel's."""
    gpu_hbm_gbs: float = 2800.0
    """Effective GPU memory GB/s of the resident layers' fused AdamW (~40 B/param moved: FP32 master, grad and
    moments in and out, the BF16 weights refreshed; H100 SXM HBM3 peaks at 3,350)."""
    disk_free_bytes: int | None = None
    """Free space where ``engine.offload_dir`` lives (None: unknown, not checked)."""
    disk_read_gbs: float = 1.5
    """Sequential O_DIRECT read GB/s of the offload disk (the H100 box, docs/design.md section 3)."""
    disk_write_gbs: float = 1.3
    """Sequential O_DIRECT write GB/s of the offload disk."""


@dataclass
class Plan:
    """Bytes per tier, whether they fit, and the roofline step time."""

    model_type: str
    params: dict[str, int]
    """Parameters per component: embedding, decoder_layers, largest_layer, norm, lm_head, total."""
    host: dict[str, int]
    pinned: dict[str, int]
    gpu: dict[str, int]
    disk: dict[str, int]
    step_seconds: dict[str, float]
    settings: dict[str, Any]
    hardware: Hardware
    notes: list[str] = field(default_factory=list)
    state_terms: list[str] = field(default_factory=list)
    """The host and pinned terms that are training state (sized by the parameters; sharded over data-parallel
    ranks); every other host or pinned term is a per-process buffer."""

    @property
    def host_total(self) -> int:
        """Host RAM in bytes, pinned included."""
        return sum(self.host.values()) + sum(self.pinned.values())

    @property
    def gpu_total(self) -> int:
        """GPU memory in bytes."""
        return sum(self.gpu.values())

    @property
    def offload_bytes(self) -> int:
        """Bytes of training state in the offload directory (the disk tier)."""
        return sum(v for k, v in self.disk.items() if k.startswith("offload:"))

    @property
    def fits(self) -> bool:
        """True when the GPU, the host budget and (with offloaded state) the offload disk hold the plan."""
        free = self.hardware.disk_free_bytes
        return (
            self.gpu_total <= self.hardware.gpu_memory_bytes
            and self.host_total <= self.hardware.host_memory_bytes
            and (free is None or self.offload_bytes <= free)
        )

    def to_json(self) -> str:
        """The plan as JSON (bytes and seconds)."""
        d = asdict(self)
        d.update(host_total=self.host_total, gpu_total=self.gpu_total, offload_bytes=self.offload_bytes,
                 fits=self.fits)
        return json.dumps(d, indent=1)

    def render(self) -> str:
        """A human-readable report."""
        p = self.params
        lines = [
            f"model: {self.model_type}, {p['total'] / 1e9:.3f} B params "
            f"(embedding {p['embedding'] / 1e6:,.1f} M, {self.settings['layers']} decoder layers of "
            f"{p['largest_layer'] / 1e6:,.1f} M, head {p['lm_head'] / 1e6:,.1f} M"
            f"{' tied' if self.settings['tied'] else ''})",
            f"run: {self.settings['tokens_per_micro_batch']:,} tokens per micro-batch x "
            f"{self.settings['grad_accum']} "
            f"micro-batches, window {self.settings['window']}, schedule {self.settings['schedule']}",
        ]

        def section(title: str, items: dict[str, int], budget: int | None = None) -> None:
            total = sum(items.values())
            tail = (
                f" of {budget / GIB:,.1f} GiB -> {'fits' if total <= budget else 'DOES NOT FIT'}"
                if budget
                else ""
            )
            lines.append(f"{title}: {total / GIB:,.2f} GiB{tail}")
            lines.extend(f"  {k:<34} {v / GIB:>10,.2f} GiB" for k, v in items.items())

        section("GPU", self.gpu, self.hardware.gpu_memory_bytes)
        section("pinned host RAM", self.pinned)
        section("pageable host RAM", self.host)
        lines.append(
            f"host RAM total: {self.host_total / GIB:,.2f} GiB of "
            f"{self.hardware.host_memory_bytes / GIB:,.1f} GiB -> "
            f"{'fits' if self.host_total <= self.hardware.host_memory_bytes else 'DOES NOT FIT'}"
        )
        section("disk", self.disk)
        if self.offload_bytes:
            free = self.hardware.disk_free_bytes
            lines.append(
                f"disk tier ({self.settings['offload']}"
                f"{' + activations' if self.settings.get('offload_activations') else ''}, "
                f"{self.settings['offload_dir']}): "
                f"{self.offload_bytes / GIB:,.2f} GiB of "
                + (f"{free / GIB:,.1f} GiB free -> {'fits' if self.offload_bytes <= free else 'DOES NOT FIT'}"
                   if free is not None else "unknown free space")
            )
        s = self.step_seconds
        bound = max(s, key=lambda k: s[k] if k != "step" else -1)
        lines.append(
            f"predicted step: {s['step']:.2f} s (bound: {bound}; "
            + ", ".join(f"{k} {v:.2f} s" for k, v in s.items() if k != "step")
            + ")"
        )
        h = self.hardware
        lines.append(
            f"assumes {h.gpu_tflops:g} TFLOP/s on the GPU, {h.pcie_gbs:g} GB/s PCIe per direction, "
            f"{h.adam_gparams:g} Gparam/s CPU AdamW"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append("fits" if self.fits else "does NOT fit")
        return "\n".join(lines)
