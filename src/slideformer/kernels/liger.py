"""Liger-Kernel's Triton kernels on an HF model *instance*: RMSNorm, SwiGLU MLP and RoPE (``engine.kernels``).

Owns the decision whether Liger is used (``resolve``: CUDA + triton + liger_kernel, else the torch path
or a ConfigError) and the patching itself (``apply`` on a whole causal LM, ``apply_to_layer`` /
``apply_to_norm`` on loose modules, as the benchmarks' per-layer peak holds them).

Invariant: only instances change. Each patched module gets an instance-level ``forward`` that reads its
own ``self.weight`` / ``self.gate_proj`` ... at call time, so the engine's rebinding of parameters to
device-slot views keeps working; no module-level function or class of ``transformers`` is rebound, so
other models in the process (a reference model in a test, another system in a benchmark) stay on the
torch path.

Which Liger API, and why:

* RMSNorm and SwiGLU use Liger's own instance helpers ``_patch_rms_norm_module`` /
  ``_patch_swiglu_module(module, LigerSwiGLUMLP)`` (what ``apply_liger_kernel_to_llama(model=...)`` calls
  per module, so the attributes Liger's ``forward`` expects stay Liger's business). The public
  ``apply_liger_kernel_to_<family>(model=...)`` is not used: besides the instances it rebinds
  ``modeling_<family>.apply_rotary_pos_emb``, the RMSNorm and MLP *classes* and the causal LM's forward
  (fused linear cross-entropy) for the whole process.
* RMSNorm runs with ``in_place=False``: Liger's default writes the input gradient into the incoming output
  gradient's buffer; the final norm's output gradient is the engine's own head buffer, and the cost of not
  aliasing is one ``[tokens, hidden]`` temporary per norm backward.
* RoPE: Liger has no instance-level RoPE helper (it swaps the module global). Here the attention
  instance gets a copy of its class's ``forward`` (HF's code, decorators kept) whose global namespace
  resolves ``apply_rotary_pos_emb`` to Liger's ``liger_rotary_pos_emb``; the copy is bound to that
  instance only. If HF's forward stops calling ``apply_rotary_pos_emb`` the patch refuses to load.
* The LM head is *not* Liger's fused linear cross-entropy: it stays on ``kernels.reference
  .linear_cross_entropy``, whose loss is HF's arithmetic (FP32 logits, exact log-softmax). Liger's FLCE
  has known fidelity issues (linkedin/Liger-Kernel#512: loss diverging where torch's CE does not; #968:
  wrong gradients with ``reduction='none'``; by default (``accum_dtype=None``) the head-weight gradient is
  accumulated across token chunks in the weight's BF16), and our head must write the streamed head
  weight's gradient into a given buffer in the same chunked pass, which the engine's vocab slot relies on.
"""

from __future__ import annotations

import importlib
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slideformer.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose decoder layers are Llama-style (RMSNorm, SiLU-gated MLP, ``apply_rotary_pos_emb``).
Qwen3 also has per-head ``q_norm`` / ``k_norm`` RMSNorms, patched too. Gemma (GEGLU, offset norms) and
Phi-3 (fused gate_up, partial rotary) are left on torch until their Liger variants are tested here."""

INSTALL_HINT = "pip install 'slideformer[gpu]' (liger-kernel, which brings triton) on a CUDA machine"
ROPE_GLOBAL = "apply_rotary_pos_emb"
_SWIGLU_ACTS = ("silu", "swish")


def missing(device: torch.device) -> list[str]:
    """What keeps Liger's kernels from running on ``device`` (empty: they can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"a CUDA device (engine device is {device.type!r}"
                       f"{'' if torch.cuda.is_available() else '; no CUDA GPU is visible'})")
    for mod in ("triton", "liger_kernel"):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # ImportError, or a broken install raising something else
            reasons.append(f"the {mod!r} package ({type(exc).__name__}: {exc})")
    return reasons


def would_load(device: torch.device, model_type: str) -> bool:
    """Whether ``engine.kernels='auto'`` takes Liger for ``model_type`` on ``device`` (``resolve``'s rule, without
    its log lines: the planner asks it for each plan)."""
    return model_type in SUPPORTED_MODEL_TYPES and not missing(device)


def resolve(choice: str, device: torch.device, model_type: str) -> bool:
    """Whether ``engine.kernels=choice`` means Liger for ``model_type`` on ``device``.

    'torch': no. 'liger': yes, or a ConfigError naming what is missing / the supported families.
    'auto': yes when everything is there, else no (with a log line saying why).
    """
    if choice == "torch":
        return False
    if choice not in ("liger", "auto"):
        raise ConfigError(f"engine.kernels must be torch, liger or auto, got {choice!r}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        why = (f"Liger kernels are wired for model_type {', '.join(SUPPORTED_MODEL_TYPES)}; "
               f"got {model_type!r}")
        if choice == "liger":
            raise ConfigError(f"engine.kernels='liger': {why}; use engine.kernels='torch'")
        logger.info("engine.kernels=auto: torch (%s)", why)
        return False
    lacking = missing(device)
    if lacking:
        if choice == "liger":
            raise ConfigError("engine.kernels='liger' needs " + " and ".join(lacking)
                              + f"; install with {INSTALL_HINT}, or use engine.kernels='torch'")
        logger.info("engine.kernels=auto: torch (no %s)", ", no ".join(lacking))
        return False
    logger.info("engine.kernels=auto: liger (CUDA, triton and liger_kernel present)")
    return True


def _liger() -> tuple[Callable[..., None], Callable[..., None], type, Callable[..., Any]]:
    """Liger's instance helpers and kernels (imported late: they need triton)."""
    try:
        from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError as exc:
        raise ConfigError(f"engine.kernels='liger': this liger-kernel lacks what slideformer uses ({exc}); "
                          f"tested with liger-kernel 0.8.5: {INSTALL_HINT}") from exc
    return _patch_rms_norm_module, _patch_swiglu_module, LigerSwiGLUMLP, liger_rotary_pos_emb


def with_globals(fn: Callable[..., Any], overrides: dict[str, Any]) -> Callable[..., Any]:
    """A copy of ``fn`` (and of the functions it wraps, ``functools.wraps`` chains) whose innermost code
    looks its globals up in a private copy of its module namespace updated with ``overrides``.

    Raises ConfigError when the innermost function does not read every overridden name as a global
    (the patch would silently do nothing) or a wrapper does not hold the function it wraps in a closure.
    """
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        if not isinstance(fn, types.FunctionType):
            raise ConfigError(f"cannot patch {fn!r}: not a Python function")
        unused = [k for k in overrides if k not in fn.__code__.co_names]
        if unused:
            raise ConfigError(f"{fn.__qualname__} does not call {', '.join(unused)}: this transformers "
                              "version needs slideformer's Liger patch updated (use engine.kernels='torch')")
        namespace = dict(fn.__globals__)
        namespace.update(overrides)
        new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    else:
        new_inner = with_globals(inner, overrides)
        if not isinstance(fn, types.FunctionType):
            raise ConfigError(f"cannot patch {fn!r}: the wrapper is not a Python function")
        cells = fn.__closure__ or ()
        hits = [i for i, c in enumerate(cells) if c.cell_contents is inner]
        if len(hits) != 1:
            raise ConfigError(f"cannot patch {fn.__qualname__}: its wrapper does not hold the wrapped function "
                              "in one closure cell")
        closure = tuple(types.CellType(new_inner) if i == hits[0] else c for i, c in enumerate(cells))
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, closure)
        new.__wrapped__ = new_inner  # type: ignore[attr-defined]
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    new.__dict__.update({k: v for k, v in fn.__dict__.items() if k != "__wrapped__"})
    return new


def patch_rope(attn: nn.Module, rope: Callable[..., Any]) -> None:
    """Bind to ``attn`` a copy of its class's forward that applies RoPE with ``rope``."""
    forward = with_globals(type(attn).forward, {ROPE_GLOBAL: rope})
    attn.__dict__["forward"] = types.MethodType(forward, attn)


def apply_to_norm(norm: nn.Module, name: str) -> list[str]:
    """Patch one RMSNorm instance; returns ``[name]``."""
    patch_rms_norm, _, _, _ = _liger()
    if getattr(norm, "weight", None) is None:
        raise ConfigError(f"{name} ({type(norm).__name__}) has no weight: not an RMSNorm Liger can run")
    patch_rms_norm(norm, in_place=False)
    return [name]


def apply_to_layer(layer: nn.Module, model_type: str, config: Any, prefix: str = "") -> list[str]:
    """Patch one decoder layer's norms, MLP and RoPE; returns the dotted names of what was patched."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"Liger kernels are wired for model_type {', '.join(SUPPORTED_MODEL_TYPES)}; "
                          f"got {model_type!r}")
    _, patch_swiglu, swiglu_cls, rope = _liger()
    act = getattr(config, "hidden_act", None)
    if act not in _SWIGLU_ACTS:
        raise ConfigError(f"Liger's SwiGLU needs hidden_act silu, {model_type} config has {act!r}; "
                          "use engine.kernels='torch'")
    done: list[str] = []
    for attr in ("input_layernorm", "post_attention_layernorm"):
        done += apply_to_norm(getattr(layer, attr), prefix + attr)
    attn = layer.self_attn
    if model_type == "qwen3":
        for attr in ("q_norm", "k_norm"):
            done += apply_to_norm(getattr(attn, attr), f"{prefix}self_attn.{attr}")
    patch_swiglu(layer.mlp, swiglu_cls)
    done.append(prefix + "mlp")
    patch_rope(attn, rope)
    done.append(prefix + "self_attn.rope")
    return done


def apply(model: nn.Module, model_type: str) -> list[str]:
    """Patch every decoder layer and the final norm of an HF causal LM (``model.model.{layers,norm}``)."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ConfigError(f"{type(model).__name__} has no .model.layers / .model.norm to patch with Liger")
    cfg = model.config
    done: list[str] = []
    for i, layer in enumerate(base.layers):
        done += apply_to_layer(layer, model_type, cfg, f"model.layers.{i}.")
    done += apply_to_norm(base.norm, "model.norm")
    return done
