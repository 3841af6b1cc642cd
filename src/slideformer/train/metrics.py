"""Per-step metrics: progress bar, periodic log lines, metrics.csv, TensorBoard and a loss-curve PNG.

Owns everything the run reports while it trains. Invariants: metrics.csv always exists and has one
row per optimizer step done (on resume, rows past the checkpoint's step are dropped first, so the file
never holds a step twice); TensorBoard and matplotlib are optional and only their absence is tolerated.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import psutil
import torch
from tqdm import tqdm

CSV_FIELDS = [
    "step",
    "loss",
    "eval_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "tflops",
    "step_time_s",
    "host_rss_gib",
    "gpu_peak_gib",
    "elapsed_s",
]


@dataclass
class StepMetrics:
    """What one optimizer step measured."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    tflops: float
    step_time_s: float
    host_rss_gib: float
    gpu_peak_gib: float
    elapsed_s: float
    eval_loss: float | None = None


def host_rss_gib() -> float:
    """Resident memory of this process, GiB."""
    return psutil.Process().memory_info().rss / 2**30


def gpu_peak_gib() -> float:
    """Peak GPU memory allocated by torch in this process, GiB (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


class MetricsLogger:
    """Writes metrics to the terminal, ``metrics.csv``, TensorBoard (if installed) and ``loss.png``."""

    def __init__(
        self,
        out_dir: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 10,
        progress_bar: bool = True,
        tensorboard: bool = True,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        """``enabled`` False (data-parallel ranks other than 0): record nothing, print nothing."""
        self.enabled = enabled
        self.out_dir = out_dir
        self.log_every = log_every
        self.stream = stream or sys.stderr
        self.csv_path = out_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = self._existing_rows(start_step) if enabled else []
        self._tb: Any = None
        self._bar: Any = None
        if not enabled:
            return
        self._csv_file = open(self.csv_path, "w", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS)
        self._csv.writeheader()
        for row in self.rows:
            self._csv.writerow(row)
        self._csv_file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                self._tb = None
            else:
                self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self._bar = (
            tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=self.stream,
            )
            if progress_bar
            else None
        )

    def _existing_rows(self, start_step: int) -> list[dict[str, Any]]:
        if start_step == 0 or not self.csv_path.is_file():
            return []
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            return [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= start_step]

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def log_step(self, m: StepMetrics) -> None:
        """Record one optimizer step (and its eval loss, if it evaluated)."""
        if not self.enabled:
            return
        row = {k: ("" if v is None else v) for k, v in asdict(m).items()}
        self.rows.append(row)
        self._csv.writerow(row)
        self._csv_file.flush()
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops", "host_rss_gib", "gpu_peak_gib"):
                self._tb.add_scalar(f"train/{key}", getattr(m, key), m.step)
            if m.eval_loss is not None:
                self._tb.add_scalar("eval/loss", m.eval_loss, m.step)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{m.loss:.4f}", lr=f"{m.lr:.2e}", tok_s=f"{m.tokens_per_s:,.0f}", refresh=False
            )
            self._bar.update(1)
        if m.step % self.log_every == 0 or m.eval_loss is not None:
            ev = f" eval_loss {m.eval_loss:.4f}" if m.eval_loss is not None else ""
            self.write(
                f"step {m.step:>6} | loss {m.loss:.4f}{ev} | lr {m.lr:.3e} | grad_norm {m.grad_norm:.3f} | "
                f"{m.tokens_per_s:,.0f} tok/s | {m.tflops:.2f} TFLOPS | host {m.host_rss_gib:.2f} GiB | "
                f"gpu {m.gpu_peak_gib:.2f} GiB"
            )

    def close(self) -> None:
        """Close the bar and the files; draw loss.png when matplotlib is there."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled:
            self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def plot(self) -> Path | None:
        """Write ``loss.png`` (train and eval loss per step); None when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [int(r["step"]) for r in self.rows]
        losses = [float(r["loss"]) for r in self.rows]
        evals = [
            (int(r["step"]), float(r["eval_loss"])) for r in self.rows if r["eval_loss"] not in ("", None)
        ]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, label="train loss", linewidth=1)
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class Throughput:
    """Tokens/s and model TFLOPS of a step (6 x params x tokens: forward + backward, no recompute)."""

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params
        self.t0 = time.perf_counter()

    def start(self) -> None:
        """Mark the start of a step."""
        self.t0 = time.perf_counter()

    def stop(self, tokens: int) -> tuple[float, float, float]:
        """(seconds, tokens/s, TFLOPS) since ``start``."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = tokens / dt
        return dt, tps, 6.0 * self.n_params * tps / 1e12
