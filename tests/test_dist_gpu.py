"""Data-parallel on 2 GPUs (NCCL, BF16): 2 ranks equal one process with the whole batch (also with resident
layers, whose gradients are summed on the compute stream).

Launches ``tests/dist_harness.py`` on ``cuda:0`` and ``cuda:1`` and compares, as ``test_gpu.py`` does for one
GPU, against HF + AdamW under BF16 autocast on the union of both ranks' batches: the engine's parameter
update may deviate by at most ``update_rel_factor`` times autocast's own deviation from FP32 training.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tests.dist_harness import LR, WD, global_batches, launch
from tests.reference import adamw_for, make_model, reference_step, rel, tiny_config
from tests.tolerances import TOLERANCES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


@pytest.mark.parametrize("schedule,accumulate,max_norm,resident", [
    ("overlap", 1, None, 0), ("deferred", 2, 0.5, 0),
    # Resident layers: whole on both GPUs, gradients summed over NCCL on the compute stream.
    ("overlap", 1, None, 1), ("deferred", 2, 0.5, 2)])
def test_two_gpus_equal_one_big_batch_bf16(tmp_path: Path, schedule: str, accumulate: int,
                                            max_norm: float | None, resident: int) -> None:
    tol, family, steps = TOLERANCES["gpu_bf16"], "llama", 4
    out = tmp_path / "out.pt"
    procs = launch("parity", {"family": family, "schedule": schedule, "steps": steps, "accumulate": accumulate,
                              "max_norm": max_norm, "dtype": "bfloat16", "device": "cuda", "out": str(out),
                              "resident": resident})
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    got = torch.load(out)
    cfg = tiny_config(family)
    base = make_model(cfg)
    init = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref, fp32 = copy.deepcopy(base).cuda(), copy.deepcopy(base).cuda()
    opt_ref, opt_fp32 = adamw_for(ref, LR, WD, fused=True), adamw_for(fp32, LR, WD, fused=True)
    for step, batch in enumerate(global_batches(cfg.vocab_size, steps, 2, accumulate)):
        mbs = [{k: v.cuda() for k, v in mb.items()} for rank in batch for mb in rank]
        ref_loss = reference_step(ref, opt_ref, mbs, max_norm, autocast=torch.bfloat16)
        reference_step(fp32, opt_fp32, mbs, max_norm)
        assert abs(got["losses"][step] - ref_loss) <= tol["loss_rel"] * abs(ref_loss), step

    def updates(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(params[n].detach().float().cpu() - init[n]).reshape(-1) for n in init])

    d_engine = rel(updates(got["params"]), updates(dict(ref.named_parameters())))
    d_autocast = rel(updates(dict(ref.named_parameters())), updates(dict(fp32.named_parameters())))
    assert d_engine <= max(tol["update_rel_factor"] * d_autocast, tol["update_rel_floor"]), (d_engine, d_autocast)
