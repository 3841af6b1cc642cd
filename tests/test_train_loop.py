"""The training loop end to end on the built-in tiny model: outputs, learning, Ctrl-C, NaN, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from tests.run_config import tiny_run

from slideformer.errors import ConfigError, ModelPathError
from slideformer.train import loop
from slideformer.train.args import RunConfig, builtin_asset_dir
from slideformer.train.config_io import from_dict
from slideformer.train.sources import DataError

REPO = Path(__file__).resolve().parents[1]


def _cfg(out: Path, **overrides: object) -> RunConfig:
    return tiny_run(out, **overrides)


def test_run_learns_and_writes_its_output_dir(tmp_path):
    cfg = _cfg(tmp_path / "run", train__max_steps=40, train__eval_every=20, data__max_rows=1000)
    res = loop.train(cfg)
    assert res.steps == 40 and not res.interrupted and len(res.losses) == 40
    first, last = res.losses[0], sum(res.losses[-5:]) / 5
    assert last < first - 2.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert [s for s, _ in res.eval_losses] == [20, 40] and res.eval_losses[1][1] < res.eval_losses[0][1]
    out = tmp_path / "run"
    assert from_dict(RunConfig, yaml.safe_load((out / "config.yaml").read_text())) == cfg
    info = json.loads((out / "run.json").read_text())
    assert info["versions"]["torch"] == torch.__version__ and info["hardware"]["cpu_cores_logical"] >= 1
    assert info["num_params"] > 0 and info["memory"]["bytes_per_param"] >= 12
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 41))
    assert float(rows[0]["loss"]) == pytest.approx(res.losses[0]) and float(rows[5]["tokens_per_s"]) > 0
    assert rows[19]["eval_loss"] and not rows[18]["eval_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"] == res.losses[-1] and res.checkpoint == out / "checkpoints" / "step-00000040"


class _NanAfter:
    """Wraps an engine; reports a NaN loss for the steps listed (to drive the loop's divergence guard)."""

    def __init__(self, engine, nan_steps: set[int]) -> None:
        self._engine = engine
        self._nan_steps = nan_steps
        self._n = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._engine.close()

    def train_step(self, batch, lr=None):
        res = self._engine.train_step(batch, lr=lr)
        self._n += 1
        if self._n in self._nan_steps:
            return SimpleNamespace(loss=float("nan"), grad_norm=float("nan"), tokens=res.tokens)
        return res


def test_nonfinite_losses_warn_then_stop(tmp_path, monkeypatch, capsys):
    real = loop.build_engine
    monkeypatch.setattr(loop, "build_engine", lambda cfg, hf: _NanAfter(real(cfg, hf), {2, 4}))
    res = loop.train(_cfg(tmp_path / "ok", train__max_nonfinite=2))
    assert res.steps == 6  # isolated NaNs: warned, not fatal
    assert capsys.readouterr().err.count("non-finite loss") == 2

    monkeypatch.setattr(loop, "build_engine", lambda cfg, hf: _NanAfter(real(cfg, hf), {3, 4, 5}))
    with pytest.raises(loop.DivergenceError, match="3 non-finite losses in a row .*no checkpoint was saved"):
        loop.train(_cfg(tmp_path / "bad", checkpoint__every_steps=2))
    assert [p.name for p in (tmp_path / "bad" / "checkpoints").iterdir()] == ["step-00000002"]


def test_sigint_saves_a_checkpoint_and_returns(tmp_path):
    def on_step(m):
        if m.step == 2:
            signal.raise_signal(signal.SIGINT)

    res = loop.train(_cfg(tmp_path / "r"), on_step=on_step)
    assert res.interrupted and res.steps == 2 and res.checkpoint.name == "step-00000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    again = loop.train(_cfg(tmp_path / "r", train__resume="auto"))
    assert again.steps == 6 and len(again.losses) == 4


def test_ctrl_c_on_the_command_line_exits_cleanly(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slideformer",
            "train",
            f"--train.output_dir={out}",
            "--train.max_steps=100000",
            "--data.seq_len=32",
            "--train.batch_size=2",
            "--engine.device=cpu",
            "--train.progress_bar=false",
            "--data.max_rows=300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = out / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with `slideformer train --resume" in err
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "manifest.json").is_file()


def _hf_dir(tmp_path: Path) -> Path:
    """A local HF model directory (safetensors + tokenizer) made from the built-in config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path / "hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(builtin_asset_dir()))).save_pretrained(
        str(d)
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin_asset_dir() / name, d / name)
    return d


def test_trains_a_local_hf_directory(tmp_path):
    d = _hf_dir(tmp_path)
    res = loop.train(_cfg(tmp_path / "r", model__path=str(d), train__max_steps=3))
    assert res.steps == 3 and all(x == x for x in res.losses)


def test_bad_inputs_fail_early_with_clear_messages(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        loop.train(_cfg(tmp_path / "r", model__path=str(tmp_path / "nope")))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    shutil.copy(builtin_asset_dir() / "config.json", empty / "config.json")
    with pytest.raises(ModelPathError, match="no \\*.safetensors weights"):
        loop.train(_cfg(tmp_path / "r", model__path=str(empty)))
    with pytest.raises(
        ConfigError, match="data.seq_len=1024 exceeds the model's max_position_embeddings=512"
    ):
        loop.train(_cfg(tmp_path / "r", data__seq_len=1024))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):
        loop.train(_cfg(blocker / "sub"))
    with pytest.raises(DataError, match="does not exist"):
        loop.train(_cfg(tmp_path / "r", data__train_path=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: row has no 'completion' field"):
        loop.train(_cfg(tmp_path / "r", data__train_path=str(bad)))
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match="no training sequences left after filtering"):
        loop.train(_cfg(tmp_path / "r", data__train_path=str(tiny), data__val_fraction=0))
    assert not (tmp_path / "r").exists()  # nothing was created before the checks passed
