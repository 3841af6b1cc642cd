"""A step benchmark's derived numbers: issue 3's roofline bound, efficiency and the ratios between systems.

Owns ``derive`` (``results['derived']``) and the byte counts its formulas use; ``report_md.py`` states the same
formulas in the markdown. Invariant: reads the records and the roofline child's measurements only.
"""

from __future__ import annotations

from typing import Any

GIB = 1 << 30
BYTES_UP_PER_PARAM = 4
"""BF16 weights uploaded twice per step (forward, then recompute/backward)."""
BYTES_DOWN_PER_PARAM = 2
"""BF16 gradients downloaded once per step."""
ADAM_BYTES_PER_PARAM = 28
"""Host memory one AdamW update moves: FP32 master and both moments read and written (24 B), the BF16
gradient read (2 B) and the BF16 upload copy written (2 B); the roofline's kernel measure does exactly this."""
SYSTEM_ORDER = ("slideformer", "resident", "zero2", "zero3")


def ok_record(records: list[dict[str, Any]], system: str, batch: int) -> dict[str, Any] | None:
    for r in records:
        if r.get("system") == system and r.get("batch_size") == batch and r.get("status") == "ok":
            return r
    return None


def roofline_child(records: list[dict[str, Any]], batch: int) -> dict[str, Any] | None:
    """The child the roofline's efficiency is measured on: ``slideformer`` (this tree, its defaults) when it ran, else
    the first variant of this tree's engine (``slideformer+KEY=VALUE``; a run of variants only), never another
    tree's (``slideformer@LABEL``)."""
    exact = ok_record(records, "slideformer", batch)
    if exact is not None:
        return exact
    for r in records:
        if (str(r.get("system", "")).startswith("slideformer+") and r.get("batch_size") == batch
                and r.get("status") == "ok"):
            return r
    return None


def _rate(section: dict[str, Any] | None, key: str) -> float | None:
    if not section or "error" in section:
        return None
    value = section.get(key)
    return float(value) if value else None


def child_roofline(rec: dict[str, Any], gpu_s: float | None, rates: dict[str, float | None],
                   total: int) -> dict[str, Any]:
    """One slideformer child against the run's roofline: issue 3's terms for the parameters it updates on the host and
    streams (its engine's memory report), its bound, efficiency, and the informational host-memory figure."""
    report = rec.get("engine_memory_report") or {}
    host_params = report.get("host_updated_params") or report.get("host_params") or total
    streamed = report.get("streamed_params") or total
    opt_rate, h2d, d2h, both = rates["opt"], rates["h2d"], rates["d2h"], rates["both"]
    out: dict[str, Any] = {"step_time_s": rec["step_time_s"]}
    terms: dict[str, float] = {}
    if gpu_s:
        terms["gpu_compute"] = gpu_s
    if opt_rate:
        terms["cpu_optimizer"] = host_params / (opt_rate * 1e9)
    if h2d and d2h and both:
        terms["pcie"] = max(
            BYTES_UP_PER_PARAM * streamed / (h2d * 1e9),
            BYTES_DOWN_PER_PARAM * streamed / (d2h * 1e9),
            (BYTES_UP_PER_PARAM + BYTES_DOWN_PER_PARAM) * streamed / (both * 1e9),
        )
    if opt_rate:
        # Informational, not a term of `efficiency` (issue 3 defines that bound): the host memory the
        # step moves - AdamW's bytes plus the DMA's reads of what is uploaded (the BF16 copy, or the FP32
        # master cast on the device) and writes of the gradients - at the bandwidth AdamW alone reaches.
        cast = report.get("upload_cast")
        adam = ADAM_BYTES_PER_PARAM if cast == "copy" else ADAM_BYTES_PER_PARAM - 2  # no BF16 copy out
        # Per upload (two per step): DMA of the BF16 copy 2 B; of the FP32 master 4 B (cast on the
        # device); cast on the host: FP32 read 4 + BF16 staging written 2 + its DMA 2.
        up = 2 * {"copy": 2, "host": 8}.get(str(cast), 4)
        moved = adam * host_params + (up + BYTES_DOWN_PER_PARAM) * streamed
        out["host_memory_s"] = moved / (opt_rate * 1e9 * ADAM_BYTES_PER_PARAM)
        out["host_memory_efficiency"] = out["host_memory_s"] / rec["step_time_s"]
    out.update(host_updated_params=host_params, streamed_params=streamed, **{f"{k}_s": v for k, v in terms.items()})
    if terms:
        bound_name = max(terms, key=lambda k: terms[k])
        out["bound_s"] = terms[bound_name]
        out["bound_by"] = bound_name
        out["efficiency"] = terms[bound_name] / rec["step_time_s"]
    return out


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Roofline bound, efficiency and ratios per batch size, from the records and the roofline."""
    shape = results["shape"]
    total = shape["total_params"]
    records = results.get("records", [])
    roof = results.get("roofline") or {}
    pcie = roof.get("pcie")
    sf_rate = _rate(roof.get("cpu_adam_slideformer"), "gparam_s")
    torch_rate = _rate(roof.get("cpu_adam_torch"), "gparam_s")
    opt_rate, opt_src = (sf_rate, "slideformer adamw_step") if sf_rate else (torch_rate, "torch _fused_adamw_")
    h2d, d2h, both = (_rate(pcie, k) for k in ("h2d_gbs", "d2h_gbs", "both_gbs"))
    out: dict[str, Any] = {"optimizer_rate_source": opt_src, "per_batch": {}}
    for b in results["args"]["batch_sizes"]:
        row: dict[str, Any] = {}
        gpu = (roof.get("gpu_compute") or {}).get(str(b)) or {}
        gpu_s = gpu.get("time_s")
        row["gpu_compute_s"] = gpu_s
        for system in SYSTEM_ORDER:
            rec = ok_record(records, system, b)
            if rec is None:
                continue
            row[f"{system}_tokens_per_s"] = rec["tokens_per_s"]
            row[f"{system}_host_bytes_per_param"] = rec["host_rss_peak_bytes"] / total
            if gpu_s:
                row[f"{system}_fraction_of_peak"] = gpu_s / rec["step_time_s"]
        sf = roofline_child(records, b)
        rates = {"opt": opt_rate, "h2d": h2d, "d2h": d2h, "both": both}
        if sf is not None:
            row["efficiency_child"] = sf["system"]
            row.update({k: v for k, v in child_roofline(sf, gpu_s, rates, total).items() if k != "step_time_s"})
            row["children"] = {r["system"]: child_roofline(r, gpu_s, rates, total) for r in records
                               if str(r.get("system", "")).startswith("slideformer") and r.get("batch_size") == b
                               and r.get("status") == "ok"}
            for other in ("zero2", "zero3", "resident"):
                rec = ok_record(records, other, b)
                if rec is not None:
                    row[f"speedup_vs_{other}"] = sf["tokens_per_s"] / rec["tokens_per_s"]
        out["per_batch"][str(b)] = row
    return out
