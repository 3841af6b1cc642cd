"""End to end through the command line: a 7-8B-shaped HF checkpoint -> ``slideformer train`` -> export ->
``AutoModelForCausalLM.from_pretrained`` -> the same validation loss as the engine reported.

The checkpoint is random-initialized from a real config (``shapes.py``; no downloads) and written as
BF16 safetensors shards with the packaged tokenizer, so the run exercises the real loading path (shard
streaming into the host layout), the preset YAML, evaluation through the engine, and the end-of-training
export (weights only: a full 8B checkpoint with Adam moments is ~96 GB, more than the box's disk).

Usage (H100 box):
  python benchmarks/e2e_cli.py --model llama3.1-8b --workdir /tmp/e2e --steps 6 --out e2e.json
CPU smoke:
  python benchmarks/e2e_cli.py --model builtin --device cpu --config configs/default.yaml --workdir /tmp/e2e
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from shapes import hf_config
from slideformer.train.args import RunConfig, builtin_asset_dir
from slideformer.train.config_io import from_dict, load_yaml
from slideformer.train.data import eval_batches
from slideformer.train.dataset import load_data
from slideformer.train.evaluate import eval_loss
from slideformer.train.model_loading import load_tokenizer


def make_checkpoint(model: str, dest: Path, device: str) -> float:
    """Write a random-initialized BF16 HF checkpoint of shape ``model`` (built on ``device``, fast)."""
    # "builtin": the packaged tiny model's config (its vocabulary matches the packaged tokenizer).
    cfg = transformers.AutoConfig.from_pretrained(str(builtin_asset_dir())) if model == "builtin" else hf_config(model)
    cfg.dtype = "bfloat16"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(str(dest), max_shard_size="5GB")
    del m
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(builtin_asset_dir() / name, dest / name)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--config", default="configs/llama3_1_8b.yaml")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    ckpt, run, export = work / "model", work / "run", work / "export"
    report: dict = {"model": args.model, "config": args.config, "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    report["checkpoint_write_s"] = round(make_checkpoint(args.model, ckpt, args.device), 1)

    cmd = [sys.executable, "-m", "slideformer", "train", args.config, f"--model.path={ckpt}",
           f"--data.train_path={builtin_asset_dir() / 'data.jsonl'}", f"--data.seq_len={args.seq_len}",
           "--data.val_fraction=0.02", f"--train.max_steps={args.steps}", f"--train.batch_size={args.batch_size}",
           "--train.log_every=1", "--train.progress_bar=false", f"--train.eval_every={args.steps}",
           "--train.eval_batches=2", f"--train.output_dir={run}", "--checkpoint.save_final=false",
           f"--checkpoint.export_dir={export}", f"--engine.device={args.device}"]
    report["command"] = " ".join(cmd)
    print("$", report["command"], flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    report["train_wall_s"] = round(time.perf_counter() - t0, 1)
    report["train_log_tail"] = (proc.stdout + proc.stderr)[-4000:]
    print(report["train_log_tail"], flush=True)
    report["returncode"] = proc.returncode
    if proc.returncode == 0:
        summary = json.loads((run / "summary.json").read_text())
        report["summary"] = summary
        engine_eval = summary["eval_losses"][-1][1]
        # The reference: the exported model, reloaded by transformers, on the run's own validation batches.
        cfg = from_dict(RunConfig, load_yaml(run / "config.yaml"))
        tok = load_tokenizer(cfg.model.resolved_tokenizer())
        data = load_data(cfg, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batches = [{k: v.to(args.device) for k, v in b.items()}
                   for b in eval_batches(data.val, cfg.train.batch_size, cfg.train.eval_batches, pad)]
        t0 = time.perf_counter()
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.bfloat16).to(args.device)
        report["export_reload_s"] = round(time.perf_counter() - t0, 1)
        if args.device.startswith("cuda"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hf_eval, n = eval_loss(hf, batches)
        else:
            hf_eval, n = eval_loss(hf, batches)
        report.update(engine_eval_loss=engine_eval, export_eval_loss=hf_eval, eval_tokens=n,
                      eval_rel_diff=abs(hf_eval - engine_eval) / abs(engine_eval),
                      export_bytes=sum(p.stat().st_size for p in export.glob("*.safetensors")))
        print(json.dumps({k: report[k] for k in ("engine_eval_loss", "export_eval_loss", "eval_rel_diff",
                                                 "train_wall_s", "export_bytes")}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
