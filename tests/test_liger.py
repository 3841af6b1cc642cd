"""``engine.kernels``: Liger-Kernel's Triton RMSNorm / SwiGLU / RoPE on the model instance (kernels/liger.py).

CPU (CI, no triton): the option's validation and resolution; the patching logic with a fake
``liger_kernel`` put into ``sys.modules`` (fakes that compute HF's arithmetic and count their calls),
so what is checked is *which* modules get patched per family, that the patched forwards run where the
engine binds slot views (bitwise the torch run), and that nothing global changes.

GPU (``pytest -m gpu`` with liger-kernel): each real kernel against HF's torch module on odd shapes, in
FP32 and BF16 (outputs, input and weight gradients), and the engine trained with ``kernels='liger'``
against ``kernels='torch'`` within the ``gpu_bf16`` tolerances of test_gpu.py.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
import types
from collections import Counter
from typing import Any

import pytest
import torch
from tests.engine_ab import bf16_ab
from tests.reference import make_model, random_batch, rel, tiny_config
from tests.tolerances import TOLERANCES
from torch import nn

from slideformer import ConfigError, Engine, EngineConfig, OptimConfig
from slideformer.kernels import liger

# ---------------------------------------------------------------- CPU: validation and resolution


def test_unknown_kernels_value_rejected() -> None:
    with pytest.raises(ConfigError, match="engine.kernels must be torch, liger or auto"):
        EngineConfig(kernels="triton")  # type: ignore[arg-type]


def test_liger_without_cuda_or_packages_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # import -> ImportError, whatever is installed
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    cfg = tiny_config("llama", layers=2)
    with pytest.raises(ConfigError) as err:
        Engine(make_model(cfg), EngineConfig(device="cpu", kernels="liger"))
    text = str(err.value)
    for needle in ("a CUDA device", "'triton'", "'liger_kernel'", "pip install", "engine.kernels='torch'"):
        assert needle in text, (needle, text)


def test_auto_is_torch_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    cfg = tiny_config("llama", layers=2)
    with caplog.at_level(logging.INFO, logger="slideformer.kernels.liger"):
        engine = Engine(make_model(cfg), EngineConfig(device="cpu", kernels="auto"), OptimConfig(lr=1e-3))
    try:
        assert engine.kernels_patched == []
        assert "engine.kernels=auto: torch" in caplog.text
        engine.train_step(random_batch(cfg.vocab_size, 2, 16, torch.Generator().manual_seed(0)))
    finally:
        engine.close()


def test_unsupported_family(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="model_type llama, mistral, qwen2, qwen3; got 'gemma2'"):
        liger.resolve("liger", cpu, "gemma2")
    with caplog.at_level(logging.INFO, logger="slideformer.kernels.liger"):
        assert liger.resolve("auto", cpu, "gemma2") is False
    assert "engine.kernels=auto: torch" in caplog.text and "gemma2" in caplog.text
    assert liger.resolve("torch", cpu, "gemma2") is False


# ---------------------------------------------------------------- CPU: patching, with a fake liger_kernel


def _fake_liger(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Install a fake ``liger_kernel`` whose kernels are HF's torch arithmetic plus a call counter."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    calls: Counter[str] = Counter()

    def rms_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls["rms_norm"] += 1
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)

    def patch_rms_norm(module: nn.Module, offset: float = 0.0, eps: float = 1e-6, casting_mode: str = "llama",
                       in_place: bool = True, row_mode: Any = None) -> None:
        calls[f"in_place={in_place}"] += 1
        module.__dict__["forward"] = types.MethodType(rms_forward, module)

    class FakeSwiGLU(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls["swiglu"] += 1
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    def patch_swiglu(module: nn.Module, cls: type) -> None:
        module.__dict__["forward"] = types.MethodType(cls.forward, module)

    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: Any = None,
             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        calls["rope"] += 1
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    mods = {name: types.ModuleType(name) for name in (
        "triton", "liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch",
        "liger_kernel.transformers.rope", "liger_kernel.transformers.swiglu")}
    mods["liger_kernel.transformers.monkey_patch"]._patch_rms_norm_module = patch_rms_norm  # type: ignore[attr-defined]
    mods["liger_kernel.transformers.monkey_patch"]._patch_swiglu_module = patch_swiglu  # type: ignore[attr-defined]
    mods["liger_kernel.transformers.rope"].liger_rotary_pos_emb = rope  # type: ignore[attr-defined]
    mods["liger_kernel.transformers.swiglu"].LigerSwiGLUMLP = FakeSwiGLU  # type: ignore[attr-defined]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
def test_apply_patches_the_family_modules(monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    calls = _fake_liger(monkeypatch)
    cfg = tiny_config(family, layers=3)
    model = make_model(cfg)
    plain = copy.deepcopy(model)
    attn_cls = type(model.model.layers[0].self_attn)
    attn_module = sys.modules[attn_cls.__module__]
    class_forward, module_rope = attn_cls.forward, attn_module.apply_rotary_pos_emb

    patched = liger.apply(model, family)

    per_layer = ["input_layernorm", "post_attention_layernorm", "mlp", "self_attn.rope"]
    if family == "qwen3":
        per_layer += ["self_attn.q_norm", "self_attn.k_norm"]
    expected = {f"model.layers.{i}.{m}" for i in range(3) for m in per_layer} | {"model.norm"}
    assert set(patched) == expected and len(patched) == len(expected)
    norms = 2 * 3 + 1 + (2 * 3 if family == "qwen3" else 0)
    assert calls == Counter({"in_place=False": norms})  # never Liger's in-place backward

    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    out, ref = model(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert calls["rope"] == 3 and calls["swiglu"] == 3 and calls["rms_norm"] == norms
    # Nothing global: the class, the module function and a fresh model are untouched.
    assert attn_cls.forward is class_forward and attn_module.apply_rotary_pos_emb is module_rope
    assert "forward" not in plain.model.layers[0].self_attn.__dict__
    plain(input_ids=ids)
    assert calls["rope"] == 3


def test_engine_with_patched_layers_trains_bitwise_like_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The patched forwards read the slot views the engine binds: the fake-Liger run is the torch run."""
    calls = _fake_liger(monkeypatch)
    monkeypatch.setattr(liger, "missing", lambda device: [])  # the CPU plays the CUDA device
    cfg = tiny_config("qwen3", layers=3)
    base = make_model(cfg)
    runs = []
    for kernels in ("torch", "liger"):
        engine = Engine(copy.deepcopy(base), EngineConfig(device="cpu", window=2, chunk_mib=1 / 16,
                                                          loss_chunk_tokens=16, kernels=kernels),
                        OptimConfig(lr=1e-3, weight_decay=0.1))
        try:
            assert bool(engine.kernels_patched) == (kernels == "liger")
            gen = torch.Generator().manual_seed(4)
            losses = [engine.train_step(random_batch(cfg.vocab_size, 3, 13, gen)).loss for _ in range(3)]
            runs.append((losses, {k: v.clone() for k, v in engine.state_dict()["params"].items()}))
        finally:
            engine.close()
    assert calls["rope"] > 0 and calls["swiglu"] > 0 and calls["rms_norm"] > 0
    (l_torch, p_torch), (l_liger, p_liger) = runs
    assert l_torch == l_liger
    for name in p_torch:
        assert torch.equal(p_torch[name], p_liger[name]), name


def test_non_silu_mlp_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_liger(monkeypatch)
    cfg = tiny_config("llama", layers=1)
    cfg.hidden_act = "gelu"
    with pytest.raises(ConfigError, match="hidden_act silu"):
        liger.apply(make_model(cfg), "llama")


def test_rope_patch_refuses_a_forward_without_apply_rotary_pos_emb() -> None:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(ConfigError, match="does not call apply_rotary_pos_emb"):
        liger.with_globals(forward, {"apply_rotary_pos_emb": None})


# ---------------------------------------------------------------- GPU: the real kernels

_HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None
_NEEDS = pytest.mark.skipif(not (torch.cuda.is_available() and _HAS_LIGER),
                            reason="needs a CUDA GPU, triton and liger-kernel")


def gpu(fn: Any) -> Any:
    """Mark a test as a GPU test that also needs liger-kernel (deselected by default: -m 'not gpu')."""
    return pytest.mark.gpu(_NEEDS(fn))

KTOL = TOLERANCES["gpu_kernel"]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(200, 5, 1), (320, 10, 2)]  # hidden, heads, kv heads: head_dim 40 and 32; seq 37, batch 3
BATCH, SEQ = 3, 37


def _odd_config(family: str, hidden: int, heads: int, kv: int) -> Any:
    cfg = tiny_config(family, layers=1, hidden=hidden, vocab=512)
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv
    cfg.head_dim = hidden // heads
    cfg.intermediate_size = 3 * hidden + 7  # odd intermediate width too
    cfg._attn_implementation = "sdpa"
    return cfg


def _run(module: nn.Module, inputs: list[torch.Tensor], grads_out: list[torch.Tensor] | None,
         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs, and (given output gradients) the gradients of every input and parameter, in FP64."""
    xs = [x.detach().clone().requires_grad_(grads_out is not None) for x in inputs]
    module.zero_grad(set_to_none=True)
    out = module(*xs)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grads_out is None:
        return [o.detach().double() for o in outs], []
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out, strict=True)])
    params = [q for q in module.parameters() if q.requires_grad]
    return [o.detach().double() for o in outs], [t.grad.double() for t in (*xs, *params)]


def _check(name: str, make: Any, patch: Any, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Every output and input/parameter gradient of the Liger-patched module in ``dtype``: its error against
    the module run in FP64 is at most ``factor`` x the torch module's own error in ``dtype`` + a floor."""
    base = make().cuda()
    ref64 = copy.deepcopy(base).double()
    torch_mod = copy.deepcopy(base).to(dtype)
    liger_mod = copy.deepcopy(torch_mod)
    patch(liger_mod)
    with torch.no_grad():
        shapes = [o.shape for o in _run(torch_mod, [x.to(dtype) for x in inputs], None)[0]]
    gen = torch.Generator(device="cuda").manual_seed(1)
    grads = [torch.randn(s, generator=gen, device="cuda", dtype=torch.float64) for s in shapes]
    r_out, r_grad = _run(ref64, [x.double() for x in inputs], grads)
    t_out, t_grad = _run(torch_mod, [x.to(dtype) for x in inputs], grads)
    l_out, l_grad = _run(liger_mod, [x.to(dtype) for x in inputs], grads)
    floor = KTOL["floor_fp32" if dtype == torch.float32 else "floor_bf16"]
    labels = [f"out{i}" for i in range(len(r_out))] + [f"grad{i}" for i in range(len(r_grad))]
    for label, r, t, g in zip(labels, r_out + r_grad, t_out + t_grad, l_out + l_grad, strict=True):
        e_torch, e_liger = rel(t, r), rel(g, r)
        print(f"{name} {dtype} {label}: torch {e_torch:.2e} liger {e_liger:.2e}")
        assert e_liger <= KTOL["factor"] * e_torch + floor, (name, dtype, label, e_liger, e_torch)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,heads,kv", SHAPES)
def test_liger_rms_norm(hidden: int, heads: int, kv: int, dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def make() -> nn.Module:
        norm = LlamaRMSNorm(hidden, eps=1e-6)
        with torch.no_grad():
            norm.weight.add_(0.1 * torch.randn(hidden))
        return norm

    x = torch.randn(BATCH, SEQ, hidden, device="cuda") * 3
    _check("rms_norm", make, lambda m: liger.apply_to_norm(m, "norm"), [x], dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,heads,kv", SHAPES)
def test_liger_swiglu(hidden: int, heads: int, kv: int, dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = _odd_config("llama", hidden, heads, kv)
    _, patch_swiglu, swiglu_cls, _ = liger._liger()
    x = torch.randn(BATCH, SEQ, hidden, device="cuda")
    _check("swiglu", lambda: LlamaMLP(cfg), lambda m: patch_swiglu(m, swiglu_cls), [x], dtype)


class _Rope(nn.Module):
    """HF's (or, patched, Liger's) RoPE on q and k; cos/sin are buffers (cast with the module, no grad)."""

    def __init__(self, fn: Any, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> Any:
        return self.fn(q, k, self.cos, self.sin)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden,heads,kv", SHAPES)
def test_liger_rope(hidden: int, heads: int, kv: int, dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = _odd_config("llama", hidden, heads, kv)
    hd = hidden // heads
    # Rows start at different positions (packed / left-padded batches): cos/sin differ per row.
    pos = torch.arange(SEQ, device="cuda").unsqueeze(0) + torch.tensor([[0], [5], [60]], device="cuda")
    q = torch.randn(BATCH, SEQ, heads, hd, device="cuda").transpose(1, 2)  # HF's strided layout
    k = torch.randn(BATCH, SEQ, kv, hd, device="cuda").transpose(1, 2)
    cos, sin = LlamaRotaryEmbedding(cfg).cuda()(q, pos)
    rope = liger._liger()[3]

    def patch(m: nn.Module) -> None:
        m.fn = rope

    _check("rope", lambda: _Rope(apply_rotary_pos_emb, cos, sin), patch, [q, k], dtype)


@gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_attention_rope_patch(family: str, dtype: torch.dtype) -> None:
    """The instance-level RoPE patch inside a real attention module: x and q/k/v/o weight gradients."""
    cfg = _odd_config(family, 200, 5, 1)
    model = make_model(cfg)
    attn_cls, rotary_cls = type(model.model.layers[0].self_attn), type(model.model.rotary_emb)
    pos = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(BATCH, -1)
    x = torch.randn(BATCH, SEQ, 200, device="cuda")
    cos, sin = rotary_cls(cfg).cuda()(x, pos)
    rope = liger._liger()[3]

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn_cls(cfg, layer_idx=0)
            self.register_buffer("cos", cos)
            self.register_buffer("sin", sin)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.attn(h, position_embeddings=(self.cos, self.sin), attention_mask=None)[0]

    _check(f"attention[{family}]", Attn, lambda m: liger.patch_rope(m.attn, rope), [x], dtype)


@gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_liger_vs_torch(family: str) -> None:
    """4 steps, BF16: kernels='liger' against kernels='torch', within test_gpu.py's gpu_bf16 bounds."""
    def patched(name: str, engine: Engine) -> None:
        assert bool(engine.kernels_patched) == (name == "liger")

    bf16_ab(family, 2048, {"torch": {"kernels": "torch"}, "liger": {"kernels": "liger"}}, patched)
