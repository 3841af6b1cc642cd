"""Row-wise CPU AdamW (``optim/cpu_adam_rows.py``) against one ``adamw_step`` over the whole matrix.

The split embedding update calls ``adamw_skip_rows`` on chunks of the matrix (chunk edges inside rows) and
``adamw_rows`` on the batch's rows from a compact gradient; together they must equal one whole-matrix step
bitwise: master, both moments and the BF16 copy (written with non-temporal stores, as the engine does), for
FP32 and BF16 gradients, with weight decay and gradient scaling, in the C++ kernel (one and several threads)
and in the torch fallback. Bad inputs are refused before any memory is touched.
"""

from __future__ import annotations

import pytest
import torch

from slideformer.optim import cpu_adam_rows
from slideformer.optim.cpu_adam import CpuAdamInputError, adamw_step, extension_available
from slideformer.optim.cpu_adam_rows import adamw_rows, adamw_skip_rows

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def _state(total: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(total, generator=gen)
    m = torch.randn(total, generator=gen) * 0.1
    v = torch.rand(total, generator=gen) * 0.01
    return [p, m, v, torch.empty(total, dtype=torch.bfloat16)]


def _split_step(state, grad, rows, row_len, chunk, *, copy: bool, **kw) -> None:
    """The split path: every chunk with the rows skipped, then the rows from their compact gradient."""
    p, m, v, o = state
    total = p.numel()
    for lo in range(0, total, chunk):
        hi = min(lo + chunk, total)
        adamw_skip_rows(p[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi], base=lo, row_len=row_len, skip=rows,
                        out=o[lo:hi] if copy else None, stream_out=copy, **kw)
    compact = grad.view(-1, row_len)[rows].reshape(-1).contiguous()
    for lo in range(0, compact.numel(), 16):
        hi = min(lo + 16, compact.numel())
        adamw_rows(p, compact[lo:hi], m, v, lo=lo, row_len=row_len, rows=rows, out=o if copy else None,
                   stream_out=copy, **kw)


@pytest.mark.parametrize("backend", ["extension", "fallback"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 24, 40), (300, 1024, 65536 + 8)])  # rows, row_len, optimizer chunk
def test_skip_then_rows_equals_one_whole_step(backend, grad_dtype, shape, monkeypatch) -> None:
    if backend == "extension" and not extension_available():
        pytest.skip("C++ CPU AdamW unavailable")
    if backend == "fallback":
        monkeypatch.setattr(cpu_adam_rows, "_kernel_ran", lambda *args: False)
    n_rows, row_len, chunk = shape
    total = n_rows * row_len
    rows = torch.unique(torch.randint(0, n_rows, (n_rows // 3,), generator=torch.Generator().manual_seed(1)))
    grad = torch.randn(total, generator=torch.Generator().manual_seed(2)).to(grad_dtype)
    for copy in (True, False):
        whole, split = _state(total, 3), _state(total, 3)
        for step, wd, scale in ((1, 0.0, 1.0), (3, 0.1, 0.5)):
            kw = dict(step=step, weight_decay=wd, grad_scale=scale, **HP)
            adamw_step(whole[0], grad, whole[1], whole[2], out=whole[3] if copy else None, **kw)
            _split_step(split, grad, rows, row_len, chunk, copy=copy, **kw)
        for a, b, name in zip(whole, split, ("master", "exp_avg", "exp_avg_sq", "copy")):
            if name != "copy" or copy:
                assert torch.equal(a, b), (name, copy)


@pytest.mark.parametrize("backend", ["extension", "fallback"])
def test_bad_inputs_are_refused_before_anything_is_written(backend, monkeypatch) -> None:
    """Row ids are checked by the kernel itself (no allocation on the optimizer thread) or by the fallback."""
    if backend == "extension" and not extension_available():
        pytest.skip("C++ CPU AdamW unavailable")
    if backend == "fallback":
        monkeypatch.setattr(cpu_adam_rows, "_kernel_ran", lambda *args: False)
    p, m, v, _ = _state(64, 0)
    before = p.clone()
    g = torch.zeros(64)
    kw = dict(step=1, weight_decay=0.0, **HP)
    with pytest.raises(CpuAdamInputError, match="sorted, distinct"):
        adamw_skip_rows(p, g, m, v, base=0, row_len=8, skip=torch.tensor([3, 1]), **kw)
    with pytest.raises(CpuAdamInputError, match="multiple of 8"):
        adamw_skip_rows(p[:60], g[:60], m[:60], v[:60], base=0, row_len=12, skip=torch.tensor([1]), **kw)
    with pytest.raises(CpuAdamInputError, match=r"in \[0, 8\)"):
        adamw_rows(p, g[:8], m, v, lo=0, row_len=8, rows=torch.tensor([2, 8]), **kw)
    with pytest.raises(CpuAdamInputError, match="outside 1 compact rows"):
        adamw_rows(p, g[:16], m, v, lo=0, row_len=8, rows=torch.tensor([2]), **kw)
    with pytest.raises(CpuAdamInputError, match="int64"):
        adamw_rows(p, g[:8], m, v, lo=0, row_len=8, rows=torch.tensor([2], dtype=torch.int32), **kw)
    assert torch.equal(p, before)
