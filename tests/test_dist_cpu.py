"""Data-parallel training on the CPU (gloo, 2 processes) equals one process training on the whole batch.

Each test launches two ranks as subprocesses with torchrun's environment (``tests/dist_harness.py``).
Compared against plain HF + ``torch.optim.AdamW`` on the union of both ranks' micro-batches (one big
batch, token-weighted over all of them): every step's loss and grad norm, and every parameter and
Adam moment at the end, within the ``cpu_fp32`` tolerances. Also: a checkpoint saved by 2 ranks loads
into a single-process engine and continues as if uninterrupted (and one process's on two ranks), and a
rank that dies makes the other exit with an error instead of hanging.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tests.dist_harness import LR, WD, engine_configs, global_batches, launch
from tests.reference import adamw_for, make_model, reference_step, rel, tiny_config
from tests.tolerances import TOLERANCES

from slideformer import Engine
from slideformer.train import checkpoint
from slideformer.train.evaluate import eval_loss

TOL = TOLERANCES["cpu_fp32"]


def _finish(procs: list, timeout: float = 120.0) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except BaseException:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


def _reference(family: str, steps: int, accumulate: int,
               max_norm: float | None) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[float]]:
    cfg = tiny_config(family)
    ref = make_model(cfg)
    opt = adamw_for(ref, LR, WD, fused=True)
    batches = global_batches(cfg.vocab_size, steps, 2, accumulate)
    losses = []
    for step in batches:
        losses.append(reference_step(ref, opt, [mb for rank in step for mb in rank], max_norm))
    return ref, opt, losses


def _compare_state(got: dict, ref: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    names = dict(ref.named_parameters())
    assert set(got["params"]) == set(names)
    for name, p in names.items():
        assert rel(got["params"][name], p.detach()) <= TOL["param_rel"], name
        assert rel(got["exp_avg"][name], opt.state[p]["exp_avg"]) <= 1e-4, name
        assert rel(got["exp_avg_sq"][name], opt.state[p]["exp_avg_sq"]) <= 1e-4, name


PARITY = {
    # update in backward, tied head (the sharded embedding serves as the head)
    "overlap": dict(family="llama_tied", schedule="overlap", accumulate=1, max_norm=None),
    # 2 micro-batches per rank, global-norm clipping active at every step
    "deferred": dict(family="qwen3", schedule="deferred", accumulate=2, max_norm=0.5),
    # Resident layers (their whole state on every rank's device, gradients summed over the ranks, host state
    # sharded): one of three layers in the overlap schedule, two under clipping + accumulation.
    "resident_overlap": dict(family="llama", schedule="overlap", accumulate=1, max_norm=None, resident=1),
    "resident_deferred": dict(family="qwen3", schedule="deferred", accumulate=2, max_norm=0.5, resident=2),
}
STEPS = 3
# BF16 compute with the optimizer's upload copy (engine.host_copy) on and off: bitwise the same run (the
# copy of each sharded unit is this rank's shard; the replicated tied embedding's is whole).
COPY = dict(family="llama_tied", schedule="deferred", accumulate=2, max_norm=0.5, dtype="bfloat16")


RESUME_AT = 2


def _merged(step: list[list[dict]]) -> dict:
    """Both ranks' single micro-batches of one step as one batch."""
    both = [rank[0] for rank in step]
    return {k: torch.cat([b[k] for b in both]) for k in both[0]}


def _one_process_checkpoint(ckpt: Path, family: str, steps: int) -> None:
    """What one process saves after ``steps`` steps on both ranks' batches (the 1 -> 2 ranks resume)."""
    cfg = tiny_config(family)
    ecfg, ocfg = engine_configs({"schedule": "overlap"})
    engine = Engine(make_model(cfg), ecfg, ocfg)
    try:
        for step in global_batches(cfg.vocab_size, steps, 2, 1):
            engine.train_step(_merged(step))
        checkpoint.save(ckpt, steps, engine.state_dict(), {"note": "one process"})
    finally:
        engine.close()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank launch runs every data-parallel scenario in turn (process start-up dominates the time)."""
    d = tmp_path_factory.mktemp("dist")
    runs = [dict(args, scenario="parity", steps=STEPS, out=str(d / f"{name}.pt")) for name, args in PARITY.items()]
    runs += [dict(COPY, host_copy=c, scenario="parity", steps=STEPS, out=str(d / f"copy_{c}.pt"))
             for c in ("none", "bf16")]
    # Saved by 2 ranks with a resident layer (its device state written back to this rank's host shard).
    runs.append(dict(family="qwen3", schedule="overlap", accumulate=1, steps=2, scenario="checkpoint",
                     ckpt=str(d / "ckpt"), out=str(d / "checkpoint.pt"), resident=1))
    # The other way: one process's checkpoint continues on two ranks (each keeps its slice of the file).
    _one_process_checkpoint(d / "ckpt1", "qwen3", RESUME_AT)
    runs.append(dict(family="qwen3", schedule="overlap", accumulate=1, steps=2, scenario="parity",
                     resume=str(d / "ckpt1"), out=str(d / "resume.pt"), resident=2))  # loaded, then gathered on device
    # Streamed initialisation: random (a tied head, whose initialiser runs last) and from sharded files.
    make_model(tiny_config("qwen3"), seed=9).save_pretrained(str(d / "model"), max_shard_size="100KB")
    runs += [dict(family="llama_tied", schedule="overlap", accumulate=1, steps=0, scenario="parity",
                  init="random", out=str(d / "init_random.pt")),
             dict(family="qwen3", schedule="overlap", accumulate=1, steps=0, scenario="parity", init="load",
                  model_dir=str(d / "model"), out=str(d / "init_load.pt"))]
    for rc, err in _finish(launch("suite", {"runs": runs})):
        assert rc == 0, err[-4000:]
    return d


@pytest.mark.parametrize("name", sorted(PARITY))
def test_two_ranks_equal_one_big_batch(suite: Path, name: str) -> None:
    args = PARITY[name]
    got = torch.load(suite / f"{name}.pt")
    ref, opt, ref_losses = _reference(args["family"], STEPS, args["accumulate"], args["max_norm"])
    for step, (a, b) in enumerate(zip(got["losses"], ref_losses)):
        assert abs(a - b) <= TOL["loss_rel"] * abs(b), (step, a, b)
    assert all(n > 0 for n in got["norms"])
    if args["max_norm"] is not None:
        assert min(got["norms"]) > args["max_norm"]  # clipping was active, so the global norm mattered
    _compare_state(got, ref, opt)
    # Evaluation through the sharded window: rank 0's first micro-batch under the trained weights.
    first = global_batches(tiny_config(args["family"]).vocab_size, STEPS, 2, args["accumulate"])[0][0][0]
    want, _ = eval_loss(ref, [first])
    assert abs(got["eval"][0] - want) <= TOL["loss_rel"] * abs(want), (got["eval"], want)
    # Each rank keeps half of every unit's state, the embedding's included (plus at most one padding element
    # per unit).
    mem = got["memory"]
    per_param = 16 if args["schedule"] == "deferred" else 12
    expect = per_param * mem["num_params"] / 2
    if args.get("resident"):
        assert mem["resident_layers"] == args["resident"]
        if args["schedule"] == "deferred":  # resident layers accumulate on the device: no host accumulator
            resident = [f"model.layers.{j}." for j in range(args["resident"])]
            expect -= 4 * sum(p.numel() for n, p in ref.named_parameters() if n.startswith(tuple(resident))) / 2
    assert expect <= mem["host_state_bytes"] <= expect + per_param * 2 * len(ref.state_dict()), mem


@pytest.mark.parametrize("init", ["random", "load"])
def test_streamed_sharded_initialisation_equals_one_process(suite: Path, init: str) -> None:
    """Each rank fills and shards one unit at a time; gathered, the weights equal a single process's."""
    got = torch.load(suite / f"init_{init}.pt")
    family = "llama_tied" if init == "random" else "qwen3"
    ecfg, ocfg = engine_configs({"schedule": "overlap"})
    engine = (Engine.from_config(tiny_config(family), ecfg, ocfg, seed=3) if init == "random"
              else Engine.from_pretrained(str(suite / "model"), ecfg, ocfg))
    try:
        params = engine.state_dict()["params"]
        assert set(got["params"]) == set(params)
        for name, t in params.items():
            assert torch.equal(got["params"][name], t), name
    finally:
        engine.close()


def test_host_copy_is_bitwise_on_two_ranks(suite: Path) -> None:
    off, on = torch.load(suite / "copy_none.pt"), torch.load(suite / "copy_bf16.pt")
    assert off["losses"] == on["losses"] and off["norms"] == on["norms"]
    for part in ("params", "exp_avg", "exp_avg_sq"):
        for name, t in off[part].items():
            assert torch.equal(t, on[part][name]), (part, name)
    assert off["memory"]["upload_copy_bytes"] == 0 < on["memory"]["upload_copy_bytes"]


def test_checkpoint_from_two_ranks_continues_on_one(suite: Path) -> None:
    family, steps = "qwen3", 2
    ckpt = suite / "ckpt"
    cfg = tiny_config(family)
    ref, opt, _ = _reference(family, 2 * steps, 1, None)  # uninterrupted: 4 steps of both ranks' batches
    ecfg, ocfg = engine_configs({"schedule": "overlap"})
    engine = Engine(make_model(cfg, seed=5), ecfg, ocfg)  # other initial weights: the load must replace them
    try:
        sd = engine.state_dict()
        state = checkpoint.load(checkpoint.latest(ckpt), sd)
        sd["step"], sd["unit_steps"] = int(state["engine_step"]), None
        engine.load_state_dict(sd)
        batches = global_batches(cfg.vocab_size, 2 * steps, 2, 1)
        for step in batches[steps:]:
            engine.train_step(_merged(step))
        final = engine.state_dict()
        _compare_state({k: final[k] for k in ("params", "exp_avg", "exp_avg_sq")}, ref, opt)
        assert final["step"] == 2 * steps
    finally:
        engine.close()


def test_checkpoint_from_one_process_continues_on_two_ranks(suite: Path) -> None:
    got = torch.load(suite / "resume.pt")
    ref, opt, ref_losses = _reference("qwen3", RESUME_AT + 2, 1, None)  # uninterrupted, both ranks' batches
    for step, (a, b) in enumerate(zip(got["losses"], ref_losses[RESUME_AT:], strict=True)):
        assert abs(a - b) <= TOL["loss_rel"] * abs(b), (step, a, b)
    _compare_state(got, ref, opt)


def test_a_failing_rank_ends_the_other_with_an_error(tmp_path: Path) -> None:
    start = time.monotonic()
    procs = launch("fail", {"family": "llama", "schedule": "overlap", "steps": 3, "accumulate": 1,
                            "watchdog_s": 20.0, "out": str(tmp_path / "out.pt")})
    (rc0, err0), (rc1, err1) = _finish(procs, timeout=90)
    assert rc1 != 0 and "fails on purpose" in err1
    assert rc0 != 0, "rank 0 must not finish training alone"
    assert "DistError" in err0 and "other ranks failed" in err0, err0[-3000:]
    assert time.monotonic() - start < 60


def test_reference_helper_is_deterministic() -> None:
    # The harness and the test draw the same batches: the comparison above is of like with like.
    a = global_batches(1024, 2, 2, 2)
    b = global_batches(1024, 2, 2, 2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for s, t in zip(a, b) for r, q in zip(s, t)
               for x, y in zip(r, q))
    assert not torch.equal(a[0][0][0]["input_ids"], a[0][1][0]["input_ids"])  # ranks see different rows


def test_ranks_split_the_node_cores_for_the_cpu_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's OMP_NUM_THREADS=1 must not leave each rank's AdamW on one core: threads = cores / ranks."""
    import os

    from slideformer.dist.context import DistContext
    from slideformer.dist.group import Topology

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(32)), raising=False)
    assert DistContext(Topology(rank=1, world=4, local_rank=1, local_world=2), None).cpu_threads() == 16
    assert DistContext(Topology(rank=0, world=8, local_rank=0, local_world=8), None).cpu_threads() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert DistContext(Topology(rank=0, world=2, local_rank=0, local_world=2), None).cpu_threads() == 1
