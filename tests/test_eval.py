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


def test_a_failing_evaluation_raises_and_close_does_not_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that raises mid-way through eval fails the pass's pending slot releases, so the upload
    worker waiting on one stops and close() returns (it used to block forever)."""
    import threading

    from slideformer.errors import WorkerError
    from slideformer.runtime import forward as forward_mod  # the layers' forward (training and evaluation)

    cfg = tiny_config("llama", layers=4)
    gen = torch.Generator().manual_seed(0)
    eng = Engine(make_model(cfg), EngineConfig(device="cpu", window=1, watchdog_s=60.0), OptimConfig(lr=1e-3))
    eng.train_step(random_batch(cfg.vocab_size, 2, 9, gen))
    real = forward_mod.run_layer

    def broken(layer, h, call):
        if layer is eng.parts.layers[1]:
            raise RuntimeError("injected failure in layer 1's forward")
        return real(layer, h, call)

    monkeypatch.setattr(forward_mod, "run_layer", broken)
    with pytest.raises(WorkerError, match="injected failure"):
        eng.eval_loss(random_batch(cfg.vocab_size, 2, 9, gen))
    closer = threading.Thread(target=eng.close, daemon=True)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "engine.close() hung after a failed evaluation"
