"""Validation loss: a forward-only pass over held-out micro-batches.

Owns the eval-loss definition: the token-weighted mean next-token cross-entropy over every label that
is not -100, the same quantity the engine's ``train_step`` reports as ``loss``. Training runs evaluate
through ``Engine.eval_loss`` (forward-only, on the device); this function computes the same quantity
with a plain HF model (e.g. ``Engine.hf_model()`` or an exported checkpoint) and is the reference the
tests hold the engine to. Invariant: evaluation never changes a parameter or RNG state that training
uses.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from slideformer.train.data import IGNORE_INDEX


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(mean loss, label tokens) of ``model`` over ``batches`` (unshifted labels, -100 ignored)."""
    was_training = model.training
    model.eval()
    rng = torch.get_rng_state()
    total, count = 0.0, 0
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            # Packed blocks carry position_ids (documents isolated); transformers honours them only
            # without a KV cache.
            logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch.get("position_ids"),
                           use_cache=False).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        torch.set_rng_state(rng)
        model.train(was_training)
    return (total / count if count else float("nan")), count
