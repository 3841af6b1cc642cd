"""Adapters: the only place that knows how an HF causal-LM module tree is laid out.

An adapter splits a model into the pieces the engine slides (embedding, decoder layers, final norm,
LM head) and runs the model's own forward "preamble" (masks, RoPE, embedding scaling) so that each
decoder layer gets exactly the keyword arguments HF would pass it. It patches instances only, and
only for the duration of one call. Without a mask or position ids those arguments depend only on the input's
shape, and are kept per shape on the model's parts (``ModelParts.preamble_calls``).

Invariant: every trainable parameter of the model belongs to exactly one of embed / layers / norm /
lm_head (a tied LM head shares the embedding's tensor); anything else is rejected at construction.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slideformer.errors import UnsupportedModelError


class _StopPreamble(Exception):
    """Raised by the last capture stub to stop the base model's forward before its final norm."""


class _CaptureLayer(nn.Module):
    """Stands in for a decoder layer during the preamble: records what HF passes it."""

    def __init__(self, source: nn.Module, sink: list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]],
                 last: bool) -> None:
        super().__init__()
        self._sink = sink
        self._last = last
        # The base model may read per-layer attributes to pick the mask (e.g. sliding vs full).
        for attr in ("attention_type", "layer_type", "is_sliding", "sliding_window", "layer_idx"):
            if hasattr(source, attr):
                object.__setattr__(self, attr, getattr(source, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sink.append((hidden_states, args, kwargs))
        if self._last:
            raise _StopPreamble
        return hidden_states


@dataclass
class LayerCall:
    """The arguments HF passes to one decoder layer, minus the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class ModelParts:
    """The pieces of an HF causal LM that the engine moves and computes separately."""

    model: nn.Module
    base: nn.Module
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Linear
    rotary: nn.Module | None
    tied: bool
    logit_softcap: float | None
    embed_scale: float | None
    preamble_calls: OrderedDict[Any, list[LayerCall]] = field(default_factory=OrderedDict)
    """``ModelAdapter.layer_calls``'s cache: the layers' arguments by input shape, dtype and device."""


PREAMBLE_CACHE = 8
"""Input shapes whose preamble ``ModelAdapter.layer_calls`` keeps per model (the least recently used goes first)."""


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a layer call's arguments (nested in tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class ModelAdapter:
    """Default adapter for Llama-style decoder-only models (model.model.{embed_tokens,layers,norm})."""

    base_attr = "model"
    embed_attr = "embed_tokens"
    layers_attr = "layers"
    norm_attr = "norm"
    rotary_attr = "rotary_emb"

    def split(self, model: nn.Module) -> ModelParts:
        """Split ``model`` into its parts and check that nothing is left over."""
        base = getattr(model, self.base_attr, None)
        lm_head = getattr(model, "lm_head", None)
        if base is None or lm_head is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no .{self.base_attr} / .lm_head; pass an AutoModelForCausalLM"
            )
        embed = getattr(base, self.embed_attr)
        layers = getattr(base, self.layers_attr)
        norm = getattr(base, self.norm_attr)
        rotary = getattr(base, self.rotary_attr, None)
        if getattr(lm_head, "bias", None) is not None:
            raise UnsupportedModelError("an LM head with a bias is not supported")
        tied = lm_head.weight is embed.weight
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        softcap = getattr(text_cfg, "final_logit_softcapping", None)
        scale = getattr(embed, "embed_scale", None)
        if scale is None:
            embed_scale = None
        elif isinstance(scale, torch.Tensor) and scale.device.type == "meta":
            # HF's scaled embeddings (Gemma) are built with scale sqrt(hidden_size).
            embed_scale = float(text_cfg.hidden_size) ** 0.5
        else:
            embed_scale = float(scale)
        parts = ModelParts(model, base, embed, layers, norm, lm_head, rotary, tied,
                           float(softcap) if softcap else None, embed_scale)
        self._check_coverage(parts)
        self._check_dropout(text_cfg)
        return parts

    @staticmethod
    def _check_coverage(parts: ModelParts) -> None:
        covered = {id(p) for m in (parts.embed, parts.layers, parts.norm, parts.lm_head) for p in m.parameters()}
        stray = [n for n, p in parts.model.named_parameters() if id(p) not in covered]
        if stray:
            raise UnsupportedModelError(
                f"parameters outside embed/layers/norm/lm_head are not supported: {stray[:5]}"
            )

    @staticmethod
    def _check_dropout(cfg: Any) -> None:
        # Layers are recomputed in backward; random dropout would make the recompute differ.
        for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(cfg, key, 0.0) or 0.0
            if float(value) > 0.0:
                raise UnsupportedModelError(
                    f"config.{key}={value}: dropout is not supported (layers are recomputed in backward); "
                    f"set it to 0.0 in config.json"
                )

    def layer_calls(self, parts: ModelParts, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None) -> tuple[torch.Tensor, list[LayerCall]]:
        """Run the base model's preamble; return the first layer's input and every layer's arguments.

        ``inputs_embeds`` may require grad: the returned hidden state is then a function of it
        (e.g. Gemma's embedding normaliser), and the caller back-propagates through it.

        Without a mask and position ids (no padding, no packing) the layers' arguments depend only on the input's
        shape, dtype and device: the rotary tables and the causal mask (or None, for SDPA's causal kernel). They are
        kept for that key when the preamble passed the embeddings to the first layer as they came and no argument
        is a function of them, and later calls return them without running the preamble. Running it every step
        cost more than its small kernels: transformers' packed-sequence check reads a flag back from the device
        (``masking_utils.find_packed_sequence_indices``), a host sync before the forward's first kernel that left
        the GPU idle ~1.9 ms per step on the 3B headline (``timeline_..._s17gpu``).
        """
        key = None
        if attention_mask is None and position_ids is None:
            key = (tuple(inputs_embeds.shape), inputs_embeds.dtype, inputs_embeds.device)
            cached = parts.preamble_calls.get(key)
            if cached is not None:
                parts.preamble_calls.move_to_end(key)
                return inputs_embeds, cached
        sink: list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]] = []
        n = len(parts.layers)
        stubs = nn.ModuleList([_CaptureLayer(layer, sink, i == n - 1) for i, layer in enumerate(parts.layers)])
        real = parts.layers
        setattr(parts.base, self.layers_attr, stubs)
        try:
            parts.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False)
        except _StopPreamble:
            pass
        finally:
            setattr(parts.base, self.layers_attr, real)
        if len(sink) != n:
            raise UnsupportedModelError(
                f"{type(parts.base).__name__}.forward called {len(sink)} of {n} decoder layers; "
                "this architecture needs its own adapter"
            )
        first = sink[0][0]
        calls = [LayerCall(args, kwargs) for _, args, kwargs in sink]
        if key is not None and first is inputs_embeds and not any(
                t is inputs_embeds or t.requires_grad for c in calls for t in _tensors((c.args, c.kwargs))):
            parts.preamble_calls[key] = calls
            if len(parts.preamble_calls) > PREAMBLE_CACHE:
                parts.preamble_calls.popitem(last=False)
        return first, calls


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """Call one HF decoder layer with the arguments its model would pass."""
    out = layer(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out
