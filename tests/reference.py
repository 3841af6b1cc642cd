"""Plain-PyTorch reference training for parity tests: HF model + torch.optim.AdamW, no slideformer.

Same semantics as the engine: token-weighted loss over all micro-batches of a step (as one big
batch), optional global-norm clipping with torch.nn.utils.clip_grad_norm_, weight decay on matrices
only (HF Trainer's rule for norms and biases).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama_tied": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=16),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, pad_token_id=0),
    "gemma2": dict(model_type="gemma2", head_dim=16, final_logit_softcapping=30.0,
                   attn_logit_softcapping=None, query_pre_attn_scalar=16),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, final_logit_softcapping=None,
                        query_pre_attn_scalar=16, sliding_window=4),
}


def tiny_config(family: str, layers: int = 3, vocab: int = 1024, hidden: int = 64) -> Any:
    """A tiny config of ``family`` built in code (no downloads)."""
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    base = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                attention_dropout=0.0)
    base.update(spec)
    return AutoConfig.for_model(model_type, **base)


def llama8b_config() -> Any:
    """Llama-3.1-8B's shape (its config.json's sizes, no weights): the planner's reference point in tests."""
    return AutoConfig.for_model("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                max_position_embeddings=131072, tie_word_embeddings=False)


def make_model(config: Any, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norms, so their gradients and updates are exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def adamw_for(model: nn.Module, lr: float, weight_decay: float, **kw: Any) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, **kw)


def shifted(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def reference_step(model: nn.Module, opt: torch.optim.Optimizer, mbs: list[dict[str, torch.Tensor]],
                   max_norm: float | None, autocast: torch.dtype | None = None) -> float:
    """One optimizer step over micro-batches ``mbs``; returns the token-weighted mean loss."""
    total = sum(int((shifted(m["labels"]) != -100).sum()) for m in mbs)
    loss_sum = 0.0
    for m in mbs:
        device_type = m["input_ids"].device.type
        ctx = torch.autocast(device_type, dtype=autocast) if autocast is not None else nullcontext()
        with ctx:
            logits = model(input_ids=m["input_ids"], attention_mask=m.get("attention_mask"), use_cache=False,
                           position_ids=m.get("position_ids")).logits
        targets = shifted(m["labels"]).reshape(-1)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                                           ignore_index=-100, reduction="sum") / total
        loss.backward()
        loss_sum += float(loss.detach())
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum


def random_batch(vocab: int, bsz: int, seq: int, gen: torch.Generator, pad_left: bool = False,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random tokens with ragged lengths (padded), labels masked on padding and on a prompt prefix."""
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    mask = torch.ones(bsz, seq, dtype=torch.long)
    for b in range(1, bsz):
        n = int(torch.randint(seq // 2, seq + 1, (1,), generator=gen))
        if pad_left:
            mask[b, : seq - n] = 0
        else:
            mask[b, n:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100  # a masked "prompt"
    return {k: v.to(device) for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against ``b``."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
