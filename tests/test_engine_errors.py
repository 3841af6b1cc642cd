"""Bad input gets a clear error, raised before any large allocation, with nothing left behind."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config

from slideformer import (
    BatchError,
    ConfigError,
    Engine,
    EngineConfig,
    ModelPathError,
    OptimConfig,
    UnsupportedModelError,
)


@pytest.fixture
def engine():
    cfg = tiny_config("llama", layers=2)
    eng = Engine(make_model(cfg), EngineConfig(device="cpu"), OptimConfig(lr=1e-3))
    yield eng
    eng.close()


def test_missing_model_path(tmp_path) -> None:
    with pytest.raises(ModelPathError, match="does not exist"):
        Engine.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelPathError, match="no config.json"):
        Engine.from_pretrained(tmp_path)


def test_directory_without_weights(tmp_path) -> None:
    tiny_config("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelPathError, match="safetensors"):
        Engine.from_pretrained(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(UnsupportedModelError, match="supported: .*llama.*qwen3"):
        Engine.from_pretrained(tmp_path)


def test_truncated_shard_is_reported(tmp_path) -> None:
    cfg = tiny_config("llama", layers=2)
    make_model(cfg).save_pretrained(tmp_path)
    shard = next(tmp_path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = threading.active_count()
    with pytest.raises(ModelPathError, match="truncated or corrupted"):
        Engine.from_pretrained(tmp_path, EngineConfig(device="cpu"))
    assert threading.active_count() == before


def test_from_pretrained_loads_the_checkpoint(tmp_path) -> None:
    cfg = tiny_config("qwen3", layers=2)
    model = make_model(cfg)
    model.save_pretrained(tmp_path)
    eng = Engine.from_pretrained(tmp_path, EngineConfig(device="cpu"))
    loaded = eng.state_dict()["params"]
    for name, p in model.named_parameters():
        assert torch.equal(loaded[name], p.detach()), name
    eng.close()


@pytest.mark.parametrize("batch,match", [
    ({}, "no input_ids"),
    ([], "empty batch"),
    ("text", "dict of tensors"),
    ({"input_ids": torch.zeros(0, 5, dtype=torch.long)}, "empty"),
    ({"input_ids": torch.zeros(2, 5)}, "integer tensor"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)},
     "labels shape"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 6)}, "attention_mask"),
    ({"input_ids": torch.zeros(2, 200, dtype=torch.long)}, "max_position_embeddings"),
    ({"input_ids": torch.full((2, 5), 5000, dtype=torch.long)}, "token ids must lie"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.full((2, 5), -100)}, "no label tokens"),
])
def test_bad_batches(engine, batch, match) -> None:
    with pytest.raises(BatchError, match=match):
        engine.train_step(batch)
    # The engine is still usable afterwards: validation happens before any work.
    gen = torch.Generator().manual_seed(0)
    assert engine.train_step(random_batch(1024, 2, 8, gen)).loss > 0


def test_overlap_schedule_refuses_clipping() -> None:
    cfg = tiny_config("llama", layers=2)
    eng = Engine(make_model(cfg), EngineConfig(device="cpu", schedule="overlap"),
                 OptimConfig(lr=1e-3, max_grad_norm=1.0))
    with pytest.raises(ConfigError, match="cannot clip"):
        eng.train_step(random_batch(1024, 2, 8, torch.Generator().manual_seed(0)))
    eng.close()


def test_bad_config_values() -> None:
    with pytest.raises(ConfigError):
        EngineConfig(window=0)
    with pytest.raises(ConfigError):
        OptimConfig(lr=-1.0)
    with pytest.raises(ConfigError):
        OptimConfig(betas=(0.9, 1.5))


def test_dropout_is_rejected() -> None:
    cfg = tiny_config("llama", layers=2)
    cfg.attention_dropout = 0.1
    with pytest.raises(UnsupportedModelError, match="dropout"):
        Engine(make_model(cfg), EngineConfig(device="cpu"))


def test_worker_failure_reaches_caller_and_engine_refuses_to_continue(engine, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("injected optimizer fault")

    monkeypatch.setattr(engine.adam, "update", boom)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(Exception, match="injected optimizer fault"):
        engine.train_step(random_batch(1024, 2, 8, gen))
        engine.flush()
    with pytest.raises(Exception, match="earlier step failed|injected"):
        engine.train_step(random_batch(1024, 2, 8, gen))


@pytest.mark.parametrize("accumulate,max_norm", [(1, None), (2, 1.0)])
def test_nonfinite_loss_skips_the_whole_step(monkeypatch, accumulate, max_norm) -> None:
    """A NaN loss leaves weights, moments and step count untouched: the run equals one without that step."""
    import slideformer.runtime.step as step_mod

    cfg = tiny_config("llama_tied", layers=2)
    base = make_model(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [[random_batch(1024, 2, 8, gen) for _ in range(accumulate)] for _ in range(3)]

    def run(poison_step: int | None) -> dict:
        import copy

        eng = Engine(copy.deepcopy(base), EngineConfig(device="cpu"),
                     OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=max_norm))
        real = step_mod.linear_cross_entropy
        for i, b in enumerate(batches):
            if i == poison_step:
                def poisoned(*args, **kwargs):
                    loss, grad = real(*args, **kwargs)
                    return loss * float("nan"), grad

                monkeypatch.setattr(step_mod, "linear_cross_entropy", poisoned)
                with pytest.warns(RuntimeWarning, match="non-finite loss"):
                    res = eng.train_step(b if accumulate > 1 else b[0])
                assert res.skipped and res.loss != res.loss
                monkeypatch.setattr(step_mod, "linear_cross_entropy", real)
            elif poison_step is None and i == 1:
                continue  # the clean run leaves the poisoned step out
            else:
                assert not eng.train_step(b if accumulate > 1 else b[0]).skipped
        state = {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v
                 for k, v in eng.state_dict().items()}
        eng.close()
        return state

    poisoned, clean = run(1), run(None)
    assert poisoned["step"] == clean["step"] == 2
    for part in ("params", "exp_avg", "exp_avg_sq"):
        for name, t in clean[part].items():
            assert torch.equal(poisoned[part][name], t), (part, name)


def test_watchdog_reports_a_stalled_optimizer(monkeypatch) -> None:
    import time

    cfg = tiny_config("llama", layers=2)
    eng = Engine(make_model(cfg), EngineConfig(device="cpu", watchdog_s=0.5), OptimConfig(lr=1e-3))
    real = eng.adam.update

    def slow(*args, **kwargs):
        time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(eng.adam, "update", slow)
    with pytest.raises(Exception, match=r"(?s)no progress for 0.5 s while waiting for .*sf-optim"):
        eng.train_step(random_batch(1024, 2, 8, torch.Generator().manual_seed(0)))
        eng.flush()
    eng.close()
