"""The head's fused cross-entropy kernel (``kernels/cross_entropy.py``) against the torch path.

* CPU: the Triton kernel under Triton's interpreter (``TRITON_INTERPRET=1``, in a subprocess: the flag is read when
  the kernel is decorated), in FP32 on odd shapes with ignored rows, alone and inside ``linear_cross_entropy``
  (loss, the hidden states' and the weight's gradients). Skipped only where triton is not installed (the test
  extras install it). The interpreter rounds FP32 -> BF16 by truncation, unlike the GPU, so BF16 is checked on
  the GPU.
* CPU: ``engine.loss_kernel`` resolution and its errors.
* GPU: BF16 on the Llama-3 vocabulary and odd shapes (each gradient element within one BF16 unit of the torch
  path's), and the engine trained with ``loss_kernel='triton'`` against ``'torch'`` within test_gpu.py's bounds.
"""

from __future__ import annotations

import pytest
import torch
from tests.engine_ab import bf16_ab
from tests.reference import make_model, tiny_config
from tests.triton_interp import HAS_TRITON, NO_TRITON, run_interpreted

from slideformer import Engine, EngineConfig
from slideformer.errors import ConfigError
from slideformer.kernels import cross_entropy, reference

_INTERPRETED = r"""
import json, torch
from slideformer.kernels import cross_entropy as ce, reference as ref
torch.manual_seed(0)
out = []
for n, vocab in ((7, 5000), (5, 4096), (3, 4097), (4, 97)):
    z = torch.randn(n, vocab) * 4
    t = torch.randint(0, vocab, (n,))
    t[1] = -100
    a, b = z.clone(), z.clone()
    la, lb = float(ref.chunk_loss_grad(a, t, 0.37)), float(ce.loss_grad_(b, t, 0.37))
    out.append({"shape": [n, vocab], "loss": [la, lb], "grad_err": float((a - b).abs().max()),
                "grad_max": float(a.abs().max()), "ignored_row_zero": bool((b[1] == 0).all())})
x, w = torch.randn(21, 16), torch.randn(300, 16)
t = torch.randint(0, 300, (21,))
t[[0, 13]] = -100
res = {}
for name, fn in (("torch", None), ("kernel", ce.loss_grad_)):
    gw = torch.empty_like(w)
    loss, gx = ref.linear_cross_entropy(x, w, t, 1 / 19, gw, chunk_tokens=8, chunk_fn=fn)
    res[name] = (float(loss), gx, gw)
head = {"loss": [res["torch"][0], res["kernel"][0]],
        "gx_err": float((res["torch"][1] - res["kernel"][1]).abs().max()),
        "gw_err": float((res["torch"][2] - res["kernel"][2]).abs().max()),
        "gx_max": float(res["torch"][1].abs().max()), "gw_max": float(res["torch"][2].abs().max())}
print(json.dumps({"chunks": out, "head": head}))
"""


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_kernel_matches_the_torch_path_under_the_interpreter() -> None:
    got = run_interpreted(_INTERPRETED)
    for c in got["chunks"]:
        la, lb = c["loss"]
        assert abs(la - lb) <= 1e-6 * abs(la), c
        assert c["grad_err"] <= 1e-6 * c["grad_max"], c
        assert c["ignored_row_zero"], c
    h = got["head"]
    assert abs(h["loss"][0] - h["loss"][1]) <= 1e-6 * abs(h["loss"][0]), h
    assert h["gx_err"] <= 1e-5 * h["gx_max"] and h["gw_err"] <= 1e-5 * h["gw_max"], h


def test_loss_kernel_resolution_and_errors() -> None:
    assert cross_entropy.resolve("auto", "cpu", None) is None  # the torch path on the CPU
    assert cross_entropy.resolve("torch", "cuda", None) is None
    assert cross_entropy.resolve("triton", "cuda", 30.0) is None  # soft-capped heads stay on torch
    with pytest.raises(ConfigError, match="loss_kernel='triton' needs a CUDA device"):
        cross_entropy.resolve("triton", "cpu", None)
    with pytest.raises(ConfigError, match="engine.loss_kernel must be"):
        EngineConfig(loss_kernel="fast")
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        EngineConfig(loss_chunk_tokens=-1)
    assert cross_entropy.chunk_tokens(0, True) == 2048 and cross_entropy.chunk_tokens(0, False) == 512
    assert cross_entropy.chunk_tokens(300, True) == 300
    cfg = tiny_config("llama", layers=2, hidden=32, vocab=64)
    with pytest.raises(ConfigError, match="loss_kernel='triton'"):
        Engine(make_model(cfg), EngineConfig(device="cpu", loss_kernel="triton"))
    with Engine(make_model(cfg), EngineConfig(device="cpu")) as engine:
        assert engine.head_ce is None and engine.loss_chunk_tokens == 512


@pytest.mark.gpu
@pytest.mark.parametrize("n,vocab", [(2048, 128256), (37, 4097), (5, 2048), (3, 97)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_on_the_gpu(n: int, vocab: int, dtype: torch.dtype) -> None:
    if not (torch.cuda.is_available() and HAS_TRITON):
        pytest.skip("needs a CUDA GPU and triton")
    gen = torch.Generator(device="cuda").manual_seed(1)
    z = (torch.randn(n, vocab, device="cuda", generator=gen) * 4).to(dtype)
    t = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    t[1] = -100
    a, b = z.clone(), z.clone()
    scale = 1 / (n * 8 - 3)
    la, lb = float(reference.chunk_loss_grad(a, t, scale)), float(cross_entropy.loss_grad_(b, t, scale))
    assert abs(la - lb) <= 1e-5 * abs(la)
    assert bool((b[1] == 0).all())
    a32, b32 = a.float(), b.float()
    # BF16: one unit in the last place (relative to the larger of the two). FP32: Triton's exp is ex2.approx after a
    # multiply by log2(e), ~1e-6 relative at the arguments near -20 that a 128,256-way softmax has (measured on the
    # H100: up to 5.6e-6), where torch's expf is within an ulp.
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -15)
    bound = ulp * torch.maximum(a32.abs(), b32.abs()) + 1e-30
    assert bool(((a32 - b32).abs() <= bound).all()), float(((a32 - b32).abs() / bound).max())
    if dtype == torch.bfloat16:
        assert float((a != b).float().mean()) < 0.01  # one rounding apart only at rounding boundaries


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_engine_triton_loss_vs_torch_loss(family: str) -> None:
    """4 steps, BF16: loss_kernel='triton' against 'torch', within test_gpu.py's gpu_bf16 bounds."""
    if not (torch.cuda.is_available() and HAS_TRITON):
        pytest.skip("needs a CUDA GPU and triton")

    def kernel(name: str, engine: Engine) -> None:
        assert (engine.head_ce is not None) == (name == "triton")

    bf16_ab(family, 5003, {k: {"loss_kernel": k, "loss_chunk_tokens": 40} for k in ("torch", "triton")}, kernel)
