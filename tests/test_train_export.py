"""Export: a checkpoint becomes an HF directory that reproduces the engine's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from slideformer import Engine, EngineConfig, OptimConfig
from slideformer.cli import main
from slideformer.errors import ConfigError
from slideformer.train import checkpoint
from slideformer.train.args import builtin_asset_dir
from slideformer.train.export import export


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of the built-in model after 3 engine steps, and the engine's logits on a probe batch."""
    root = tmp_path_factory.mktemp("ckpt")
    hf_config = AutoConfig.from_pretrained(str(builtin_asset_dir()))
    tok = AutoTokenizer.from_pretrained(str(builtin_asset_dir()))
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, hf_config.vocab_size, (2, 24), generator=gen)
    with Engine.from_config(hf_config, EngineConfig(device="cpu"), OptimConfig(lr=1e-2), seed=1) as engine:
        for _ in range(3):
            engine.train_step({"input_ids": torch.randint(0, hf_config.vocab_size, (4, 24), generator=gen)})
        engine.flush()
        with torch.no_grad():
            logits = engine.hf_model()(input_ids=probe).logits.clone()

        def extra(d: Path) -> None:
            hf_config.save_pretrained(str(d))
            tok.save_pretrained(str(d))

        path = checkpoint.save(root, 3, engine.state_dict(), {}, extra)
    return path, probe, logits


def test_export_reproduces_engine_logits(trained, tmp_path):
    ckpt, probe, logits = trained
    out = export(ckpt.parent, tmp_path / "model")  # a checkpoint root resolves to its newest checkpoint
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not names & {"optimizer.safetensors", "trainer_state.json", "manifest.json"}
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.float32
    with torch.no_grad():
        got = model(input_ids=probe).logits
    torch.testing.assert_close(got, logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(str(out)).eos_token == "<|end|>"


def test_sharded_bf16_export_loads(trained, tmp_path):
    ckpt, probe, logits = trained
    out = export(ckpt, tmp_path / "model", dtype="bfloat16", max_shard_bytes=300_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({v for v in index["weight_map"].values()})
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = model(input_ids=probe).logits
    # bf16 weights: logits agree to bf16 rounding of the weights (8 mantissa bits), not bitwise
    torch.testing.assert_close(got, logits, rtol=0.05, atol=0.05)
    assert not torch.equal(got, logits)


def test_export_refuses_non_empty_target_and_cli_works(trained, tmp_path, capsys):
    ckpt, _, _ = trained
    target = tmp_path / "busy"
    target.mkdir()
    (target / "x").write_text("x")
    with pytest.raises(ConfigError, match="not an empty directory"):
        export(ckpt, target)
    assert main(["export", str(ckpt), str(target)]) == 2
    assert main(["export", str(ckpt), str(tmp_path / "ok"), "--dtype", "float16"]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err


def test_export_at_the_end_of_training_equals_the_checkpoint_export(tmp_path):
    """``checkpoint.export_dir`` writes the live engine's weights; they equal the final checkpoint's."""
    from tests.run_config import tiny_run

    from slideformer.train.loop import train

    direct = tmp_path / "direct"
    res = train(tiny_run(tmp_path / "run", checkpoint__export_dir=direct, checkpoint__export_dtype="float32"))
    assert res.export == direct and res.checkpoint is not None
    via_ckpt = export(res.checkpoint, tmp_path / "via_ckpt", dtype="float32")
    assert not (direct / "optimizer.safetensors").exists() and (direct / "tokenizer.json").exists()
    probe = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(direct))(input_ids=probe).logits
        b = AutoModelForCausalLM.from_pretrained(str(via_ckpt))(input_ids=probe).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    bf16 = train(tiny_run(tmp_path / "run2", checkpoint__export_dir=tmp_path / "bf16",
                          checkpoint__save_final="false"))
    assert bf16.checkpoint is None
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).dtype == torch.bfloat16


def test_export_dir_that_is_not_empty_fails_before_training(tmp_path):
    from tests.run_config import tiny_run

    from slideformer.errors import ConfigError
    from slideformer.train.loop import train

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ConfigError, match="export_dir"):
        train(tiny_run(tmp_path / "run", checkpoint__export_dir=tmp_path / "taken"))
    assert not (tmp_path / "run" / "checkpoints").exists()
