"""Turn a step-benchmark JSON into its report: derived numbers, markdown, CSV and PNG plots.

``python benchmarks/report.py RESULTS.json`` regenerates ``RESULTS.md``, ``RESULTS.csv``,
``RESULTS_tokens.png`` and ``RESULTS_memory.png`` beside it; ``bench_step.py`` calls the same
functions at the end of a run. Formulas used here are stated in the markdown they produce.
"""

from __future__ import annotations

import csv
import json
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import host_vmstat

GIB = 1 << 30
BYTES_UP_PER_PARAM = 4
"""BF16 weights uploaded twice per step (forward, then recompute/backward)."""
BYTES_DOWN_PER_PARAM = 2
"""BF16 gradients downloaded once per step."""
ADAM_BYTES_PER_PARAM = 28
"""Host memory one AdamW update moves: FP32 master and both moments read and written (24 B), the BF16
gradient read (2 B) and the BF16 upload copy written (2 B); the roofline's kernel measure does exactly this."""
SYSTEM_ORDER = ("slideformer", "resident", "zero2", "zero3")


# ---------------------------------------------------------------- environment


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi (no CUDA context is created in the parent)."""
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def environment(repo_root: Path) -> dict[str, Any]:
    """Hardware, software versions and the git commit, read by the parent before any child runs.

    GPU facts come from nvidia-smi, so the parent never holds a CUDA context (and its memory).
    """
    import psutil
    import torch

    gpu: dict[str, Any] = {"name": gpu_name(), "cuda": torch.version.cuda}
    gpu["nvidia_smi"] = _run(
        [
            "nvidia-smi",
            "--query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current,clocks.max.sm",
            "--format=csv,noheader",
        ]
    )
    return {
        "gpu": gpu,
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": psutil.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "ram_bytes": psutil.virtual_memory().total,
        },
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            p: _version(p)
            for p in (
                "torch",
                "transformers",
                "deepspeed",
                "liger-kernel",
                "triton",
                "slideformer",
                "psutil",
                "matplotlib",
            )
        },
        "git_commit": _run(["git", "-C", str(repo_root), "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_run(["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"])),
    }


# ---------------------------------------------------------------- derived numbers


def _ok(records: list[dict[str, Any]], system: str, batch: int) -> dict[str, Any] | None:
    for r in records:
        if r.get("system") == system and r.get("batch_size") == batch and r.get("status") == "ok":
            return r
    return None


def _roofline_child(records: list[dict[str, Any]], batch: int) -> dict[str, Any] | None:
    """The child the roofline's efficiency is measured on: ``slideformer`` (this tree, its defaults) when it ran, else
    the first variant of this tree's engine (``slideformer+KEY=VALUE``; a run of variants only), never another
    tree's (``slideformer@LABEL``)."""
    exact = _ok(records, "slideformer", batch)
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
            rec = _ok(records, system, b)
            if rec is None:
                continue
            row[f"{system}_tokens_per_s"] = rec["tokens_per_s"]
            row[f"{system}_host_bytes_per_param"] = rec["host_rss_peak_bytes"] / total
            if gpu_s:
                row[f"{system}_fraction_of_peak"] = gpu_s / rec["step_time_s"]
        sf = _roofline_child(records, b)
        if sf is not None:
            row["efficiency_child"] = sf["system"]
            report = sf.get("engine_memory_report") or {}
            host_params = report.get("host_updated_params") or report.get("host_params") or total
            streamed = report.get("streamed_params") or total
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
                row["host_memory_s"] = moved / (opt_rate * 1e9 * ADAM_BYTES_PER_PARAM)
                row["host_memory_efficiency"] = row["host_memory_s"] / sf["step_time_s"]
            row.update(
                host_updated_params=host_params,
                streamed_params=streamed,
                **{f"{k}_s": v for k, v in terms.items()},
            )
            if terms:
                bound_name = max(terms, key=lambda k: terms[k])
                row["bound_s"] = terms[bound_name]
                row["bound_by"] = bound_name
                row["efficiency"] = terms[bound_name] / sf["step_time_s"]
            for other in ("zero2", "zero3", "resident"):
                rec = _ok(records, other, b)
                if rec is not None:
                    row[f"speedup_vs_{other}"] = sf["tokens_per_s"] / rec["tokens_per_s"]
        out["per_batch"][str(b)] = row
    return out


# ---------------------------------------------------------------- markdown / csv / png


def _gib(x: Any) -> str:
    return "-" if x is None else f"{x / GIB:.1f}"


def _num(x: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _short_error(rec: dict[str, Any]) -> str:
    err = (rec.get("error") or "").strip().splitlines()
    first = err[0] if err else ""
    return first.replace("|", "\\|")[:160]


def _sorted_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    order = {s: i for i, s in enumerate(SYSTEM_ORDER)}
    return sorted(
        results.get("records", []), key=lambda r: (r.get("batch_size", 0), order.get(r.get("system", ""), 99))
    )


def _check(value: float | None, ok: bool | None) -> str:
    return "-" if value is None or ok is None else ("yes" if ok else "**no**")


def targets(results: dict[str, Any], derived: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Issue 3's targets that this run can check: (target, measured, required, met)."""
    args, shape = results["args"], results["shape"]
    records = results.get("records", [])
    rows: list[tuple[str, str, str, str]] = []
    cap = args.get("gpu_memory_gib")
    for b in args["batch_sizes"]:
        row = derived["per_batch"].get(str(b)) or {}
        if shape["name"] == "llama3.2-3b" and args["seq_len"] == 1024 and b == 8 and cap == 24:
            for other, need in (("zero2", 2.5), ("zero3", 3.0)):
                x = row.get(f"speedup_vs_{other}")
                rows.append(
                    (
                        f"1: slideformer / {other} tokens/s (3B, b8, 24 GiB cap)",
                        _num(x, "{:.2f}x"),
                        f">= {need}x",
                        _check(x, x is not None and x >= need),
                    )
                )
        if shape["name"] == "llama3.1-8b" and args["seq_len"] == 1024 and b == 32:
            x = row.get("slideformer_fraction_of_peak")
            rows.append(
                (
                    "2: slideformer / no-offload peak (8B, b32)",
                    _num(x, "{:.0%}"),
                    ">= 90%",
                    _check(x, x is not None and x >= 0.9),
                )
            )
            x = row.get("efficiency")
            rows.append(
                ("2: efficiency (8B, b32)", _num(x, "{:.2f}"), ">= 0.90", _check(x, x is not None and x >= 0.9))
            )
        x = row.get("efficiency")
        if x is not None:
            child = row.get("efficiency_child", "slideformer")
            label = f"3: efficiency, batch {b}" + ("" if child == "slideformer" else f" ({child})")
            rows.append((label, f"{x:.2f}", ">= 0.85", _check(x, x >= 0.85)))
        sf = _ok(records, "slideformer", b)
        if sf is not None:
            ckpt = shape["num_layers"] * b * args["seq_len"] * shape["hidden_size"] * 2
            limit = 12.5 * shape["total_params"] + ckpt + 3 * GIB
            rss = sf["host_rss_peak_bytes"]
            rows.append(
                (
                    f"4: host RSS, batch {b}",
                    f"{rss / GIB:.1f} GiB",
                    f"<= {limit / GIB:.1f} GiB (12.5 B/param + BF16 checkpoints + 3 GiB)",
                    _check(rss, rss <= limit),
                )
            )
            alloc = sf.get("gpu_peak_allocated_bytes")
            if shape["name"] == "llama3.1-8b" and args["seq_len"] == 1024 and b == 8 and alloc is not None:
                rows.append(
                    (
                        "4: GPU allocated (8B, b8)",
                        f"{alloc / GIB:.1f} GiB",
                        "<= 10 GiB",
                        _check(alloc, alloc <= 10 * GIB),
                    )
                )
    if shape["name"] == "llama3.1-8b":
        for r in records:
            if r.get("system") in ("zero2", "zero3"):
                what = "ran" if r.get("status") == "ok" else _short_error(r)[:80]
                rss = r.get("host_rss_peak_bytes")
                rows.append(
                    (
                        f"5: {r['system']} on 8B, batch {r['batch_size']}",
                        f"{what}; host RSS {_gib(rss)} GiB",
                        "shown",
                        "yes",
                    )
                )
    sec = (results.get("roofline") or {}).get("cpu_adam_slideformer") or {}
    if "gparam_s" in sec:
        x = sec["gparam_s"]
        rows.append(
            (
                f"6: CPU AdamW, BF16 grad in + BF16 copy out ({sec['threads']} threads)",
                f"{x:.2f} Gparam/s",
                ">= 3 Gparam/s",
                _check(x, x >= 3.0),
            )
        )
    return rows


def main_thread_lines(results: dict[str, Any]) -> list[str]:
    """The main thread's share of each step (records since session 16): the median wall time of the ``step()`` call
    and the CPU time the thread spent in it, against the median step. A CPU share near 1 is a step bound by the
    thread that issues it."""
    rows = [r for r in _sorted_records(results) if r.get("status") == "ok" and r.get("step_main_thread_cpu_s")]
    if not rows:
        return []
    lines = ["", "## Main thread (issuing each step)", "",
             "| batch | system | step (s) | step() call (s) | main-thread CPU (s) | CPU / step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        cpu = statistics.median(r["step_main_thread_cpu_s"])
        call = statistics.median(r.get("step_call_times_s") or [float("nan")])
        lines.append(f"| {r['batch_size']} | {r['system']} | {r['step_time_s']:.3f} | {call:.3f} | {cpu:.3f} "
                     f"| {cpu / r['step_time_s']:.0%} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The human report: setup, results table, roofline, ratios, formulas, errors."""
    meta, args, shape = results["meta"], results["args"], results["shape"]
    derived = results.get("derived") or derive(results)
    env = meta.get("environment", {})
    gpu, cpu = env.get("gpu", {}), env.get("cpu", {})
    lines = [
        f"# Step benchmark: {shape['name']}, seq {args['seq_len']}, batch {', '.join(map(str, args['batch_sizes']))}",
        "",
        f"- Date: {meta.get('date')}",
        f"- Command: `{meta.get('command')}`",
        f"- GPU: {gpu.get('nvidia_smi') or gpu.get('name') or 'none'}"
        + (f"; capped at {args['gpu_memory_gib']} GiB per process" if args.get("gpu_memory_gib") else ""),
        f"- CPU: {cpu.get('model')}, {cpu.get('physical_cores')} cores / {cpu.get('logical_cores')} threads, "
        f"RAM {_gib(cpu.get('ram_bytes'))} GiB; {env.get('platform')}",
        "- Versions: python "
        + str(env.get("python"))
        + ", "
        + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
        + f"; CUDA {gpu.get('cuda')}; git {env.get('git_commit')}"
        + (" (dirty)" if env.get("git_dirty") else ""),
        f"- Model: {shape['name']} ({shape.get('source')}), random init, "
        f"{shape['total_params'] / 1e9:.3f} B params "
        f"({shape['num_layers']} layers, hidden {shape['hidden_size']}, vocab {shape['vocab_size']}, "
        f"{'tied' if shape['tied'] else 'untied'} head)",
        f"- Steps: {args['warmup']} warm-up + {args['steps']} measured per batch size; step time = median; "
        "random tokens, full-length sequences; tokens/step = batch x seq.",
        f"- Kernels: {args.get('kernels', 'torch')} (every system alike: "
        + ("Liger-Kernel's Triton RMSNorm, SwiGLU and RoPE on each model instance; "
           if args.get("kernels") == "liger" else "HF's torch modules; ")
        + "SDPA attention; slideformer's LM head is its chunked linear cross-entropy).",
        "",
        "## Results",
        "",
        "| batch | system | mode | step (s) | tokens/s | model TFLOPS | of peak | GPU alloc / reserved (GiB) "
        "| host RSS (GiB) | host B/param | pinned (GiB) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _sorted_records(results):
        b = r.get("batch_size")
        row = derived["per_batch"].get(str(b)) or {}
        system = r.get("system")
        if r.get("status") == "ok":
            frac = row.get(f"{system}_fraction_of_peak")
            lines.append(
                f"| {b} | {system} | {r.get('mode')} | {r['step_time_s']:.3f} | {_num(r['tokens_per_s'])} "
                f"| {r['model_tflops']:.1f} | {_num(frac, '{:.0%}')} "
                f"| {_gib(r.get('gpu_peak_allocated_bytes'))} / {_gib(r.get('gpu_peak_reserved_bytes'))} "
                f"| {_gib(r.get('host_rss_peak_bytes'))} "
                f"| {_num(row.get(f'{system}_host_bytes_per_param'), '{:.1f}')} "
                f"| {_gib(r.get('pinned_bytes'))} | {(r.get('fallback_reason') or '')[:120]} |"
            )
        else:
            lines.append(
                f"| {b} | {system} | {r.get('mode', '-')} | - | - | - | - "
                f"| {_gib(r.get('gpu_peak_allocated_bytes'))} / {_gib(r.get('gpu_peak_reserved_bytes'))} "
                f"| {_gib(r.get('host_rss_peak_bytes'))} | - | - | **{r.get('status')}**: {_short_error(r)} |"
            )
    lines += main_thread_lines(results)
    lines += host_vmstat.lines(_sorted_records(results))
    lines += ["", "## Roofline (slideformer)", ""]
    roof = results.get("roofline") or {}
    if roof.get("error"):
        lines.append(f"- Roofline not measured: {roof['error'].strip().splitlines()[0][:300]}")
    pcie = roof.get("pcie") or {}
    if "error" in pcie or not pcie:
        lines.append(f"- PCIe: not measured ({pcie.get('error', 'no roofline')})")
    else:
        lines.append(
            f"- PCIe (pinned, {pcie['buffer_bytes'] >> 20} MiB buffers): H2D {pcie['h2d_gbs']:.1f} GB/s, "
            f"D2H {pcie['d2h_gbs']:.1f} GB/s, both at once {pcie['both_gbs']:.1f} GB/s"
        )
    for key, label in (
        ("cpu_adam_torch", "CPU AdamW (torch)"),
        ("cpu_adam_slideformer", "CPU AdamW (slideformer)"),
    ):
        sec = roof.get(key) or {}
        if "gparam_s" in sec:
            lines.append(
                f"- {label}: {sec['gparam_s']:.2f} Gparam/s at {sec['threads']} threads "
                f"({sec['params'] / 1e6:.0f} M params; {sec['what']})"
            )
        else:
            lines.append(f"- {label}: not measured ({(sec.get('error') or 'no roofline').splitlines()[0][:200]})")
    lines += [
        f"- Optimizer rate used for the bound: {derived.get('optimizer_rate_source')}.",
        "",
        "| batch | GPU compute (s) | CPU optimizer (s) | PCIe (s) | bound (s) | bound by "
        "| slideformer step (s) "
        "| efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in args["batch_sizes"]:
        row = derived["per_batch"].get(str(b)) or {}
        sf = _roofline_child(results.get("records", []), b)
        lines.append(
            f"| {b} | {_num(row.get('gpu_compute_s'), '{:.3f}')} "
            f"| {_num(row.get('cpu_optimizer_s'), '{:.3f}')} "
            f"| {_num(row.get('pcie_s'), '{:.3f}')} | {_num(row.get('bound_s'), '{:.3f}')} "
            f"| {row.get('bound_by', '-')} "
            f"| {_num(sf['step_time_s'] if sf else None, '{:.3f}')} "
            f"| {_num(row.get('efficiency'), '{:.2f}')} |"
        )
    variants = sorted({str(r.get("efficiency_child")) for r in derived["per_batch"].values()
                       if r.get("efficiency_child") not in (None, "slideformer")})
    if variants:
        lines += ["", f"This run has no plain `slideformer` child: the step and efficiency above are "
                  f"{', '.join(f'`{v}`' for v in variants)}'s."]
    if any("host_memory_s" in (derived["per_batch"].get(str(b)) or {}) for b in args["batch_sizes"]):
        lines += [
            "",
            "Host memory traffic (informational; not a term of the efficiency above): AdamW's "
            f"{ADAM_BYTES_PER_PARAM} B per host-updated parameter ({ADAM_BYTES_PER_PARAM - 2} without the BF16 "
            "copy) plus the transfers' bytes per streamed parameter (two uploads per step: 2 B each from the "
            "BF16 copy, 4 B cast on the device, 8 B cast on the host; gradients written once: "
            f"{BYTES_DOWN_PER_PARAM} B), at the bandwidth the AdamW measure above reaches alone "
            f"(Gparam/s x {ADAM_BYTES_PER_PARAM} B).",
            "",
            "| batch | host memory (s) | slideformer step (s) | host-memory efficiency |",
            "|---|---|---|---|",
        ]
        for b in args["batch_sizes"]:
            row = derived["per_batch"].get(str(b)) or {}
            sf = _roofline_child(results.get("records", []), b)
            lines.append(f"| {b} | {_num(row.get('host_memory_s'), '{:.3f}')} "
                         f"| {_num(sf['step_time_s'] if sf else None, '{:.3f}')} "
                         f"| {_num(row.get('host_memory_efficiency'), '{:.2f}')} |")
    checks = targets(results, derived)
    if checks:
        lines += [
            "",
            "## Issue 3 targets this run can check",
            "",
            "| target | measured | required | met |",
            "|---|---|---|---|",
        ]
        lines += [f"| {t} | {m} | {r} | {ok} |" for t, m, r, ok in checks]
    lines += ["", "## Ratios (tokens/s, same run)", ""]
    for b in args["batch_sizes"]:
        row = derived["per_batch"].get(str(b)) or {}
        parts = [
            f"vs {o}: {row[f'speedup_vs_{o}']:.2f}x" for o in ("zero2", "zero3", "resident") if f"speedup_vs_{o}" in row
        ]
        lines.append(f"- batch {b}: slideformer " + ("; ".join(parts) if parts else "-"))
    lines += [
        "",
        "## Definitions",
        "",
        "- tokens/s = batch x seq / median step time. A step is forward + backward + optimizer update, timed "
        "between device synchronisations at consecutive step ends (work overlapped into the next step is "
        "charged to it).",
        "- Model TFLOPS = tokens/s x (6·N + 12·L·(heads·head_dim)·S) / 1e12 (PaLM's MFU form); "
        f"N = non-embedding parameters + LM head = {shape['flop_params'] / 1e9:.3f} B; attention counted "
        "for the full (non-causal) S x S; activation recompute NOT counted.",
        "- 'of peak' = GPU-only time of the same layers (roofline GPU compute) / the system's step time.",
        "- Roofline: GPU compute = the per-layer no-offload peak step (embedding + 1 HF decoder layer "
        "forward, recompute and backward x L + chunked cross-entropy head; BF16, SDPA, no optimizer); "
        "CPU optimizer = parameters updated on the host / measured Gparam/s; PCIe = parameters streamed x "
        f"({BYTES_UP_PER_PARAM} B up: BF16 weights twice; {BYTES_DOWN_PER_PARAM} B down: BF16 grads once) / "
        "measured GB/s (the slowest of up alone, down alone, both at once). efficiency = max(terms) / "
        "measured slideformer step time. Parameters updated/streamed come from the engine's memory_report "
        "(host_updated_params / streamed_params) when it reports them, else all parameters.",
        "- GPU memory: torch.cuda.max_memory_allocated / max_memory_reserved over setup and the steps "
        "(CUDA context not included). Host RSS: psutil, sampled every 50 ms, peak over setup and steps. "
        "Pinned: slideformer's memory_report; DeepSpeed: pinned tensors reachable from its optimizer "
        "(lower bound); resident: 0.",
        "- resident: FP32 master weights on the GPU, torch.optim.AdamW(fused=True), BF16 autocast, "
        "HF gradient checkpointing (non-reentrant), SDPA; when 16 B/param + activations do not fit the GPU "
        "(or the cap), "
        "mode = peak: the per-layer no-offload peak above, timed on the GPU alone.",
    ]
    described: set[str] = set()
    for r in results.get("records", []):
        system = r.get("system")
        if system in ("zero2", "zero3") and isinstance(r.get("config"), dict) and system not in described:
            described.add(system)
            lines.append(
                f"- {system}: DeepSpeed {r.get('deepspeed_version')}, config "
                f"`{json.dumps(r['config'], separators=(',', ':'))}`; HF gradient checkpointing (reentrant), "
                "SDPA, BF16 model built on the GPU (ZeRO-3: under zero.Init), DeepSpeedCPUAdam."
            )
    sf_cfg = next(
        (r.get("config") for r in results.get("records", []) if r.get("system") == "slideformer" and r.get("config")),
        None,
    )
    if sf_cfg:
        lines.append(f"- slideformer config: `{json.dumps(sf_cfg, separators=(',', ':'), default=str)}`")
    errors = [r for r in _sorted_records(results) if r.get("status") != "ok" and r.get("error")]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            lines += [
                f"### {r['system']}, batch {r['batch_size']} ({r.get('status')})",
                "",
                "```",
                r["error"].strip()[:3000],
                "```",
                "",
            ]
    children = results.get("children") or {}
    if children:
        lines += [
            "",
            "## Child processes",
            "",
            "| child | exit | wall (s) | RSS peak seen by parent (GiB) | note |",
            "|---|---|---|---|---|",
        ]
        for name, c in children.items():
            lines.append(
                f"| {name} | {c.get('returncode')} | {c.get('wall_s', 0):.0f} "
                f"| {_gib(c.get('rss_peak_bytes'))} | {c.get('killed') or ''} |"
            )
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "model",
    "batch_size",
    "seq_len",
    "system",
    "mode",
    "status",
    "step_time_s",
    "tokens_per_s",
    "model_tflops",
    "gpu_peak_allocated_bytes",
    "gpu_peak_reserved_bytes",
    "host_rss_peak_bytes",
    "pinned_bytes",
    "setup_time_s",
    "error",
)


def write_csv(results: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in _sorted_records(results):
            w.writerow({k: (r.get(k) if k != "error" else _short_error(r)) for k in CSV_FIELDS})


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
    fig.tight_layout()
    path = stem.with_name(stem.name + "_tokens.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

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
        fig.tight_layout()
        path = stem.with_name(stem.name + "_memory.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_all(results: dict[str, Any], json_path: Path) -> list[Path]:
    """Derive, then write JSON, markdown, CSV and plots next to ``json_path``; returns the paths."""
    results["derived"] = derive(results)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, default=str))
    stem = json_path.with_suffix("")
    # Names like "llama3.2-3b" contain dots: append, never with_suffix (it would cut at "llama3").
    md = stem.parent / (stem.name + ".md")
    md.write_text(markdown(results))
    csv_path = stem.parent / (stem.name + ".csv")
    write_csv(results, csv_path)
    return [json_path, md, csv_path, *plot(results, stem)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/report.py RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    for p in write_all(json.loads(path.read_text()), path):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
