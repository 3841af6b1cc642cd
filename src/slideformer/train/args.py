"""The training run's configuration: one frozen dataclass per YAML section, each field documented.

Owns the user-visible knobs of ``slideformer train`` (model, data, schedule, train, checkpoint, log) and
reuses the engine's own ``OptimConfig`` and ``EngineConfig`` for the ``optim`` and ``engine`` sections.
Invariant: every section validates its fields in ``__post_init__``; ``--help`` is generated from the
attribute docstrings and the presets in ``configs/`` are checked against these classes by the tests, so
a field without a docstring is a bug. ``slideformer train`` with no config file uses the packaged
preset ``assets/tiny/train.yaml`` (tuned for the tiny model), not these library defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from slideformer.config import EngineConfig, OptimConfig
from slideformer.errors import ConfigError

DataFormat = Literal["auto", "text", "prompt_completion", "chat"]
Decay = Literal["cosine", "linear", "constant"]


def builtin_asset_dir() -> Path:
    """Directory of the built-in tiny model (config.json, tokenizer) and its dataset (data.jsonl)."""
    return Path(str(resources.files("slideformer") / "assets" / "tiny"))


@dataclass(frozen=True)
class ModelArgs:
    """Which model to fine-tune."""

    path: str = ""
    """Local Hugging Face model directory (config.json, *.safetensors, tokenizer files). Empty: the built-in
    tiny Llama (4 layers, hidden 128), initialised randomly."""
    tokenizer: str = ""
    """Directory of the tokenizer when it is not beside the weights (empty: model.path)."""
    random_init: bool = False
    """Initialise the weights randomly from config.json instead of loading *.safetensors (for smoke tests
    and pre-training from scratch; always on for the built-in model)."""

    def resolved_path(self) -> Path:
        """The model directory (the built-in asset directory when ``path`` is empty)."""
        return Path(self.path).expanduser() if self.path else builtin_asset_dir()

    def resolved_tokenizer(self) -> Path:
        """The tokenizer directory."""
        return Path(self.tokenizer).expanduser() if self.tokenizer else self.resolved_path()

    @property
    def is_builtin(self) -> bool:
        """True for the built-in tiny model."""
        return not self.path


@dataclass(frozen=True)
class DataArgs:
    """Where the training text comes from and how it becomes fixed-length token sequences."""

    train_path: str = ""
    """Training data: a .jsonl/.json/.parquet file, or a directory saved by ``datasets.save_to_disk``. Empty:
    the built-in instruction dataset (4,000 prompt/completion rows)."""
    val_path: str = ""
    """Validation data in the same formats; empty: hold out ``val_fraction`` of the training rows."""
    val_fraction: float = 0.05
    """Fraction of training rows held out for evaluation when ``val_path`` is empty (0 disables eval)."""
    format: DataFormat = "auto"
    """Row format: 'text' (field text), 'prompt_completion', 'chat' (a list of {role, content} messages
    rendered with the tokenizer's chat template), or 'auto' (decided from the first row's fields)."""
    text_field: str = "text"
    """Field holding the text of a 'text' row."""
    prompt_field: str = "prompt"
    """Field holding the prompt of a 'prompt_completion' row."""
    completion_field: str = "completion"
    """Field holding the completion of a 'prompt_completion' row."""
    messages_field: str = "messages"
    """Field holding the message list of a 'chat' row."""
    mask_prompt: bool = True
    """Exclude prompt tokens (and non-assistant chat turns) from the loss (labels -100)."""
    seq_len: int = 256
    """Tokens per sequence; must not exceed the model's max_position_embeddings."""
    packing: bool = True
    """Concatenate rows (separated by EOS) and cut them into seq_len blocks; false: one row per sequence,
    right-padded per micro-batch with an attention mask, rows longer than seq_len truncated."""
    isolate_documents: bool = True
    """With packing: each row attends only to itself (position ids restart per row, and transformers
    builds the block-diagonal causal mask from them) and a row's first token is not predicted from the
    previous row, so packed training equals unpacked training. false: causal attention across the block."""
    add_eos: bool = True
    """Append the tokenizer's EOS token to each row (text and prompt/completion formats)."""
    max_rows: int = 0
    """Read at most this many rows per file (0: all)."""
    shuffle: bool = True
    """Shuffle sequences every epoch with a generator seeded by train.seed and the epoch number."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.max_rows < 0:
            raise ConfigError(f"data.max_rows must be >= 0, got {self.max_rows}")


@dataclass(frozen=True)
class ScheduleArgs:
    """Learning-rate schedule: linear warmup from 0 to optim.lr, then decay to min_lr_ratio * optim.lr."""

    warmup_steps: int = 10
    """Optimizer steps of linear warmup."""
    decay: Decay = "cosine"
    """Shape of the decay after warmup: 'cosine', 'linear', or 'constant' (no decay)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class TrainArgs:
    """Batching, length of the run, and where its outputs go."""

    output_dir: str = ""
    """Run directory (config, metrics, checkpoints). Empty: runs/<model>-<date>-<time>."""
    batch_size: int = 8
    """Sequences per micro-batch (what is on the GPU at once)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (exact gradient accumulation)."""
    max_steps: int = 0
    """Optimizer steps to run; 0: run ``epochs`` full passes over the data."""
    epochs: int = 1
    """Passes over the training data when max_steps is 0."""
    seed: int = 0
    """Seed for the model's random init, the validation split and the per-epoch shuffle."""
    log_every: int = 10
    """Print a log line every N steps (the progress bar updates every step)."""
    eval_every: int = 50
    """Evaluate the validation loss every N steps and at the end (0: only at the end)."""
    eval_batches: int = 8
    """Micro-batches per evaluation (0: the whole validation set)."""
    max_nonfinite: int = 3
    """Stop with an error after this many consecutive steps whose loss is NaN or inf."""
    resume: str = ""
    """'' (start fresh), 'auto' (continue from the newest checkpoint in output_dir), or a checkpoint path."""
    progress_bar: bool = True
    """Show a tqdm progress bar (loss, tokens/s, ETA)."""
    tensorboard: bool = True
    """Also write TensorBoard event files when the tensorboard package is installed."""
    plot: bool = True
    """Write loss.png at the end when matplotlib is installed."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class CheckpointArgs:
    """Periodic, atomic training checkpoints (weights, Adam moments, schedule, RNG, data position)."""

    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end and on Ctrl-C)."""
    keep_last: int = 2
    """Keep the newest K checkpoints; older ones are deleted after a new one is complete."""
    dir: str = ""
    """Where checkpoints go; empty: <output_dir>/checkpoints."""
    verify: bool = True
    """Check every file's SHA-256 against the manifest when resuming."""
    save_final: bool = True
    """Save a checkpoint when training ends."""
    export_dir: str = ""
    """Also write the trained weights here as a Hugging Face model when training ends (an empty or new
    directory). Weights only, so it fits where a full checkpoint (12 B/param) would not: an 8B model
    exports in ~16 GB of BF16 shards."""
    export_dtype: str = "bfloat16"
    """Dtype of the exported weights: bfloat16, float16, float32, or auto (the one in config.json)."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True)
class RunConfig:
    """Everything ``slideformer train`` needs; the YAML file's top-level keys are these sections."""

    model: ModelArgs = field(default_factory=ModelArgs)
    """Which model to fine-tune."""
    data: DataArgs = field(default_factory=DataArgs)
    """Training and validation data."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW hyperparameters and gradient clipping."""
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    """Learning-rate schedule."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """Batching, run length, outputs."""
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    """Checkpointing."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The sliding-window engine (device, dtype, window, schedule)."""
