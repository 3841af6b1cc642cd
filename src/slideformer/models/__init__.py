"""Registry of model adapters keyed by HF ``config.model_type``.

Invariant: an unsupported ``model_type`` raises ``UnsupportedModelError`` naming the supported ones,
before the engine allocates anything.
"""

from __future__ import annotations

from slideformer.errors import UnsupportedModelError
from slideformer.models.adapter import LayerCall, ModelAdapter, ModelParts, run_layer

_LLAMA_LIKE = ModelAdapter()

# Every family here uses HF's own layer modules; they differ only in what the adapter reads off the
# config (tied head, logit soft-capping, embedding scale), which ModelAdapter.split handles.
ADAPTERS: dict[str, ModelAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
}


def supported_model_types() -> list[str]:
    """The ``model_type`` values slideformer can train."""
    return sorted(ADAPTERS)


def get_adapter(model_type: str) -> ModelAdapter:
    """The adapter for ``model_type``, or a clear error listing the supported ones."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None


__all__ = ["ADAPTERS", "LayerCall", "ModelAdapter", "ModelParts", "get_adapter", "run_layer",
           "supported_model_types"]
