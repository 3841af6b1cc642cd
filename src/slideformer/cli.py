"""The ``slideformer`` command: ``train``, ``plan`` and ``export``.

Owns parsing only: YAML files plus ``--section.key=value`` overrides become a ``RunConfig`` (whose
field docstrings are the ``--help`` text), then one library function runs. Invariant: a
``SlideformerError`` ends the command with its message and exit status 2 (bad input) or 1 (a failure
while running), never a traceback; an interrupted training run exits with 130 after its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slideformer.errors import ConfigError, SlideformerError
from slideformer.train.args import RunConfig, builtin_asset_dir
from slideformer.train.config_io import apply_override, dump_yaml, field_docs, from_dict, load_yaml, type_name

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

TRAIN_EPILOG = """\
examples:
  slideformer train                                  # the built-in tiny model and dataset
  slideformer train configs/llama3_1_8b.yaml --model.path=/models/Llama-3.1-8B --data.train_path=chat.jsonl
  slideformer train --resume runs/my-run             # continue the newest checkpoint of a run
  torchrun --nproc-per-node 2 -m slideformer train CONFIG   # data-parallel: one engine per GPU
"""


def default_preset() -> Path:
    """The packaged preset that ``slideformer train`` without a config file starts from."""
    return builtin_asset_dir() / "train.yaml"


def _sections() -> list[tuple[str, type]]:
    hints = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]
    return [(name, type(factory())) for name, factory in hints.items()]


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One ``--section.key`` option per config field, grouped by section, documented from the dataclasses."""
    for section, cls in _sections():
        sec_docs = field_docs(RunConfig)
        group = parser.add_argument_group(f"{section}: {sec_docs.get(section, '')}")
        docs = field_docs(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            tname = type_name(cls, f.name)
            default = getattr(defaults, f.name)
            help_text = f"{docs.get(f.name, '')} [{tname}; default: {default!r}]".replace("%", "%%")
            kwargs: dict[str, Any] = {
                "dest": f"{section}.{f.name}",
                "default": argparse.SUPPRESS,
                "help": help_text,
            }
            if tname == "bool":
                kwargs.update(nargs="?", const="true", metavar="BOOL")
            else:
                kwargs["metavar"] = "VALUE"
            group.add_argument(f"--{section}.{f.name}", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = argparse.ArgumentParser(
        prog="slideformer",
        description="Full-parameter fine-tuning of LLMs larger than the GPU, on one GPU.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train",
        help="fine-tune a model (no arguments: the built-in tiny default)",
        description="Fine-tune a model. Settings come from CONFIG (default: the built-in preset), "
        "then --section.key "
        "overrides.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    tr.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    tr.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue from a checkpoint: a run directory or checkpoint path; alone: the newest "
        "checkpoint in "
        "train.output_dir. Without CONFIG, the run's saved config is used.",
    )
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    _add_config_options(tr)

    pl = sub.add_parser(
        "plan",
        help="memory per tier and predicted step time, from config.json alone",
        description="Estimate, before anything is allocated, what a run needs on the GPU, in pinned "
        "and host RAM "
        "and on disk, whether it fits, and a roofline step time. Train's --section.key=value overrides "
        "(e.g. --model.path=DIR --engine.grad_park_mib=8192) apply to CONFIG as they would for the run; "
        "the flags below take precedence.",
        allow_abbrev=False,
    )
    pl.add_argument("config", nargs="?", help="YAML config file (its model, data, train and engine sections)")
    pl.add_argument("--model", help="model directory or config.json (overrides model.path)")
    pl.add_argument("--seq-len", type=int, help="tokens per sequence (default: data.seq_len)")
    pl.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: train.batch_size)")
    pl.add_argument("--grad-accum", type=int, help="micro-batches per step (default: train.grad_accum)")
    pl.add_argument("--max-grad-norm", type=float, help="gradient clipping (default: optim.max_grad_norm)")
    pl.add_argument("--window", type=int, help="decoder-layer slots on the GPU (default: engine.window)")
    pl.add_argument(
        "--gpu-memory-gib", type=float, help="the GPU's whole memory to plan for, the CUDA context's ~1 GiB included "
        "(default: the config's engine.gpu_memory_gib, the engine's budget beside the context; else the visible "
        "GPU, else 80)"
    )
    pl.add_argument("--host-memory-gib", type=float, help="host RAM to plan for (default: this machine's)")
    pl.add_argument("--offload", choices=["none", "moments", "all", "auto"],
                    help="the disk tier: AdamW moments on disk; all: the decoder layers' FP32 masters too "
                    "(uploads read the BF16 copy); auto: only as much as host RAM needs "
                    "(default: engine.offload)")
    pl.add_argument("--host-copy", choices=["none", "bf16", "auto"],
                    help="pinned BF16 upload copy written by the CPU AdamW (default: engine.host_copy)")
    pl.add_argument("--offload-dir", help="directory of the disk tier (default: engine.offload_dir)")
    pl.add_argument("--nproc-per-node", type=int, help="GPUs per node of a data-parallel run (torchrun's flag; "
                    "default 1): host RAM per node, GPU memory per rank, the collectives")
    pl.add_argument("--nnodes", type=int, help="nodes of a data-parallel run (default 1)")
    pl.add_argument("--offload-activations", action="store_true",
                    help="activation checkpoints in a file under the offload directory (default: "
                    "engine.offload_activations)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")

    ex = sub.add_parser(
        "export",
        help="write a Hugging Face model directory from a checkpoint",
        description="Write a checkpoint's weights as a Hugging Face model directory (safetensors "
        "shards, config, "
        "tokenizer, generation config), tensor by tensor.",
        allow_abbrev=False,
    )
    ex.add_argument(
        "checkpoint", help="a checkpoint directory, its parent, or a run directory (newest checkpoint)"
    )
    ex.add_argument("out_dir", help="where to write the model (must be empty or absent)")
    ex.add_argument(
        "--dtype", default="auto", help="float32, bfloat16, float16, or auto (config.json's torch_dtype)"
    )
    ex.add_argument("--max-shard-gib", type=float, default=5.0, help="largest safetensors shard, GiB")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line. Unknown ``--a.b=c`` options of ``train`` are kept in ``ns.unknown_overrides``
    so that ``resolve_train_config`` can name the nearest real key instead of argparse's bare refusal; ``plan``
    takes the same ``--a.b=c`` overrides of its config (``plan_args.plan_from_args``), so a train command line's
    overrides plan as they would run."""
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    ns.unknown_overrides = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        if ns.command not in ("train", "plan") or not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            parser.error(f"unrecognized arguments: {' '.join(extra[i:])}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            key, value = arg[2:], extra[i + 1]
            i += 1
        else:
            key, value = arg[2:], "true"
        ns.unknown_overrides.append((key, value))
        i += 1
    return ns


def resolve_train_config(ns: argparse.Namespace) -> RunConfig:
    """CONFIG (or the run's saved config when resuming, or the packaged preset) + overrides -> RunConfig."""
    if ns.config:
        tree = load_yaml(ns.config)
    elif ns.resume and ns.resume != "auto":
        from slideformer.train import checkpoint

        tree = load_yaml(checkpoint.resolve(Path(ns.resume).expanduser()) / "run_config.yaml")
    else:
        tree = load_yaml(default_preset())
    for key, value in vars(ns).items():
        if "." in key:
            apply_override(tree, key, str(value))
    for key, value in getattr(ns, "unknown_overrides", []):
        apply_override(tree, key, value)
    if ns.resume:
        apply_override(tree, "train.resume", ns.resume)
    return from_dict(RunConfig, tree)


def _run_train(ns: argparse.Namespace) -> int:
    cfg = resolve_train_config(ns)
    if ns.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from slideformer.train.loop import train

    result = train(cfg)
    from slideformer.dist import group

    rank = int(os.environ.get("RANK", "0"))
    group.shutdown()  # data-parallel: every rank finished (rank 0's last checkpoint save ends in a barrier)
    if rank != 0:
        return 0
    first = f"{result.losses[0]:.4f}" if result.losses else "-"
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    ev = f", eval loss {result.eval_losses[-1][1]:.4f}" if result.eval_losses else ""
    print(
        f"done: {result.steps} steps in {result.seconds:.1f} s, loss {first} -> {last}{ev}; "
        f"checkpoint {result.checkpoint}; outputs in {result.output_dir}",
        file=sys.stderr,
    )
    if result.interrupted:
        print(f"interrupted: resume with `slideformer train --resume {result.output_dir}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _run_plan(ns: argparse.Namespace) -> int:
    from slideformer.plan_args import plan_from_args

    plan = plan_from_args(ns)
    print(plan.to_json() if ns.json else plan.render())
    return 0 if plan.fits else EXIT_FAILURE


def _run_export(ns: argparse.Namespace) -> int:
    from slideformer.train.export import export

    out = export(
        Path(ns.checkpoint), Path(ns.out_dir), dtype=ns.dtype, max_shard_bytes=int(ns.max_shard_gib * 2**30)
    )
    print(f"exported to {out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slideformer`` console script; returns the exit status."""
    ns = parse_args(argv)
    if ns.command is None:
        build_parser().print_help()
        return EXIT_BAD_INPUT
    runners = {"train": _run_train, "plan": _run_plan, "export": _run_export}
    try:
        return runners[ns.command](ns)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, SlideformerError):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    except SlideformerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
