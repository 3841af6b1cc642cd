"""The no-offload per-layer "peak": the same layers' compute on the GPU alone, nothing streamed.

The paper's definition (``bench/peak_tflops_test.py`` in its repo): embedding forward and backward,
ONE decoder layer run L times (forward without saving activations, then recompute and backward,
as under full activation checkpointing), and the head (final norm + a chunked linear
cross-entropy, so the ``[tokens, vocab]`` logits never exist whole), all in BF16 on the GPU with
SDPA attention. It is the workload-specific ceiling every offloading system is measured against,
and the GPU-compute term of the roofline.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import common
import shapes

LOSS_CHUNK_TOKENS = 2048
"""Tokens per chunk of the head's linear cross-entropy (as ``EngineConfig.loss_chunk_tokens``)."""


def _first(out: Any) -> torch.Tensor:
    """HF decoder layers return a tensor (transformers >= 5) or a tuple whose first item is it."""
    return out[0] if isinstance(out, tuple | list) else out


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, norm: torch.nn.Module, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``norm(hidden) @ weight.T``, forward AND backward, chunk by chunk.

    ``hidden`` [B, S, h] must be a leaf that requires grad: its gradient (and ``weight``'s) is
    accumulated here, one chunk's logits at a time. Logits are upcast to FP32 for the loss, as HF
    does. Returns the detached loss.
    """
    h = hidden.shape[-1]
    x = hidden.view(-1, h)
    targets = labels.roll(-1, dims=1)
    targets[:, -1] = -100  # the last position has no next token
    y = targets.reshape(-1)
    n_valid = int((y != -100).sum())
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for start in range(0, x.shape[0], chunk_tokens):
        xc = x[start : start + chunk_tokens]
        logits = norm(xc) @ weight.t()
        loss = F.cross_entropy(logits.float(), y[start : start + chunk_tokens], ignore_index=-100, reduction="sum")
        loss = loss / n_valid
        loss.backward()
        total += loss.detach()
    return total


class PeakModel:
    """Embedding, one decoder layer, final norm and LM head of shape ``model_name``, in BF16 on ``device``."""

    def __init__(self, model_name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 kernels: str = "torch") -> None:
        cfg = shapes.hf_config(model_name)
        meta = shapes.build_model(model_name, device="meta", dtype=dtype)
        layer_cls = type(meta.model.layers[0])
        norm_cls = type(meta.model.norm)
        rotary_cls = type(meta.model.rotary_emb)
        del meta
        self.num_layers = cfg.num_hidden_layers
        self.vocab_size = cfg.vocab_size
        self.device = device
        with torch.device(device):
            self.layer = layer_cls(cfg, layer_idx=0).to(dtype)
            self.norm = norm_cls(cfg.hidden_size, eps=cfg.rms_norm_eps).to(dtype)
            self.rotary = rotary_cls(config=cfg)
            self.embedding = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=dtype) * 0.02)
            self.head = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=dtype) * 0.02)
        self.layer.train()
        self.kernels_patched = common.apply_kernels(kernels, device, str(cfg.model_type), layers=[self.layer],
                                                    norms=[self.norm], config=cfg)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.layer.parameters(), *self.norm.parameters(), self.embedding, self.head]

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One checkpointed training step's compute (no optimizer): returns the loss."""
        ids, labels = batch["input_ids"], batch["labels"]
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        emb_out = F.embedding(ids, self.embedding)
        h = emb_out.detach()
        with torch.no_grad():
            pos_emb = self.rotary(h, positions)
            saved: list[torch.Tensor] = []
            for _ in range(self.num_layers):  # forward, keeping only each layer's input
                saved.append(h)
                h = _first(self.layer(h, attention_mask=None, position_embeddings=pos_emb))
        h = h.requires_grad_()
        loss = chunked_linear_cross_entropy(h, self.norm, self.head, labels, LOSS_CHUNK_TOKENS)
        grad = h.grad
        for x in reversed(saved):  # recompute + backward, last layer first
            x = x.detach().requires_grad_()
            out = _first(self.layer(x, attention_mask=None, position_embeddings=pos_emb))
            out.backward(grad)
            grad = x.grad
        emb_out.backward(grad)
        for p in self.parameters():
            p.grad = None
        return loss
