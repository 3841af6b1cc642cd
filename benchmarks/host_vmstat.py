"""The host kernel's memory-management counters over a child's timed steps (``/proc/vmstat``), and their table.

Session 18 saw three slideformer children run slow for all their steps right after other heavy host-memory work in
the same call: the GPU tests, a profile, and ZeRO-3 at 75 GiB RSS. One candidate is the kernel reclaiming or
compacting memory meanwhile. A benchmark record carries these counters' growth over its warm-up and measured steps
(``host_vmstat_steps``), so a slow child and a fast one can be told apart by them.

Invariant: reads only. On a host without ``/proc/vmstat`` ``read`` returns nothing, every delta is empty and the
report leaves the table out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VMSTAT = Path("/proc/vmstat")
GROUPS: dict[str, tuple[str, ...]] = {
    "kswapd scanned": ("pgscan_kswapd",),
    "direct reclaim scanned": ("pgscan_direct",),
    "allocation stalls": ("allocstall_",),
    "compaction stalls": ("compact_stall",),
    "pages migrated": ("pgmigrate_success",),
    "THP collapses": ("thp_collapse_alloc",),
    "major faults": ("pgmajfault",),
}
"""Each reported figure: the sum of the counters named, a name ending in ``_`` standing for every counter it
begins (``allocstall_normal``, ``allocstall_movable``, ...)."""


def read(path: Path = VMSTAT) -> dict[str, int]:
    """The kernel's counters now, by name (empty where the file cannot be read)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def _total(counters: dict[str, int], names: tuple[str, ...]) -> int:
    return sum(v for k, v in counters.items() if any(k.startswith(n) if n.endswith("_") else k == n for n in names))


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Each group's growth from ``before`` to ``after`` (empty when either read found nothing)."""
    if not before or not after:
        return {}
    return {group: _total(after, names) - _total(before, names) for group, names in GROUPS.items()}


def lines(records: list[dict[str, Any]]) -> list[str]:
    """The markdown table of the records' counters (none when no record carries them)."""
    rows = [r for r in records if r.get("status") == "ok" and r.get("host_vmstat_steps")]
    if not rows:
        return []
    out = ["", "## Host memory management during the steps (/proc/vmstat growth over warm-up + measured steps)", "",
           "| batch | system | step (s) | " + " | ".join(GROUPS) + " |",
           "|---|---|---|" + "---|" * len(GROUPS)]
    for r in rows:
        counts = r["host_vmstat_steps"]
        out.append(f"| {r['batch_size']} | {r['system']} | {r['step_time_s']:.3f} | "
                   + " | ".join(f"{counts.get(g, 0):,}" for g in GROUPS) + " |")
    return out
