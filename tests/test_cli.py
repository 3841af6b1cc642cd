"""CLI and config: documented fields, presets, overrides, --help, exit codes, the LR schedule."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slideformer.cli import build_parser, default_preset, main, parse_args, resolve_train_config
from slideformer.errors import ConfigError
from slideformer.train.args import RunConfig, ScheduleArgs
from slideformer.train.config_io import field_docs, from_dict, load_yaml
from slideformer.train.lr_schedule import LRSchedule

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def _train_ns(*argv: str):
    return parse_args(["train", *argv])


def test_every_config_field_is_documented():
    sections = [type(getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)]
    for cls in [RunConfig, *sections]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_help_is_generated_from_docstrings():
    sub = build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    text = sub.format_help()
    assert "--optim.lr" in text and "--data.seq_len" in text and "--engine.window" in text
    assert field_docs(ScheduleArgs)["decay"][:40] in " ".join(text.split())


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_are_valid_configs(preset):
    cfg = from_dict(RunConfig, load_yaml(preset))
    assert cfg.optim.lr > 0 and cfg.data.seq_len >= 2


def test_presets_exist_for_the_issue_models_and_default_matches_package():
    names = {p.stem for p in PRESETS}
    assert {"default", "llama3_1_8b", "qwen2_5_7b", "qwen3_8b", "mistral_7b"} <= names
    assert (REPO / "configs" / "default.yaml").read_text() == default_preset().read_text()


def test_overrides_are_typed_and_layered():
    cfg = resolve_train_config(
        _train_ns(
            "--optim.lr=1e-4",
            "--optim.betas=[0.8, 0.95]",
            "--train.max_steps",
            "7",
            "--data.packing=false",
            "--train.progress_bar",
            "--optim.max_grad_norm=1",
        )
    )
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.95) and cfg.train.max_steps == 7
    assert cfg.data.packing is False and cfg.train.progress_bar is True and cfg.optim.max_grad_norm == 1.0
    preset = load_yaml(default_preset())
    assert cfg.train.batch_size == preset["train"]["batch_size"]  # untouched values come from the preset


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 3, "seed": 5}, "optim": {"lr": 0.01}}))
    cfg = resolve_train_config(_train_ns(str(path), "--train.seed=9"))
    assert (cfg.train.max_steps, cfg.train.seed, cfg.optim.lr) == (3, 9, 0.01)
    assert cfg.optim.betas == (0.9, 0.999)  # library default for keys the file leaves out


def test_bad_config_values_are_precise(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr.*did you mean 'lr'"):
        resolve_train_config(_train_ns("--optim.lrr=1"))
    path = tmp_path / "c.yaml"
    path.write_text("schedule:\n  decay: exponential\n")
    with pytest.raises(ConfigError, match="schedule.decay must be one of cosine, linear, constant"):
        resolve_train_config(_train_ns(str(path)))
    path.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match="train.batch_size must be >= 1"):
        resolve_train_config(_train_ns(str(path)))
    path.write_text("trian:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        resolve_train_config(_train_ns(str(path)))


def test_main_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "error: config file" in capsys.readouterr().err
    assert main(["train", "--optim.lr=abc"]) == 2
    assert "optim.lr: expected a number" in capsys.readouterr().err


def test_python_dash_m_prints_the_resolved_config():
    env_path = str(REPO / "src")
    out = subprocess.run(
        [sys.executable, "-m", "slideformer", "train", "--print-config", "--train.max_steps=5"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    cfg = from_dict(RunConfig, yaml.safe_load(out.stdout))
    assert cfg.train.max_steps == 5 and cfg.model.path == ""


def test_lr_schedule_shapes():
    args = ScheduleArgs(warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    s = LRSchedule(1.0, 20, args)
    lrs = [s.lr_at(i) for i in range(20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[3] == pytest.approx(0.8) and lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    mid = 4 + (19 - 4) / 2
    assert LRSchedule(1.0, 20, args).lr_at(int(mid)) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15))
    )
    lin = LRSchedule(2.0, 11, ScheduleArgs(warmup_steps=0, decay="linear", min_lr_ratio=0.0))
    assert [lin.lr_at(i) for i in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0])
    const = LRSchedule(3.0, 10, ScheduleArgs(warmup_steps=2, decay="constant"))
    assert [const.lr_at(i) for i in range(4)] == pytest.approx([1.0, 2.0, 3.0, 3.0])
