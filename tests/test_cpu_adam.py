"""The host AdamW step (``slideformer.optim.cpu_adam``) against torch's own AdamW.

The references run beside each check: ``torch._fused_adamw_`` on ``grad.float() * grad_scale`` (the
arithmetic both paths promise, bitwise where torch runs its AVX2/AVX-512 kernels) and
``torch.optim.AdamW`` (the semantics, within ``TOL``). The first test that needs the C++ kernel
builds it into the user cache (1.5-3.5 s on 2 cores), later runs load it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from slideformer.optim import cpu_adam
from slideformer.optim.cpu_adam import CpuAdamInputError, adamw_step, build_info, extension_available

# Tolerances, by comparison: (rtol, atol). Bitwise comparisons use torch.equal and are not listed.
TOL = {
    "fused_default_capability": (1e-5, 1e-9),  # torch's non-SIMD kernel rounds without FMA
    "optim_adamw_single_tensor": (2e-6, 1e-9),  # torch.optim.AdamW(foreach=False): other op order
}
HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
BITWISE = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
SIZES = [1, 7, 8, 15, 16, 33, 1000, 4099, 65536 + 13]


@pytest.fixture(scope="module")
def ext() -> None:
    if not extension_available():
        pytest.skip(f"C++ CPU AdamW unavailable: {build_info()['reason']}")


def _state(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, generator=gen),
        torch.randn(n, generator=gen) * 1e-3,
        torch.rand(n, generator=gen) * 1e-5,
    )


def _grad(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(n, generator=gen) * 1e-2).to(dtype)


def _fused(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    step: int,
    grad_scale: float,
    **hp: float,
) -> None:
    g32 = g.float() * grad_scale if grad_scale != 1.0 else g.float()
    torch._fused_adamw_([p], [g32], [m], [v], [], [torch.tensor(float(step))], amsgrad=False, maximize=False, **hp)


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor], bitwise: bool = BITWISE) -> None:
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        if bitwise:
            assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {a.numel()} elements differ"
        else:
            rtol, atol = TOL["fused_default_capability"]
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_fused_adamw(ext: None, n: int, grad_dtype: torch.dtype) -> None:
    p, m, v = _state(n, n)
    ours, ref = [p.clone(), m.clone(), v.clone()], [p.clone(), m.clone(), v.clone()]
    for step, (wd, scale) in enumerate([(0.0, 1.0), (0.1, 0.37), (0.1, 1.0)], start=1):
        g = _grad(n, step, grad_dtype)
        g_before = g.clone()
        adamw_step(ours[0], g, ours[1], ours[2], step=step, weight_decay=wd, grad_scale=scale, **HP)
        _fused(ref[0], g, ref[1], ref[2], step=step, weight_decay=wd, grad_scale=scale, **HP)
        assert torch.equal(g, g_before), "the gradient must not be modified"
        _assert_same(ours, ref)


@pytest.mark.parametrize("betas", [(0.3, 0.95), (0.0, 0.0), (0.99, 0.9999)])
def test_other_betas(ext: None, betas: tuple[float, float]) -> None:
    """beta1 < 0.5 takes torch's other lerp branch; beta2 = 0 and beta1 = 0 are edge cases."""
    n = 515
    p, m, v = _state(n, 3)
    ours, ref = [p.clone(), m.clone(), v.clone()], [p.clone(), m.clone(), v.clone()]
    hp = {**HP, "beta1": betas[0], "beta2": betas[1], "weight_decay": 0.01}
    for step in (1, 2, 10):
        g = _grad(n, step, torch.bfloat16)
        adamw_step(ours[0], g, ours[1], ours[2], step=step, **hp)
        _fused(ref[0], g, ref[1], ref[2], step=step, grad_scale=1.0, **hp)
        _assert_same(ours, ref)


def test_matches_torch_optim_adamw() -> None:
    """Five steps of the default path against torch.optim.AdamW on a parameter with its .grad."""
    n = 3001
    p0, _, _ = _state(n, 5)
    ref_p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref_p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    for step in range(1, 6):
        g = _grad(n, step, torch.bfloat16)
        ref_p.grad = g.float() * 0.5
        opt.step()
        adamw_step(p, g, m, v, step=step, weight_decay=0.1, grad_scale=0.5, **HP)
    rtol, atol = TOL["optim_adamw_single_tensor"]
    torch.testing.assert_close(p, ref_p.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(m, opt.state[ref_p]["exp_avg"], rtol=rtol, atol=atol)
    torch.testing.assert_close(v, opt.state[ref_p]["exp_avg_sq"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stream_out", [False, True])
@pytest.mark.parametrize("n", [1, 31, 1024 + 17, 70_001])
def test_out_is_param_cast(ext: None, out_dtype: torch.dtype, stream_out: bool, n: int) -> None:
    p, m, v = _state(n, 7)
    backing = torch.full((n + 1,), 7.0, dtype=out_dtype)
    out = backing[1:]  # a slice whose start is not 32-byte aligned
    adamw_step(p, _grad(n, 1, torch.bfloat16), m, v, step=1, weight_decay=0.0, out=out, stream_out=stream_out, **HP)
    assert torch.equal(out, p.to(out_dtype))
    assert backing[0].item() == 7.0, "wrote outside out"


@pytest.mark.parametrize("offset", [1, 5, 15, 16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_misaligned_copy_keeps_arithmetic(ext: None, offset: int, grad_dtype: torch.dtype) -> None:
    """A copy buffer that starts off a 32-byte boundary makes the vector kernel run its first elements
    through the scalar body (until the copy's stores align): every element must still match torch."""
    n = 3 * 65536 + 21
    p, m, v = _state(n, 9)
    g = _grad(n, 2, grad_dtype)
    ref = [p.clone(), m.clone(), v.clone()]
    _fused(*ref[:1], g, *ref[1:], step=3, grad_scale=0.5, weight_decay=0.1, **HP)
    backing = torch.full((n + offset + 1,), 3.0, dtype=torch.bfloat16)
    out = backing[offset:offset + n]
    adamw_step(p, g, m, v, step=3, grad_scale=0.5, weight_decay=0.1, out=out, stream_out=True, num_threads=2, **HP)
    _assert_same([p, m, v], ref)
    assert torch.equal(out, p.to(torch.bfloat16))
    assert (backing[:offset] == 3.0).all() and backing[-1].item() == 3.0, "wrote outside out"


def test_threads_do_not_change_results(ext: None) -> None:
    n = 4 * 32768 + 5  # large enough that the kernel really splits it over threads
    p, m, v = _state(n, 11)
    runs = []
    for threads in (1, 2, 3):
        s = [p.clone(), m.clone(), v.clone()]
        out = torch.empty(n, dtype=torch.bfloat16)
        adamw_step(
            s[0],
            _grad(n, 1, torch.bfloat16),
            s[1],
            s[2],
            step=4,
            weight_decay=0.1,
            out=out,
            num_threads=threads,
            **HP,
        )
        runs.append([*s, out])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_fallback_equals_extension(ext: None) -> None:
    n = 20_011
    p, m, v = _state(n, 13)
    g = _grad(n, 1, torch.bfloat16)
    a = [p.clone(), m.clone(), v.clone(), torch.empty(n, dtype=torch.bfloat16)]
    b = [p.clone(), m.clone(), v.clone(), torch.empty(n, dtype=torch.bfloat16)]
    kw = {"step": 2, "weight_decay": 0.05, "grad_scale": 0.8, **HP}
    adamw_step(a[0], g, a[1], a[2], out=a[3], **kw)
    cpu_adam._torch_step(b[0], g, b[1], b[2], out=b[3], scratch=torch.empty(n + 100), **kw)
    _assert_same(a[:3], b[:3])
    assert torch.equal(a[3], a[0].to(torch.bfloat16)) and torch.equal(b[3], b[0].to(torch.bfloat16))
    if BITWISE:
        assert torch.equal(a[3], b[3])


def test_fallback_matches_fused_and_grad_untouched() -> None:
    n = 4099
    p, m, v = _state(n, 17)
    g = _grad(n, 1, torch.float32)
    g_before = g.clone()
    a, b = [p.clone(), m.clone(), v.clone()], [p.clone(), m.clone(), v.clone()]
    cpu_adam._torch_step(a[0], g, a[1], a[2], step=3, weight_decay=0.1, grad_scale=0.25, out=None, scratch=None, **HP)
    _fused(b[0], g, b[1], b[2], step=3, weight_decay=0.1, grad_scale=0.25, **HP)
    assert torch.equal(g, g_before)
    _assert_same(a, b, bitwise=True)  # the fallback *is* the fused kernel


def test_gil_is_released(ext: None) -> None:
    """The main thread keeps running Python while a worker thread is inside the kernel.

    With the GIL held, this loop would stall for each whole call (~10-50 ms; measured: stalled ~60% of
    the window through ctypes.PyDLL, ~10% through the GIL-releasing CDLL on a loaded 2-core box).
    """
    n = 1 << 24
    p, m, v = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    g = torch.ones(n, dtype=torch.bfloat16)
    adamw_step(p, g, m, v, step=1, weight_decay=0.0, num_threads=1, **HP)  # touch the pages first
    window: list[float] = []

    def work() -> None:
        window.append(time.perf_counter())
        for step in range(2, 7):
            adamw_step(p, g, m, v, step=step, weight_decay=0.0, num_threads=1, **HP)
        window.append(time.perf_counter())

    ticks = [time.perf_counter()]
    worker = threading.Thread(target=work)
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    start, end = window
    inside = [start, *(t for t in ticks if start < t < end), end]
    stalled = sum(b - a for a, b in zip(inside, inside[1:]) if b - a > 0.005)
    assert stalled < 0.35 * (end - start), (stalled, end - start)


def test_empty_is_noop() -> None:
    e = torch.empty(0)
    adamw_step(e, e, e, e, step=1, weight_decay=0.0, **HP)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"param": torch.zeros(16)[::2]}, "param must be contiguous"),
        ({"grad": torch.zeros(16)[::2]}, "grad must be contiguous"),
        ({"exp_avg": torch.zeros(2, 4).t()}, "exp_avg must be contiguous"),
        ({"grad": torch.zeros(8, dtype=torch.float64)}, "grad must be float32, bfloat16, float16"),
        ({"param": torch.zeros(8, dtype=torch.bfloat16)}, "param must be float32"),
        ({"exp_avg_sq": torch.zeros(9)}, "exp_avg_sq has 9 elements, param has 8"),
        ({"out": torch.zeros(8)}, "out must be bfloat16, float16"),
        ({"out": torch.zeros(7, dtype=torch.bfloat16)}, "out has 7 elements"),
        ({"grad": [0.0] * 8}, "grad must be a torch.Tensor"),
        ({"step": 0}, "step must be an int >= 1"),
        ({"step": 1.0}, "step must be an int >= 1"),
        ({"num_threads": 0}, "num_threads must be >= 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(change: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "param": torch.zeros(8),
        "grad": torch.zeros(8),
        "exp_avg": torch.zeros(8),
        "exp_avg_sq": torch.zeros(8),
        "step": 1,
        "weight_decay": 0.0,
        **HP,
        **change,
    }
    before = torch.zeros(8)
    with pytest.raises(CpuAdamInputError, match=message):
        adamw_step(**args)  # type: ignore[arg-type]
    assert isinstance(CpuAdamInputError("x"), ValueError)
    assert torch.equal(before, torch.zeros(8))


def test_extension_builds_where_it_can() -> None:
    """With a compiler and ninja present, the build must succeed (a silent fallback would hide it)."""
    info = build_info()
    if info["backend"] == "torch":
        assert not str(info["reason"]).startswith("build failed"), info["reason"]
    else:
        assert info["simd"] is not None and info["path"]


def test_missing_ninja_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    monkeypatch.delenv("SLIDEFORMER_NO_EXT", raising=False)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(cpu_adam.shutil, "which", lambda _: "/usr/bin/c++")
    loader = cpu_adam._Loader()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loader.get() is None
        assert loader.get() is None
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    text = str(caught[0].message)
    assert "ninja" in text and "1.5x slower" in text
    assert loader.reason == "ninja not found (pip install ninja)"


def test_cache_key_follows_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    key = cpu_adam._cache_key("c++")
    monkeypatch.setattr(cpu_adam, "_cpu_flags", lambda: "sse2 only")
    assert cpu_adam._cache_key("c++") != key


def test_no_ext_env_forces_fallback_silently() -> None:
    code = (
        "import warnings; warnings.simplefilter('error');"
        "from slideformer.optim.cpu_adam import build_info, adamw_step; import torch;"
        "t = torch.zeros(5); adamw_step(t, t.clone(), t.clone(), t.clone(), step=1, lr=1e-3, beta1=0.9,"
        " beta2=0.999, eps=1e-8, weight_decay=0.0); print(build_info()['backend'])"
    )
    src = str(Path(cpu_adam.__file__).resolve().parents[2])
    path = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "SLIDEFORMER_NO_EXT": "1", "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch"
