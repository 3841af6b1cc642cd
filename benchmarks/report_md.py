"""A step benchmark's markdown report: setup, results, main thread, host memory management, roofline and the issue
3 targets the run can check.

Owns ``markdown``, ``targets`` and ``main_thread_lines``. Invariant: every number it prints comes from the results
JSON (records, roofline, ``derive``'s output), and every formula it uses is stated in the text.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import host_vmstat
from report_derive import (
    ADAM_BYTES_PER_PARAM,
    BYTES_DOWN_PER_PARAM,
    BYTES_UP_PER_PARAM,
    GIB,
    SYSTEM_ORDER,
    derive,
    ok_record,
    roofline_child,
)


def gib(x: Any) -> str:
    return "-" if x is None else f"{x / GIB:.1f}"


def _num(x: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def short_error(rec: dict[str, Any]) -> str:
    err = (rec.get("error") or "").strip().splitlines()
    first = err[0] if err else ""
    return first.replace("|", "\\|")[:160]


def sorted_records(results: dict[str, Any]) -> list[dict[str, Any]]:
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
        sf = ok_record(records, "slideformer", b)
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
                what = "ran" if r.get("status") == "ok" else short_error(r)[:80]
                rss = r.get("host_rss_peak_bytes")
                rows.append(
                    (
                        f"5: {r['system']} on 8B, batch {r['batch_size']}",
                        f"{what}; host RSS {gib(rss)} GiB",
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
    rows = [r for r in sorted_records(results) if r.get("status") == "ok" and r.get("step_main_thread_cpu_s")]
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


def _children_lines(batch_sizes: list[int], derived: dict[str, Any]) -> list[str]:
    """Every slideformer child of a run with more than one, each against the roofline above with its own host-updated
    and streamed parameters (``derive``'s ``children``)."""
    rows = [(b, name, c) for b in batch_sizes
            for name, c in ((derived["per_batch"].get(str(b)) or {}).get("children") or {}).items()]
    if len(rows) < 2:
        return []
    lines = ["", "Every slideformer child against this roofline (each with the parameters its engine updates on the "
             "host and streams):", "",
             "| batch | child | step (s) | CPU optimizer (s) | PCIe (s) | bound (s) | bound by | efficiency "
             "| host-memory efficiency |", "|---|---|---|---|---|---|---|---|---|"]
    for b, name, c in rows:
        lines.append(f"| {b} | {name} | {c['step_time_s']:.3f} | {_num(c.get('cpu_optimizer_s'), '{:.3f}')} "
                     f"| {_num(c.get('pcie_s'), '{:.3f}')} | {_num(c.get('bound_s'), '{:.3f}')} "
                     f"| {c.get('bound_by', '-')} | {_num(c.get('efficiency'), '{:.2f}')} "
                     f"| {_num(c.get('host_memory_efficiency'), '{:.2f}')} |")
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
        f"RAM {gib(cpu.get('ram_bytes'))} GiB; {env.get('platform')}",
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
    for r in sorted_records(results):
        b = r.get("batch_size")
        row = derived["per_batch"].get(str(b)) or {}
        system = r.get("system")
        if r.get("status") == "ok":
            frac = row.get(f"{system}_fraction_of_peak")
            lines.append(
                f"| {b} | {system} | {r.get('mode')} | {r['step_time_s']:.3f} | {_num(r['tokens_per_s'])} "
                f"| {r['model_tflops']:.1f} | {_num(frac, '{:.0%}')} "
                f"| {gib(r.get('gpu_peak_allocated_bytes'))} / {gib(r.get('gpu_peak_reserved_bytes'))} "
                f"| {gib(r.get('host_rss_peak_bytes'))} "
                f"| {_num(row.get(f'{system}_host_bytes_per_param'), '{:.1f}')} "
                f"| {gib(r.get('pinned_bytes'))} | {(r.get('fallback_reason') or '')[:120]} |"
            )
        else:
            lines.append(
                f"| {b} | {system} | {r.get('mode', '-')} | - | - | - | - "
                f"| {gib(r.get('gpu_peak_allocated_bytes'))} / {gib(r.get('gpu_peak_reserved_bytes'))} "
                f"| {gib(r.get('host_rss_peak_bytes'))} | - | - | **{r.get('status')}**: {short_error(r)} |"
            )
    lines += main_thread_lines(results)
    lines += host_vmstat.lines(sorted_records(results))
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
        sf = roofline_child(results.get("records", []), b)
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
            sf = roofline_child(results.get("records", []), b)
            lines.append(f"| {b} | {_num(row.get('host_memory_s'), '{:.3f}')} "
                         f"| {_num(sf['step_time_s'] if sf else None, '{:.3f}')} "
                         f"| {_num(row.get('host_memory_efficiency'), '{:.2f}')} |")
    lines += _children_lines(args["batch_sizes"], derived)
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
    errors = [r for r in sorted_records(results) if r.get("status") != "ok" and r.get("error")]
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
                f"| {gib(c.get('rss_peak_bytes'))} | {c.get('killed') or ''} |"
            )
    return "\n".join(lines) + "\n"
