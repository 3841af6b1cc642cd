"""The no-offload per-layer "peak": the same layers' compute on the GPU alone, nothing streamed.

The paper's definition (``bench/peak_tflops_test.py`` in its repo): embedding forward and backward,
ONE decoder layer run L times (forward without saving activations, then recompute and backward,
as under full activation checkpointing), and the head (final norm + a chunked linear
cross-entropy, so the ``[tokens, vocab]`` logits never exist whole), all in BF16 on the GPU with
SDPA attention. The head is the engine's own (``head_loss``): the same kernel and chunking as
``engine.loss_kernel`` and ``engine.loss_chunk_tokens`` at their defaults, in one pass over token chunks: the
engine's two-pass head (``engine.head_schedule='vocab'``) does more GPU work to start the host's earlier, so the GPU
alone is fastest with one pass, and that is the ceiling. It is the workload-specific ceiling
every offloading system is measured against, and the GPU-compute term of the roofline.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import common
import shapes
from slideformer.kernels import cross_entropy
from slideformer.kernels.reference import linear_cross_entropy, shift_labels


def _first(out: Any) -> torch.Tensor:
    """HF decoder layers return a tensor (transformers >= 5) or a tuple whose first item is it."""
    return out[0] if isinstance(out, tuple | list) else out


LOSS_KERNEL = "auto"
"""The head's softmax pass, as the engine's default ``engine.loss_kernel``: the fused Triton kernel on CUDA (the
engine's own head, ``kernels.reference.linear_cross_entropy``), so the GPU term runs the engine's kernels."""


def loss_chunking(device: torch.device) -> tuple[Any, int]:
    """``(chunk_fn, tokens per chunk)`` of the head on ``device``: the engine's defaults (``engine.loss_kernel`` and
    ``engine.loss_chunk_tokens``)."""
    chunk_fn = cross_entropy.resolve(LOSS_KERNEL, device.type, None)
    return chunk_fn, cross_entropy.chunk_tokens(0, chunk_fn is not None)


def head_desc(device: torch.device) -> str:
    """The head's kernel and chunk, for a benchmark's JSON."""
    chunk_fn, chunk = loss_chunking(device)
    return f"{'fused Triton' if chunk_fn is not None else 'torch autograd'} loss, {chunk}-token chunks"


def head_loss(hidden: torch.Tensor, norm: torch.nn.Module, weight: torch.Tensor, grad_weight: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``norm(hidden) @ weight.T``, forward AND backward, as the engine's head.

    ``hidden`` [B, S, h] must be a leaf that requires grad: its gradient (and the norm's) is accumulated here;
    ``weight``'s goes into ``grad_weight``. The loss runs chunk by chunk (``loss_chunking``), so the
    ``[tokens, vocab]`` logits never exist whole. Returns the detached loss.
    """
    h = hidden.shape[-1]
    y = shift_labels(labels).reshape(-1)
    n_valid = int((y != -100).sum())
    chunk_fn, chunk = loss_chunking(hidden.device)
    with torch.enable_grad():
        xn = norm(hidden)
    loss, dxn = linear_cross_entropy(xn.detach().view(-1, h), weight.detach(), y, 1.0 / n_valid, grad_weight,
                                     chunk, None, chunk_fn)
    xn.backward(dxn.view_as(xn))
    return loss


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
            self.head_grad = torch.empty_like(self.head)  # the head's weight gradient, as the engine's vocab slot
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
        loss = head_loss(h, self.norm, self.head, self.head_grad, labels)
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
