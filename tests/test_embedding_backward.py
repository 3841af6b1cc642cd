"""The embedding backward's per-row sums (``runtime/step.rows_grad``): each distinct row of a micro-batch gets its
tokens' input gradients summed, as the reference ``nn.Embedding`` backward sums them.

* CPU: against autograd through ``F.embedding`` (the reference's backward), in FP32 and BF16, with one token repeated
  400 times and a padding row masked out; the error when a micro-batch has no rows.
* GPU: the same against FP32 sums rounded once, through both of CUDA's kernels; bitwise the same on every call
  (``index_add_`` on CUDA, which the engine used before, adds with atomics in BF16 in no fixed order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slideformer.runtime.batch import prepare_batch
from slideformer.runtime.step import rows_grad


def _case(device: str, dtype: torch.dtype, hidden: int = 96, seq: int = 160) -> tuple:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (4, seq), generator=gen)
    ids.view(-1)[::2] = 7  # one token 2 x seq times, next to ~50 others a few times each
    (mb,) = prepare_batch({"input_ids": ids, "labels": ids}, 64, None, torch.device(device), rows=True)
    dx = torch.randn(ids.numel(), hidden, generator=gen).to(device, dtype)
    return mb, dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_grad_is_the_reference_embedding_backward_at_the_rows(dtype: torch.dtype) -> None:
    mb, dx = _case("cpu", dtype)
    weight = torch.zeros(64, dx.shape[1], dtype=dtype, requires_grad=True)
    (ref,) = torch.autograd.grad(F.embedding(mb.ids.view(-1), weight), weight, dx)
    got = rows_grad(mb, dx)
    assert got.dtype == dtype and got.shape == (mb.rows.numel(), dx.shape[1])
    assert torch.equal(got, ref[mb.rows])
    assert not ref[~torch.isin(torch.arange(64), mb.rows)].any()  # (the other rows have nothing to add)


def test_rows_grad_needs_the_rows() -> None:
    mb, dx = _case("cpu", torch.float32)
    mb.rows = None
    with pytest.raises(RuntimeError, match="prepare_batch\\(rows=True\\)"):
        rows_grad(mb, dx)


@pytest.mark.gpu
# CUDA's kernel for up to 3,072 indices (rounds once per 32-token chunk: rows_grad sums an FP32 copy there; 0.52% for
# the repeated row in BF16 without it, on the H100), and its sorting one above (FP32 segment sums)
@pytest.mark.parametrize("seq", [160, 1024])
def test_rows_grad_on_cuda_sums_in_fp32_once_and_the_same_every_time(seq: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mb, dx = _case("cuda", torch.bfloat16, seq=seq)
    got = rows_grad(mb, dx)
    for _ in range(5):
        assert torch.equal(rows_grad(mb, dx), got)
    exact = torch.zeros(mb.rows.numel(), dx.shape[1], device="cuda").index_add_(0, mb.row_of, dx.float())
    # FP32 sums (in another order), then one rounding: ~0.2% per row as a norm (CPU: 0.16-0.18% for 2-400 tokens),
    # where BF16 adds token by token drift to ~2.4% at 400.
    err = (got.float() - exact).norm(dim=1) / exact.norm(dim=1)
    assert err.max() < 0.004, err.max()
