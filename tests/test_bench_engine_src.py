"""``benchmarks/bench_step.py --engine-src``: a system ``slideformer@LABEL`` runs the engine of another source
tree in the same invocation; its arguments are checked before any child starts, and the child checks where it
imported the engine from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.bench_modules import load

ROOT = Path(__file__).resolve().parent.parent


def test_engine_src_arguments_are_checked(tmp_path: Path) -> None:
    bench = load("bench_step")
    base = ["--model", "tiny", "--device", "cpu"]
    with pytest.raises(SystemExit):  # a label with no --engine-src
        bench.parse_args([*base, "--systems", "slideformer@prev"])
    with pytest.raises(SystemExit):  # a directory without the package
        bench.parse_args([*base, "--systems", "slideformer@prev", "--engine-src", f"prev={tmp_path}"])
    (tmp_path / "slideformer").mkdir()
    args = bench.parse_args([*base, "--systems", "slideformer,slideformer@prev+window=1",
                             "--engine-src", f"prev={tmp_path}"])
    assert args.engine_src == {"prev": str(tmp_path.resolve())}


def test_a_labelled_system_runs_the_other_tree(tmp_path: Path) -> None:
    """The same engine copied elsewhere runs as ``slideformer@copy`` (CPU, tiny shape) and says where from."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "slideformer", src / "slideformer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--model", "tiny",
                           "--batch-size", "1", "--seq-len", "32", "--device", "cpu", "--steps", "1", "--warmup", "1",
                           "--no-roofline", "--systems", "slideformer@copy", "--engine-src", f"copy={src}",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["args"]["engine_src"] == {"copy": str(src.resolve())}
    assert [(r["system"], r["status"]) for r in results["records"]] == [("slideformer@copy", "ok")]
    if Path("/proc/vmstat").exists():  # the host's memory counters over the steps, and their table
        assert set(results["records"][0]["host_vmstat_steps"]) >= {"kswapd scanned", "allocation stalls"}
        assert "## Host memory management during the steps" in out.with_suffix(".md").read_text()
