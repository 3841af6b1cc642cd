"""Batch validation and preparation: everything checked before the engine touches a buffer.

Invariant: a batch that reaches the schedule has 2-D integer ``input_ids`` with at least one token,
matching optional ``attention_mask`` / ``labels`` / ``position_ids``, token ids inside the vocabulary,
a length within the model's positions, and (over the whole step) at least one label to learn from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slideformer.errors import BatchError
from slideformer.kernels.reference import IGNORE_INDEX, shift_labels


@dataclass
class MicroBatch:
    """One micro-batch, validated: host ids for the embedding gather, device tensors for the rest."""

    ids_host: torch.Tensor
    ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    targets: torch.Tensor
    """Shifted labels, flattened to ``[B*S]`` (-100 where nothing is learnt)."""
    tokens: int
    shape: torch.Size
    rows_host: torch.Tensor | None = None
    """The distinct token ids, sorted (host): the embedding rows this micro-batch reads and updates. Prepared for
    training steps (``prepare_batch(rows=True)``): the embedding backward sums each row's tokens over them
    (``step.rows_grad``) and the split embedding update splits the matrix by them; evaluation has none."""
    rows: torch.Tensor | None = None
    """``rows_host`` on the device."""
    row_of: torch.Tensor | None = None
    """For each token (flattened), its row's position in ``rows`` (device)."""


def _tensor(batch: Mapping[str, Any], key: str, i: int) -> torch.Tensor | None:
    value = batch.get(key)
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise BatchError(f"micro-batch {i}: {key} must be a torch.Tensor, got {type(value).__name__}")
    return value


def prepare_batch(batch: Any, vocab_size: int, max_positions: int | None,
                  device: torch.device, require_labels: bool = True, rows: bool = False) -> list[MicroBatch]:
    """Validate ``batch`` (a dict, or a list of dicts = micro-batches) and move it where it is used; ``rows``:
    also the distinct token ids (``MicroBatch.rows_host``, for the split embedding update)."""
    if isinstance(batch, Mapping):
        items: Sequence[Any] = [batch]
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        items = batch
    else:
        raise BatchError(f"a batch is a dict of tensors or a list of such dicts, got {type(batch).__name__}")
    if len(items) == 0:
        raise BatchError("empty batch: pass at least one micro-batch with input_ids")
    out = []
    for i, mb in enumerate(items):
        if not isinstance(mb, Mapping):
            raise BatchError(f"micro-batch {i} is a {type(mb).__name__}, expected a dict of tensors")
        out.append(_prepare_one(mb, i, vocab_size, max_positions, device, rows))
    if require_labels and sum(m.tokens for m in out) == 0:
        raise BatchError("no label tokens to learn from in this step: every label is -100 after the "
                         "causal shift (check the labels / attention_mask, or use longer sequences)")
    return out


def _prepare_one(mb: Mapping[str, Any], i: int, vocab: int, max_pos: int | None,
                 device: torch.device, with_rows: bool) -> MicroBatch:
    ids = _tensor(mb, "input_ids", i)
    if ids is None:
        raise BatchError(f"micro-batch {i} has no input_ids")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise BatchError(f"micro-batch {i}: input_ids must be an integer tensor [batch, seq], "
                         f"got {tuple(ids.shape)} {ids.dtype}")
    if ids.numel() == 0:
        raise BatchError(f"micro-batch {i} is empty (input_ids shape {tuple(ids.shape)})")
    bsz, seq = ids.shape
    if max_pos is not None and seq > max_pos:
        raise BatchError(f"micro-batch {i}: sequence length {seq} exceeds the model's max_position_embeddings "
                         f"{max_pos}; truncate or pack to at most {max_pos} tokens")
    ids = ids.detach().to("cpu", torch.long)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise BatchError(f"micro-batch {i}: token ids must lie in [0, {vocab}), found [{lo}, {hi}]; "
                         "does the tokenizer match the model?")
    mask = _tensor(mb, "attention_mask", i)
    if mask is not None and tuple(mask.shape) != (bsz, seq):
        raise BatchError(f"micro-batch {i}: attention_mask shape {tuple(mask.shape)} != input_ids {(bsz, seq)}")
    labels = _tensor(mb, "labels", i)
    if labels is None:
        labels = ids.clone()
        if mask is not None:
            labels[mask.cpu() == 0] = IGNORE_INDEX
    else:
        if tuple(labels.shape) != (bsz, seq):
            raise BatchError(f"micro-batch {i}: labels shape {tuple(labels.shape)} != input_ids {(bsz, seq)}")
        labels = labels.detach().to("cpu", torch.long)
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise BatchError(f"micro-batch {i}: labels must be -100 or lie in [0, {vocab})")
    pos = _tensor(mb, "position_ids", i)
    if pos is not None and (pos.dim() != 2 or pos.shape[-1] != seq or pos.shape[0] not in (1, bsz)):
        raise BatchError(f"micro-batch {i}: position_ids shape {tuple(pos.shape)} must be [1 or {bsz}, {seq}]")
    targets = shift_labels(labels).reshape(-1)
    tokens = int((targets != IGNORE_INDEX).sum())
    rows, row_of = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True) if with_rows else (None, None)
    return MicroBatch(
        ids_host=ids.reshape(-1),
        ids=ids.to(device),
        attention_mask=None if mask is None else mask.to(device),
        position_ids=None if pos is None else pos.to(device, torch.long),
        targets=targets.to(device),
        tokens=tokens,
        shape=ids.shape,
        rows_host=rows,
        rows=None if rows is None else rows.to(device),
        row_of=None if row_of is None else row_of.to(device),
    )
