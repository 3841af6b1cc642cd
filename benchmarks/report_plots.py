"""A step benchmark's PNG plots: tokens/s against batch size per system, and GPU and host memory per system.

Owns ``plot``. Invariant: plots only the records that ran; without matplotlib it writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from report_derive import GIB, SYSTEM_ORDER


def _save(plt: Any, fig: Any, stem: Path, suffix: str) -> Path:
    """Write ``fig`` beside the results as ``<stem><suffix>`` and close it."""
    fig.tight_layout()
    path = stem.with_name(stem.name + suffix)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(results: dict[str, Any], stem: Path) -> list[Path]:
    """tokens/s vs batch size per system, and GPU / host memory per system; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    recs = [r for r in results.get("records", []) if r.get("status") == "ok"]
    title = f"{results['shape']['name']}, seq {results['args']['seq_len']}"
    if results["args"].get("gpu_memory_gib"):
        title += f", GPU cap {results['args']['gpu_memory_gib']} GiB"
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [(s, s, None) for s in SYSTEM_ORDER if s != "resident"]
    series += [("resident", "resident", "resident"), ("resident", "resident system: per-layer peak", "peak")]
    for system, label, mode in series:
        pts = sorted(
            (r["batch_size"], r["tokens_per_s"])
            for r in recs
            if r["system"] == system and (mode is None or r.get("mode") == mode)
        )
        if pts:
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, ls=":" if mode == "peak" else "-"
            )
    roof = (results.get("roofline") or {}).get("gpu_compute") or {}
    peak_pts = sorted((int(b), v["tokens_per_s"]) for b, v in roof.items() if "tokens_per_s" in v)
    if peak_pts:
        ax.plot(
            [p[0] for p in peak_pts],
            [p[1] for p in peak_pts],
            ls="--",
            color="gray",
            label="no-offload peak (roofline)",
        )
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    written.append(_save(plt, fig, stem, "_tokens.png"))

    labels, gpu_alloc, gpu_res, host = [], [], [], []
    for r in sorted(
        recs,
        key=lambda r: (
            r["batch_size"],
            SYSTEM_ORDER.index(r["system"]) if r["system"] in SYSTEM_ORDER else 99,
        ),
    ):
        labels.append(f"{r['system']}\nb{r['batch_size']}")
        gpu_alloc.append((r.get("gpu_peak_allocated_bytes") or 0) / GIB)
        gpu_res.append((r.get("gpu_peak_reserved_bytes") or 0) / GIB)
        host.append((r.get("host_rss_peak_bytes") or 0) / GIB)
    if labels:
        import numpy as np

        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4.5))
        ax.bar(x - 0.27, gpu_alloc, 0.27, label="GPU peak allocated")
        ax.bar(x, gpu_res, 0.27, label="GPU peak reserved")
        ax.bar(x + 0.27, host, 0.27, label="host RSS peak")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("GiB")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
        written.append(_save(plt, fig, stem, "_memory.png"))
    return written
