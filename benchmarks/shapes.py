"""Model shapes of the benchmark: the real HF configs of issue 3, written out (no downloads), plus ``tiny``.

Each entry holds the architecture fields of the model's published ``config.json``; the values were read
from these public copies (searched 2026-11-25):
- Llama-3.2-3B, Llama-3.1-8B, Qwen2.5-7B, Qwen3-8B: github.com/citsjtu2020/LLM-Prof,
  ``sglang/Model_Config.md`` (verbatim config.json dumps of the HF repos).
- Mistral-7B-v0.3: huggingface.co/mistralai/Mistral-7B-Instruct-v0.3 ``config.json`` (same
  architecture as the base v0.3 release; also huggingface.co/unsloth/mistral-7b-v0.3 ``config.json``
  whose ``_name_or_path`` is mistralai/Mistral-7B-v0.3).
Qwen2 has no ``attention_bias`` field: its q/k/v projections always carry a bias in HF's Qwen2 code.

Parameter counts come from the HF model built on the meta device, so they are exact for the HF code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_LLAMA3_ROPE_3B = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
_LLAMA3_ROPE_8B = {**_LLAMA3_ROPE_3B, "factor": 8.0}

CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B config.json
    "llama3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE_3B,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    },
    # meta-llama/Llama-3.2-3B (LLM-Prof sglang/Model_Config.md)
    "llama3.2-3b": {
        "model_type": "llama",
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE_3B,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    },
    # meta-llama/Llama-3.1-8B (LLM-Prof sglang/Model_Config.md)
    "llama3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE_8B,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    },
    # Qwen/Qwen2.5-7B (LLM-Prof sglang/Model_Config.md); q/k/v bias is implicit in Qwen2
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "hidden_act": "silu",
    },
    # Qwen/Qwen3-8B (LLM-Prof sglang/Model_Config.md)
    "qwen3-8b": {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": 36,
        "hidden_act": "silu",
    },
    # mistralai/Mistral-7B-v0.3 (config.json of mistralai/Mistral-7B-Instruct-v0.3, unsloth/mistral-7b-v0.3)
    "mistral-7b-v0.3": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
        "hidden_act": "silu",
    },
    # A Llama-shaped toy for CPU smoke tests (untied head, GQA, odd-ish sizes).
    "tiny": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "hidden_act": "silu",
    },
}

SOURCES: dict[str, str] = {
    "llama3.2-1b": "meta-llama/Llama-3.2-1B config.json",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B config.json",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B config.json",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B config.json",
    "qwen3-8b": "Qwen/Qwen3-8B config.json",
    "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3 config.json",
    "tiny": "toy Llama shape for CPU smoke tests",
}


def hf_config(name: str) -> Any:
    """The ``transformers`` config of shape ``name`` (SDPA attention, no KV cache)."""
    from transformers import AutoConfig

    if name not in CONFIGS:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(CONFIGS)}")
    fields = dict(CONFIGS[name])
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(name: str, *, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised HF causal LM of shape ``name``, created directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(name)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


@dataclass(frozen=True)
class ShapeStats:
    """Parameter counts and the FLOP model of one shape."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    vocab_size: int
    total_params: int
    """Every trainable parameter (a tied embedding/head counted once)."""
    layer_params: int
    """One decoder layer."""
    embedding_params: int
    head_params: int
    """The LM head matrix (equal to the embedding when tied)."""
    tied: bool

    @property
    def flop_params(self) -> int:
        """N of the FLOP formula: non-embedding parameters plus the LM head (it does a matmul)."""
        non_embedding = self.total_params - self.embedding_params - (0 if self.tied else self.head_params)
        return non_embedding + self.head_params

    def flops_per_token(self, seq_len: int) -> float:
        """PaLM's model FLOPs per token, ``6·N + 12·L·(heads·head_dim)·S`` (recompute not counted)."""
        return 6.0 * self.flop_params + 12.0 * self.num_layers * self.num_heads * self.head_dim * seq_len

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": SOURCES.get(self.name, ""),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "total_params": self.total_params,
            "layer_params": self.layer_params,
            "embedding_params": self.embedding_params,
            "head_params": self.head_params,
            "tied": self.tied,
            "flop_params": self.flop_params,
        }


def shape_stats(name: str) -> ShapeStats:
    """Exact parameter counts of shape ``name`` (from the model built on the meta device)."""
    model = build_model(name, device="meta", dtype=torch.bfloat16)
    cfg = model.config
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    layers = model.model.layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ShapeStats(
        name=name,
        num_layers=len(layers),
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        total_params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        embedding_params=emb.numel(),
        head_params=head.numel(),
        tied=head is emb,
    )


def random_batch(
    batch_size: int, seq_len: int, vocab_size: int, *, device: torch.device | str, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random full-length token ids and labels (labels = ids; HF shifts them inside the loss)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen, dtype=torch.long)
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids.clone()}
