"""Forward-only evaluation through the window equals the HF model's loss and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config

from slideformer import Engine, EngineConfig, OptimConfig
from slideformer.train.evaluate import eval_loss


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_eval_loss_matches_hf_and_leaves_training_untouched(family: str) -> None:
    cfg = tiny_config(family)
    model = make_model(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(cfg.vocab_size, 3, 11, gen) for _ in range(3)]

    def run(with_eval: bool) -> tuple[dict, list[float]]:
        eng = Engine(copy.deepcopy(model), EngineConfig(device="cpu", window=2), OptimConfig(lr=1e-3))
        evals = []
        for b in batches[:2]:
            eng.train_step(b)
            if with_eval:
                evals.append(eng.eval_loss([batches[2], b]))
        state = {k: v.clone() for k, v in eng.state_dict()["params"].items()}
        if with_eval:
            hf_loss, hf_tokens = eval_loss(eng.hf_model(), [batches[2], batches[1]])
            loss, tokens = evals[-1]
            assert tokens == hf_tokens
            assert abs(loss - hf_loss) <= 1e-6 * abs(hf_loss)
        eng.close()
        return state, evals

    with_eval, _ = run(True)
    without, _ = run(False)
    for name, t in without.items():
        assert torch.equal(with_eval[name], t), name
