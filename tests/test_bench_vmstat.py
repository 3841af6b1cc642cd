"""``benchmarks/host_vmstat.py``: the kernel's memory counters over a child's steps, grouped, and their table."""

from __future__ import annotations

from pathlib import Path

from tests.bench_modules import load


def test_counters_are_grouped_and_differenced(tmp_path: Path) -> None:
    vm = load("host_vmstat")
    before, after = tmp_path / "before", tmp_path / "after"
    before.write_text("pgscan_kswapd 10\npgscan_direct 0\nallocstall_normal 1\nallocstall_movable 2\n"
                      "compact_stall 5\npgmigrate_success 7\nthp_collapse_alloc 0\npgmajfault 100\nnr_free_pages 9\n")
    after.write_text("pgscan_kswapd 510\npgscan_direct 30\nallocstall_normal 4\nallocstall_movable 2\n"
                     "compact_stall 5\npgmigrate_success 70\nthp_collapse_alloc 1\npgmajfault 100\nnr_free_pages 1\n")
    got = vm.delta(vm.read(before), vm.read(after))
    assert got == {"kswapd scanned": 500, "direct reclaim scanned": 30, "allocation stalls": 3,
                   "compaction stalls": 0, "pages migrated": 63, "THP collapses": 1, "major faults": 0}
    assert vm.read(tmp_path / "missing") == {} and vm.delta({}, vm.read(after)) == {}
    rows = vm.lines([{"status": "ok", "batch_size": 8, "system": "slideformer", "step_time_s": 0.43,
                      "host_vmstat_steps": got},
                     {"status": "ok", "batch_size": 8, "system": "zero2", "step_time_s": 1.8, "host_vmstat_steps": {}}])
    assert len(rows) == 6 and rows[-1].startswith("| 8 | slideformer | 0.430 | 500 | 30 | 3 | 0 | 63 | 1 | 0 |")
    assert vm.lines([{"status": "ok", "host_vmstat_steps": {}}]) == []
