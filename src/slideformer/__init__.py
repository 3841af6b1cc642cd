"""slideformer: full-parameter fine-tuning of LLMs larger than the GPU, on one GPU.

Public API: ``Engine`` (build from an HF model, a local HF directory or a config; ``train_step``,
``state_dict``, ``hf_model``), ``EngineConfig`` and ``OptimConfig``.
"""

from slideformer.config import EngineConfig, OptimConfig
from slideformer.errors import (
    BatchError,
    ConfigError,
    HostMemoryError,
    ModelPathError,
    SlideformerError,
    UnsupportedModelError,
    WorkerError,
)
from slideformer.models import supported_model_types
from slideformer.runtime.engine import Engine, StepResult

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "HostMemoryError",
    "ModelPathError",
    "OptimConfig",
    "SlideformerError",
    "StepResult",
    "UnsupportedModelError",
    "WorkerError",
    "supported_model_types",
]
