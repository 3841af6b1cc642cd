"""Crash/resume under SIGKILL, and run-to-run determinism of the command line.

The real CLI (``python -m slideformer train``, the packaged default model and data) runs in a
subprocess with a checkpoint every 2 steps. It is SIGKILLed at seeded random points -- while a
checkpoint is being written (the checkpointer's ``.tmp-step-*`` directory exists), at random delays, and
right after the final checkpoint became complete -- then ``--resume auto`` takes it to the end. The
final checkpoint must equal an uninterrupted run's byte for byte (weights, Adam moments, trainer state).
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from slideformer.train import checkpoint, tensor_io

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
ARGS = [
    f"--train.max_steps={STEPS}",
    "--checkpoint.every_steps=2",
    "--checkpoint.keep_last=2",
    "--train.progress_bar=false",
    "--train.tensorboard=false",
    "--train.plot=false",
    "--train.log_every=100",
    "--engine.device=cpu",
]
COMPARED = ("model.safetensors", "optimizer.safetensors", "trainer_state.json")
RUN_TIMEOUT_S = 120.0


def _start(out: Path, resume: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "slideformer", "train", f"--train.output_dir={out}", *ARGS]
    if resume:
        cmd += ["--resume", "auto"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes]) -> None:
    _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"run failed with {proc.returncode}:\n{err.decode()[-3000:]}"


def _final(out: Path) -> Path:
    path = out / "checkpoints" / checkpoint.step_dir_name(STEPS)
    checkpoint.verify(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the packaged default (its run directory)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _finish(_start(out, resume=False))
    return out


def _assert_same_final(got: Path, want: Path) -> None:
    a, b = checkpoint.read_manifest(_final(got))["files"], checkpoint.read_manifest(_final(want))["files"]
    for name in COMPARED:
        if a[name]["sha256"] == b[name]["sha256"]:
            continue
        if name.endswith(".safetensors"):  # say which tensors differ
            ta, tb = tensor_io.read_all(_final(got) / name), tensor_io.read_all(_final(want) / name)
            diff = [k for k in tb if k not in ta or not ta[k].equal(tb[k])]
            pytest.fail(f"{name} differs from the uninterrupted run: {diff[:5]}")
        pytest.fail(f"{name} differs from the uninterrupted run")


def _kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], extra_delay: float) -> bool:
    """SIGKILL ``proc`` ``extra_delay`` s after ``ready()`` first holds; False if it exited first."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run neither reached the kill point nor exited")
        time.sleep(0.0005)
    time.sleep(extra_delay)
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait()
    return True


def _mid_write(ckpt: Path, pid: int) -> bool:
    return any(p.name.startswith(".tmp-step-") and p.name.endswith(f"-{pid}") for p in ckpt.iterdir())


def _nth_write(ckpt: Path, pid: int, skip: int) -> Callable[[], bool]:
    """Holds while process ``pid`` writes a checkpoint, from its ``skip + 1``-th write on (temp
    directories left by earlier, killed processes do not count)."""
    seen: set[str] = set()

    def ready() -> bool:
        if not ckpt.is_dir():
            return False
        names = {p.name for p in ckpt.iterdir() if p.name.startswith(".tmp-step-") and p.name.endswith(f"-{pid}")}
        seen.update(names)
        return len(seen) > skip and bool(names)

    return ready


def _after(when: float) -> Callable[[], bool]:
    return lambda: time.monotonic() >= when


# Kill plans: (kind, parameter) per interruption; a final resume then runs to the end unkilled.
PLANS = {
    "during-checkpoint-writes": [("write", 0.0), ("write", 0.003)],
    "random-delays": [("delay", 0.0), ("delay", 0.0)],
    "after-final-checkpoint": [("write", 0.0), ("final", 0.0)],
}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, reference, plan):
    rng = random.Random(f"crash-{plan}")
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    killed_mid_write = 0
    started = False
    for kind, param in PLANS[plan]:
        # Skip a random number of checkpoint writes (the first save is at step 2) before killing.
        skip = rng.randrange(0, 3)
        proc = _start(out, resume=started)
        started = True
        t0 = time.monotonic()
        if kind == "write":
            killed = _kill_when(proc, _nth_write(ckpt, proc.pid, skip), param + rng.uniform(0.0, 0.002))
            killed_mid_write += killed and _mid_write(ckpt, proc.pid)
        elif kind == "delay":
            killed = _kill_when(proc, _after(t0 + rng.uniform(1.0, 8.0)), 0.0)  # start-up .. end of run
        else:
            final = ckpt / checkpoint.step_dir_name(STEPS) / checkpoint.MANIFEST
            killed = _kill_when(proc, final.is_file, 0.0)
        if not killed:
            _finish(proc)
    if "write" in (k for k, _ in PLANS[plan]):
        assert killed_mid_write, "no kill landed while a checkpoint was being written"
    _finish(_start(out, resume=True))
    _assert_same_final(out, reference)
    steps = [int(r["step"]) for r in csv.DictReader((out / "metrics.csv").open())]
    assert steps[-1] == STEPS
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def test_cli_runs_are_bitwise_deterministic(tmp_path, reference):
    """Same seed and data: identical per-step losses and final state, run to run (CPU)."""
    out = tmp_path / "again"
    _finish(_start(out, resume=False))

    def losses(run: Path) -> list[str]:
        return [r["loss"] for r in csv.DictReader((run / "metrics.csv").open())]

    assert len(losses(out)) == STEPS and losses(out) == losses(reference)
    _assert_same_final(out, reference)
