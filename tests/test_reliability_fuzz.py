"""Seeded fuzzing of every input a run reads: dataset rows, safetensors shards, checkpoints.

Each case must end in a ``SlideformerError`` subclass with a message (or, on the command line, exit
status 1/2 with ``error:`` and no traceback), or succeed with a result equal to the undamaged input's
-- never another exception type, an interpreter crash, or a silently different model. The generator is
``random.Random`` with fixed seeds, so a failure names a reproducible case.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.reference import make_model, tiny_config

from slideformer import Engine, EngineConfig, SlideformerError
from slideformer.train import checkpoint, loop, resume
from slideformer.train.args import DataArgs, RunConfig, builtin_asset_dir
from slideformer.train.config_io import apply_override, from_dict
from slideformer.train.data import BatchStream, build_sequences, detect_format
from slideformer.train.model_loading import load_tokenizer
from slideformer.train.sources import read_rows

REPO = Path(__file__).resolve().parents[1]
CASES = 40


# -- datasets -------------------------------------------------------------------------------------------
GOOD = [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}, {"prompt": "say hi", "completion": " hi there"}]
WEIRD_VALUES: list[object] = [None, 3, 2.5, True, [], {}, ["a"], {"x": 1}, "", "\ud800", "\x00", "é" * 50,
                              [{"role": "user"}], [{"role": 1, "content": None}], "[" * 3000]


def _weird_row(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:  # wrong type for a field
        row = dict(rng.choice(GOOD))
        row[rng.choice(["prompt", "completion", "text", "messages"])] = rng.choice(WEIRD_VALUES)
        return json.dumps(row)
    if kind == 1:  # a missing field
        row = dict(rng.choice(GOOD))
        row.pop(rng.choice(list(row)))
        return json.dumps(row)
    if kind == 2:  # not an object
        return json.dumps(rng.choice(WEIRD_VALUES))
    if kind == 3:  # truncated line
        line = json.dumps(rng.choice(GOOD))
        return line[: rng.randrange(1, len(line))]
    if kind == 4:  # random bytes (decoded leniently so the line is written as-is)
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))).decode("latin-1")
    if kind == 5:  # deep nesting
        depth = rng.choice([50, 5000, 200_000])
        return '{"text": ' + "[" * depth + "]" * depth + "}"
    if kind == 6:  # a chat row with broken messages
        return json.dumps({"messages": rng.choice(WEIRD_VALUES)})
    return json.dumps(rng.choice(GOOD))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(builtin_asset_dir())


def _ingest(path: Path, tokenizer) -> int:
    """What a run does with a dataset file before training (dataset.load_data): rows -> sequences."""
    rows = read_rows(path)
    if not rows:
        return 0
    args = DataArgs(seq_len=32, format=detect_format(rows[0], DataArgs()))
    seqs, _ = build_sequences(rows, tokenizer, args, str(path))
    return len(seqs)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_malformed_dataset_rows_end_in_a_data_error(tmp_path, tokenizer, suffix):
    rng = random.Random(f"rows{suffix}")
    outcomes: dict[str, int] = {}
    for case in range(CASES):
        lines = [json.dumps(rng.choice(GOOD)) for _ in range(rng.randrange(0, 4))]
        for _ in range(rng.randrange(1, 3)):
            lines.insert(rng.randrange(len(lines) + 1), _weird_row(rng))
        body = "\n".join(lines) if suffix == ".jsonl" else "[" + ",\n".join(lines) + "]"
        raw = body.encode("utf-8", "surrogatepass")
        if rng.random() < 0.2:  # invalid UTF-8 / truncated file
            raw = raw[: rng.randrange(len(raw) + 1)] + bytes([0xFF, 0xC3])
        path = tmp_path / f"case{case}{suffix}"
        path.write_bytes(raw)
        try:
            _ingest(path, tokenizer)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except SlideformerError as e:
            assert str(e), f"case {case}: empty message"
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} ({path.read_bytes()[:200]!r}): {type(e).__name__}: {e}")
    assert outcomes.get("DataError", 0) > CASES // 3, outcomes


def test_cli_reports_a_malformed_dataset_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n' + "[" * 100_000)
    proc = subprocess.run(
        [sys.executable, "-m", "slideformer", "train", f"--data.train_path={bad}",
         f"--train.output_dir={tmp_path / 'out'}", "--train.max_steps=1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# -- safetensors shards -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    make_model(tiny_config("llama", layers=2)).save_pretrained(path)
    return path


def _header_len(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def _damage_shard(raw: bytes, rng: random.Random) -> tuple[str, bytes]:
    head = _header_len(raw)
    kind = rng.randrange(6)
    if kind == 0:
        return "truncated", raw[: rng.randrange(0, len(raw))]
    if kind == 1:
        i = rng.randrange(8, head)
        return f"header byte {i} replaced", raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
    if kind == 2:
        return "header length field", struct.pack("<Q", rng.choice([0, 7, head + 8, 2**40, 2**64 - 1])) + raw[8:]
    if kind == 3:  # a NaN/inf written into a tensor's data
        i = head + 4 * rng.randrange((len(raw) - head) // 4)
        bad = struct.pack("<f", rng.choice([float("nan"), float("inf")]))
        return f"non-finite value at {i}", raw[:i] + bad + raw[i + 4:]
    if kind == 4:
        return "empty file", b""
    return "random garbage", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 512)))


def test_damaged_shards_end_in_a_model_path_error(tmp_path, saved_model):
    rng = random.Random("shards")
    with Engine.from_pretrained(saved_model, EngineConfig(device="cpu")) as eng:
        want = {k: v.clone() for k, v in eng.state_dict()["params"].items()}
    shard = next(saved_model.glob("*.safetensors"))
    raw = shard.read_bytes()
    errors = 0
    for case in range(CASES // 2):
        what, damaged = _damage_shard(raw, rng)
        d = tmp_path / f"case{case}"
        shutil.copytree(saved_model, d)
        (d / shard.name).write_bytes(damaged)
        try:
            with Engine.from_pretrained(d, EngineConfig(device="cpu")) as eng:
                got = eng.state_dict()["params"]
                diff = [k for k in want if not torch.equal(want[k], got[k])]
            assert not diff, f"case {case} ({what}) loaded a different model silently: {diff[:3]}"
        except SlideformerError as e:
            errors += 1
            assert str(e)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
    (tmp_path / "missing").mkdir()
    shutil.copy(saved_model / "config.json", tmp_path / "missing")
    with pytest.raises(SlideformerError, match="safetensors"):
        Engine.from_pretrained(tmp_path / "missing")
    assert errors >= CASES // 4


# -- checkpoints ------------------------------------------------------------------------------------------
def _cfg(out: Path, **overrides: object) -> RunConfig:
    tree: dict = {
        "data": {"seq_len": 32, "max_rows": 200, "val_fraction": 0.0},
        "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 2, "progress_bar": False,
                  "tensorboard": False, "plot": False, "log_every": 100},
        "checkpoint": {"keep_last": 1},
        "engine": {"device": "cpu"},
    }
    for key, value in overrides.items():
        apply_override(tree, key.replace("__", "."), str(value))
    return from_dict(RunConfig, tree)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    loop.train(_cfg(out))
    return out


def _flip(path: Path, rng: random.Random, tensor_data: bool = True) -> str:
    """Flip one bit; with ``tensor_data`` False, never inside a safetensors file's tensor bytes (which
    only the SHA-256 check can catch: with checkpoint.verify off they are trusted, by design)."""
    raw = bytearray(path.read_bytes())
    end = len(raw) if tensor_data or path.suffix != ".safetensors" else _header_len(bytes(raw))
    i = rng.randrange(end)
    raw[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))
    return f"bit flipped in {path.name}@{i}"


def _edit_manifest(ckpt: Path, rng: random.Random) -> str:
    m = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    name = rng.choice(list(m["files"]))
    edits: list[tuple[str, Callable[[], object]]] = [
        ("drop entry", lambda: m["files"].pop(name)),
        ("bytes wrong", lambda: m["files"][name].update(bytes=m["files"][name]["bytes"] + 1)),
        ("bytes as string", lambda: m["files"][name].update(bytes="12")),
        ("sha256 wrong", lambda: m["files"][name].update(sha256="0" * 64)),
        ("entry not a dict", lambda: m["files"].update({name: 5})),
        ("files not a dict", lambda: m.update(files=[])),
        ("format changed", lambda: m.update(format="other/9")),
    ]
    label, edit = rng.choice(edits)
    edit()
    text = json.dumps(m) if rng.random() < 0.8 else json.dumps(m)[: rng.randrange(1, 40)]
    (ckpt / checkpoint.MANIFEST).write_text(text)
    return f"manifest: {label} ({name})"


def _damage_checkpoint(ckpt: Path, rng: random.Random, checksums: bool) -> str:
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    kind = rng.randrange(4)
    if kind == 0:
        return _flip(rng.choice(files), rng, tensor_data=checksums)
    if kind == 1:
        f = rng.choice(files)
        f.write_bytes(f.read_bytes()[: rng.randrange(f.stat().st_size)])
        return f"{f.name} truncated"
    if kind == 2:
        f = rng.choice([p for p in files if p.name != checkpoint.MANIFEST])
        f.unlink()
        return f"{f.name} deleted"
    return _edit_manifest(ckpt, rng)


@pytest.fixture(scope="module")
def resume_target(run_dir: Path):
    """An engine and a batch stream shaped like the run's (what ``loop.train`` restores into)."""
    cfg = _cfg(run_dir)
    tok = load_tokenizer(builtin_asset_dir())
    rows = read_rows(builtin_asset_dir() / "data.jsonl", 200)
    args = DataArgs(seq_len=32, max_rows=200, format=detect_format(rows[0], DataArgs()))
    seqs, _ = build_sequences(rows, tok, args, "data")
    stream = BatchStream(seqs, batch_size=4, grad_accum=1, seed=0, shuffle=True, pad_id=0)
    from slideformer.train.model_loading import build_engine, load_hf_config

    with build_engine(cfg, load_hf_config(builtin_asset_dir())) as eng:
        yield eng, stream


@pytest.mark.parametrize("verify", [True, False], ids=["sha256", "sizes-only"])
def test_damaged_checkpoints_end_in_a_checkpoint_error(tmp_path, run_dir, resume_target, verify):
    eng, stream = resume_target
    good = checkpoint.latest(run_dir / "checkpoints")
    step, _ = resume.restore(good, eng, stream, verify)
    want = {k: v.clone() for k, v in eng.state_dict()["params"].items()}
    rng = random.Random(f"ckpt-{verify}")
    outcomes: dict[str, int] = {}
    for case in range(CASES):
        ckpt = tmp_path / f"case{case}" / good.name
        shutil.copytree(good, ckpt)
        what = _damage_checkpoint(ckpt, rng, verify)
        try:
            got_step, _ = resume.restore(checkpoint.resolve(ckpt), eng, stream, verify)
            got = eng.state_dict()["params"]
            diff = [k for k in want if not torch.equal(want[k], got[k])]
            # Only damage the manifest does not cover may pass: nothing that changes the model.
            assert got_step == step and not diff, f"case {case} ({what}): silently different state {diff[:3]}"
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except SlideformerError as e:
            assert str(e)
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
    assert outcomes.get("CheckpointError", 0) >= CASES // 2, outcomes


def test_cli_resume_from_a_damaged_checkpoint_exits_cleanly(tmp_path, run_dir):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    ckpt = checkpoint.latest(out / "checkpoints")
    _flip(ckpt / "model.safetensors", random.Random(1))
    proc = subprocess.run(
        [sys.executable, "-m", "slideformer", "train", "--resume", str(ckpt), "--train.max_steps=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1 and "SHA-256" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
