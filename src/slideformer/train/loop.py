"""The training run: config -> data and engine -> steps with schedule, eval, metrics, checkpoints.

Owns the order of a run (validate everything cheap first, then allocate; then step, log, evaluate,
checkpoint) and its exits: normal end, Ctrl-C (finish the current step, save, return), divergence
(``max_nonfinite`` non-finite losses in a row: stop without saving poisoned weights). Invariant: the
state saved at step N (engine state, data position, RNG, schedule position) is everything step N+1
depends on, so ``resume`` reproduces an uninterrupted run bit for bit.

Non-finite losses: the engine checks each micro-batch's loss before any update of the step can start
and skips the whole step (``EngineConfig.skip_nonfinite``); the loop warns, and stops after
``train.max_nonfinite`` such steps in a row.

Data-parallel (launched by torchrun, ``WORLD_SIZE > 1``): ``train.batch_size`` is per rank; every rank
draws the same global batch of ``batch_size x world`` rows per micro-batch and trains on its own slice
(rows ``[rank * batch_size, (rank + 1) * batch_size)``), so N ranks train exactly like one process with N
times the batch. Only rank 0 writes files (metrics, run info, checkpoints, with a barrier after each
save); the stop decision (end, Ctrl-C, divergence) is the same on every rank. The output and checkpoint
directories must be on a file system every rank sees (resume reads the checkpoint on every rank).

Helpers each own one part: ``dataset`` reads the training and validation sequences, ``resume`` picks the
checkpoint to continue from and captures and restores the trainer state, ``interrupt`` turns Ctrl-C into
a stop request every rank agrees on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slideformer.dist.group import env_topology
from slideformer.errors import ConfigError, SlideformerError
from slideformer.train import checkpoint, resume, run_info
from slideformer.train.args import RunConfig
from slideformer.train.config_io import dump_yaml
from slideformer.train.data import BatchStream, eval_batches
from slideformer.train.dataset import load_data
from slideformer.train.export import export_engine, exported_values
from slideformer.train.interrupt import agree, sigint_to_flag
from slideformer.train.lr_schedule import LRSchedule
from slideformer.train.metrics import MetricsLogger, StepMetrics, Throughput, gpu_peak_gib, host_rss_gib
from slideformer.train.model_loading import (
    build_engine,
    check_model_dir,
    check_seq_len,
    load_hf_config,
    load_tokenizer,
)


class DivergenceError(SlideformerError, RuntimeError):
    """Training produced too many non-finite losses in a row."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    output_dir: Path
    steps: int
    """Optimizer steps done, counting those before a resume."""
    losses: list[float] = field(default_factory=list)
    """Training loss of each step run in this invocation."""
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval loss) pairs of this invocation."""
    checkpoint: Path | None = None
    export: Path | None = None
    """The last checkpoint written, if any."""
    interrupted: bool = False
    """True when Ctrl-C (SIGINT) ended the run early."""
    seconds: float = 0.0
    """Wall time of this invocation."""


def resolve_output_dir(cfg: RunConfig) -> Path:
    """The run directory: train.output_dir, or runs/<model>-<date>-<time>; created and checked writable."""
    if cfg.train.output_dir:
        out = Path(cfg.train.output_dir).expanduser()
    else:
        name = "tiny" if cfg.model.is_builtin else Path(cfg.model.path).name
        out = Path("runs") / f"{name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"output directory {out} is not writable ({e.strerror or e}); set train.output_dir"
        ) from None
    return out


def train(
    cfg: RunConfig,
    *,
    stop_at: int | None = None,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> TrainResult:
    """Run training as configured.

    Args:
        cfg: the resolved run configuration.
        stop_at: end this invocation (with a checkpoint) after this many total steps, the schedule still
            planned for the whole run; used by tests and by jobs in fixed time slices.
        on_step: called after each step with its metrics (the progress bar and files are already updated).

    Raises:
        ConfigError, ModelPathError, DataError: bad configuration or input, raised before anything
            large is allocated.
        DivergenceError: ``train.max_nonfinite`` non-finite losses in a row.
        CheckpointError: a checkpoint could not be written (earlier checkpoints are intact).
    """
    t_start = time.perf_counter()
    model_dir = cfg.model.resolved_path()
    check_model_dir(model_dir, need_weights=not (cfg.model.is_builtin or cfg.model.random_init))
    hf_config = load_hf_config(model_dir)
    check_seq_len(cfg, hf_config)
    cfg.engine.resolve_device()  # a CUDA device without a GPU fails here, before data work
    tokenizer = load_tokenizer(cfg.model.resolved_tokenizer())
    data = load_data(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ctx = None
    if env_topology() is not None:
        from slideformer.dist import DistContext

        ctx, engine_cfg = DistContext.from_env(cfg.engine)
        cfg = dataclasses.replace(cfg, engine=engine_cfg)
    world, main = (1, True) if ctx is None else (ctx.world, ctx.is_main)
    stream = BatchStream(
        data.train,
        batch_size=cfg.train.batch_size * world,
        grad_accum=cfg.train.grad_accum,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        pad_id=pad_id,
    )
    total = cfg.train.max_steps or cfg.train.epochs * stream.steps_per_epoch
    schedule = LRSchedule(cfg.optim.lr, total, cfg.schedule)
    out = resolve_output_dir(cfg) if main else Path()
    if ctx is not None:
        out = Path(ctx.broadcast_from_main(str(out)))  # a timestamped default name must be rank 0's
    ckpt_root = Path(cfg.checkpoint.dir).expanduser() if cfg.checkpoint.dir else out / "checkpoints"
    resume_from = resume.resume_source(cfg, ckpt_root)
    export_dir = Path(cfg.checkpoint.export_dir).expanduser() if cfg.checkpoint.export_dir else None
    if export_dir is not None and export_dir.exists() and (not export_dir.is_dir() or any(export_dir.iterdir())):
        raise ConfigError(f"checkpoint.export_dir {export_dir} exists and is not empty; point it at a new "
                          "directory (the export is written there when training ends)")
    if main:
        (out / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")

    def write_extra(tmp: Path) -> None:
        (tmp / "run_config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        hf_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if (model_dir / "generation_config.json").is_file():
            (tmp / "generation_config.json").write_bytes((model_dir / "generation_config.json").read_bytes())

    # Every RNG a run may draw from starts from train.seed (a resume then restores the saved states), so
    # two fresh runs with the same seed and data are identical, saved trainer state included.
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    with build_engine(cfg, hf_config) if ctx is None else build_engine(cfg, hf_config, ctx) as engine:
        step = 0
        streak = 0
        if resume_from is not None:
            step, streak = resume.restore(resume_from, engine, stream, cfg.checkpoint.verify)
        n_params = int(engine.num_params)
        run_info_write = run_info.write if main else (lambda *a: None)
        run_info_write(
            out,
            engine.device,
            {
                "model": str(model_dir),
                "num_params": n_params,
                "total_steps": total,
                "steps_per_epoch": stream.steps_per_epoch,
                "data": data.summary,
                "memory": engine.memory_report(),
                "resumed_from": str(resume_from) if resume_from else None,
            },
        )
        logger = MetricsLogger(
            out,
            total_steps=total,
            start_step=step,
            log_every=cfg.train.log_every,
            progress_bar=cfg.train.progress_bar and main,
            tensorboard=cfg.train.tensorboard and main,
            enabled=main,
        )
        logger.write(
            f"slideformer: {model_dir.name} ({n_params / 1e6:,.2f}M params) on {engine.device} | "
            f"{len(data.train)} train / {len(data.val)} val sequences of <= {cfg.data.seq_len} tokens | "
            f"{total} steps x {stream.per_step} sequences"
            + (f" ({world} ranks x {stream.per_step // world})" if ctx is not None else "")
            + f" | output {out}"
            + (f" | resumed from {resume_from.name}" if resume_from else "")
        )
        report = engine.memory_report()
        if engine.device.type == "cuda":  # what the engine decided: resident layers, upload path, host memory
            why = engine.resident_reason
            logger.write(
                f"placement: {report['resident_layers']} of {engine.num_layers} layers resident on the GPU"
                + (f" ({why})" if why else "") + f" | uploads: {report['upload_cast']} | host state "
                f"{report['host_state_bytes'] / 2**30:,.2f} GiB, pinned {report['pinned_bytes'] / 2**30:,.2f} GiB"
            )
            if engine.park_hint and cfg.train.grad_accum == 1:  # (the plan models one micro-batch per step)
                logger.write(f"hint: {engine.park_hint}")
        disk = report.get("disk")
        if disk:
            logger.write(
                f"disk tier: AdamW moments in {disk['directory']} ({disk['file_bytes'] / 2**30:,.2f} GiB, "
                f"{disk['backend']}{', O_DIRECT' if disk['o_direct'] else ', buffered'}): measured "
                f"{disk.get('probe_write_gbs', 0):.2f} GB/s write, {disk.get('probe_read_gbs', 0):.2f} GB/s read"
            )
        result = TrainResult(out, step)
        # A step whose checkpoint is already on disk is not saved again (e.g. a run resumed at its end, or
        # Ctrl-C right after a periodic save): replacing a complete checkpoint is the one save that is
        # not atomic, so it is avoided.
        saved: tuple[int, Path] | None = None
        if resume_from is not None and resume_from.parent.resolve() == ckpt_root.resolve():
            saved = (step, resume_from)

        def save() -> Path:
            sd, st = resume.capture(
                engine,
                stream,
                total_steps=total,
                streak=streak,
                last_loss=result.losses[-1] if result.losses else None,
            )
            if ctx is None:
                return checkpoint.save(ckpt_root, step, sd, st, write_extra, cfg.checkpoint.keep_last)
            from slideformer.dist import state as dist_state

            path = ckpt_root / checkpoint.step_dir_name(step)
            if main:
                path = checkpoint.save(ckpt_root, step, sd, st, write_extra, cfg.checkpoint.keep_last)
            else:
                dist_state.drain(sd)  # the same gathers rank 0's save makes, in the same order
            ctx.barrier()  # the checkpoint is complete before any rank goes on (or exits)
            return path

        def export_final(target: Path) -> Path:
            def extra(d: Path) -> None:
                tokenizer.save_pretrained(str(d))
                if (model_dir / "generation_config.json").is_file():
                    (d / "generation_config.json").write_bytes((model_dir / "generation_config.json").read_bytes())

            params = engine.state_dict()["params"]
            if not main:
                for value in exported_values(params, hf_config.to_dict()):
                    value.value()  # the same gathers rank 0's export makes, in the same order
            else:
                try:
                    export_engine(params, target, hf_config.to_dict(), extra, cfg.checkpoint.export_dtype)
                except OSError as e:
                    what = "the disk is full" if e.errno == errno.ENOSPC else str(e)
                    raise checkpoint.CheckpointError(f"exporting the trained model to {target} failed: {what}") from e
            if ctx is not None:
                ctx.barrier()  # the export is complete before any rank exits
            return target

        def evaluate() -> float | None:
            if not data.val:
                return None
            # Forward-only through the engine's window: on the GPU, with the training kernels.
            # Data-parallel: every rank evaluates the same global batches (same loss everywhere, same collectives).
            batches = list(eval_batches(data.val, cfg.train.batch_size * world, cfg.train.eval_batches, pad_id))
            if not batches:
                return None
            loss, _ = engine.eval_loss(batches)
            return loss

        end = min(total, stop_at) if stop_at is not None else total
        timer = Throughput(n_params)
        try:
            with sigint_to_flag() as interrupted:
                while step < end and not agree(ctx, interrupted.is_set()):
                    batches = stream.next_step()
                    if ctx is not None:
                        bs = cfg.train.batch_size
                        batches = [{k: v[ctx.rank * bs:(ctx.rank + 1) * bs] for k, v in b.items()} for b in batches]
                    lr = schedule.lr_at(step)
                    timer.start()
                    res = engine.train_step(batches, lr=lr)
                    loss, grad_norm = float(res.loss), float(res.grad_norm)
                    tokens = sum(
                        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                        for b in batches
                    )
                    if ctx is not None:
                        tokens = int(ctx.all_sum(tokens))  # throughput counts every rank's tokens
                    dt_s, tps, tflops = timer.stop(tokens)
                    step += 1
                    result.steps = step
                    if math.isfinite(loss) and math.isfinite(grad_norm):
                        streak = 0
                    else:
                        streak += 1
                        logger.write(
                            f"warning: step {step}: non-finite loss {loss} / grad norm {grad_norm} "
                            f"({streak} in a row, limit train.max_nonfinite={cfg.train.max_nonfinite})"
                        )
                        if streak >= cfg.train.max_nonfinite:
                            raise DivergenceError(
                                f"{streak} non-finite losses in a row (last at step {step}); their updates were "
                                "skipped, but training is diverging, so no checkpoint was saved. Lower optim.lr, "
                                "set optim.max_grad_norm, or resume from the last checkpoint"
                            )
                    ev = None
                    if data.val and (
                        (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total
                    ):
                        ev = evaluate()
                        if ev is not None:
                            result.eval_losses.append((step, ev))
                    result.losses.append(loss)
                    m = StepMetrics(
                        step,
                        loss,
                        lr,
                        grad_norm,
                        tokens,
                        tps,
                        tflops,
                        dt_s,
                        host_rss_gib(),
                        gpu_peak_gib(),
                        time.perf_counter() - t_start,
                        ev,
                    )
                    logger.log_step(m)
                    if on_step is not None:
                        on_step(m)
                    if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < end:
                        if streak == 0:
                            result.checkpoint = save()
                            saved = (step, result.checkpoint)
                        else:  # the last update may have been computed from a non-finite gradient
                            logger.write(f"skipping the checkpoint of step {step}: its loss was not finite")
                result.interrupted = interrupted.is_set()
                if result.interrupted:
                    logger.write(f"interrupted at step {step}: saving a checkpoint, then exiting")
                if streak:
                    logger.write(f"not saving a checkpoint at step {step}: the last loss was not finite")
                elif saved is not None and saved[0] == step:
                    result.checkpoint = saved[1]
                elif result.interrupted or stop_at is not None or cfg.checkpoint.save_final:
                    result.checkpoint = save()
                if export_dir is not None and not streak and not result.interrupted:
                    result.export = export_final(export_dir)
                    logger.write(f"exported the trained model to {export_dir}")
        finally:
            logger.close()
        result.seconds = time.perf_counter() - t_start
        if not main:
            return result
        plot = logger.plot() if cfg.train.plot else None
        summary = {
            "steps": step,
            "total_steps": total,
            "seconds": round(result.seconds, 2),
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None,
            "eval_losses": result.eval_losses,
            "interrupted": result.interrupted,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "export": str(result.export) if result.export else None,
            "loss_plot": str(plot) if plot else None,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        return result
