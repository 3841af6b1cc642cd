"""Two engine configurations trained side by side in BF16 on the GPU, judged by the scale of BF16 rounding.

Shared by the GPU tests that swap one kernel for another (``test_liger.py``: the decoder layers' kernels;
``test_cross_entropy.py``: the head's loss kernel): both configurations train the same tiny model on the same 4
batches, and their difference must stay within ``test_gpu.py``'s ``gpu_bf16`` bounds, measured against HF under BF16
autocast versus HF in FP32 in this very run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from tests.reference import adamw_for, make_model, random_batch, reference_step, rel, tiny_config
from tests.tolerances import TOLERANCES

from slideformer import Engine, EngineConfig, OptimConfig


def bf16_ab(family: str, vocab: int, options: dict[str, dict[str, Any]],
            check: Callable[[str, Engine], None] | None = None) -> None:
    """Train ``family`` (4 layers, hidden 128, ``vocab``) with each of the two ``options`` (EngineConfig keyword sets,
    by name; the first is the baseline) and assert the second's losses and updates against the first's.
    ``check(name, engine)`` runs on each engine before training."""
    tol = TOLERANCES["gpu_bf16"]
    cfg = tiny_config(family, layers=4, hidden=128, vocab=vocab)
    base = make_model(cfg)
    init = {n: p.detach().clone() for n, p in base.named_parameters()}
    # The scale of BF16 rounding in this very run: autocast HF against FP32 HF (as test_bf16_parity).
    ref, fp32 = copy.deepcopy(base).cuda(), copy.deepcopy(base).cuda()
    lr, wd = 1e-3, 0.1
    opt_ref, opt_fp32 = adamw_for(ref, lr, wd, fused=True), adamw_for(fp32, lr, wd, fused=True)
    gen = torch.Generator().manual_seed(5)
    batches = [random_batch(cfg.vocab_size, 3, 37, gen) for _ in range(4)]
    for batch in batches:
        dev = [{k: v.cuda() for k, v in batch.items()}]
        reference_step(ref, opt_ref, dev, None, autocast=torch.bfloat16)
        reference_step(fp32, opt_fp32, dev, None)

    def updates(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([(p.detach().float().cpu() - init[n]).reshape(-1) for n, p in model.named_parameters()])

    runs = {}
    for name, opts in options.items():
        engine = Engine(copy.deepcopy(base), EngineConfig(device="cuda", window=2, chunk_mib=1, **opts),
                        OptimConfig(lr=lr, weight_decay=wd))
        try:
            if check is not None:
                check(name, engine)
            runs[name] = ([engine.train_step(b).loss for b in batches], updates(engine.hf_model()))
        finally:
            engine.close()
    (a, (l_a, u_a)), (b, (l_b, u_b)) = runs.items()
    d_engines, d_autocast = rel(u_b, u_a), rel(updates(ref), updates(fp32))
    print(f"\n{family}: losses {a} {l_a} {b} {l_b}; update rel {b}-vs-{a} {d_engines:.5f}, "
          f"autocast-vs-fp32 {d_autocast:.4f}")
    for x, y in zip(l_b, l_a, strict=True):
        assert abs(x - y) <= tol["loss_rel"] * abs(y), (l_b, l_a)
    assert d_engines <= max(tol["update_rel_factor"] * d_autocast, tol["update_rel_floor"])
