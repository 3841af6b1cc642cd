"""Row-wise CPU AdamW for the split embedding update (``runtime/embedding_split.py``).

``adamw_skip_rows`` updates a range of a row-major ``[rows, row_len]`` matrix except the rows listed (the
batch's rows, whose gradient is not complete yet); ``adamw_rows`` then updates exactly those rows, in place,
from a compact gradient (one row per listed id). Both run the C++ kernel of ``cpu_adam`` (its row-wise entry
points), or, without it, torch fallbacks on ``cpu_adam._torch_step`` that gather and scatter (slower, and
allocating: only where the extension cannot be built).

Invariant: over one matrix, ``adamw_skip_rows`` on every range and ``adamw_rows`` on the listed rows are, element
for element, one ``adamw_step`` over the whole matrix. Every length is a multiple of ``TAIL_WIDTH`` (checked), so
every element takes the same arithmetic wherever it sits in a call, and the row ids are sorted and distinct
(checked), so no element is updated twice or left out. Inputs are validated before any memory is touched.
"""

from __future__ import annotations

import torch

from slideformer.optim.cpu_adam import (
    _GRAD_CODES,
    _LOADER,
    _OUT_CODES,
    TAIL_WIDTH,
    CpuAdamInputError,
    _check,
    _Kernel,
    _torch_step,
)

__all__ = ["adamw_rows", "adamw_skip_rows"]

_NO_LIMIT = (1 << 63) - 1
"""Skipped row ids need no upper bound: rows past the range are simply not in it."""


def _check_ids(name: str, ids: object) -> torch.Tensor:
    """Type and layout of a row-id list; its values are checked where they are used (the kernel scans them without
    allocating, on the optimizer thread's hot path; the fallback by ``_ids_valid``)."""
    if not isinstance(ids, torch.Tensor) or ids.device.type != "cpu" or ids.dtype != torch.int64:
        raise CpuAdamInputError(f"{name} must be an int64 CPU tensor")
    if ids.dim() != 1 or not ids.is_contiguous():
        raise CpuAdamInputError(f"{name} must be one contiguous dimension, got shape {tuple(ids.shape)}")
    return ids


def _bad_ids(name: str, limit: int) -> CpuAdamInputError:
    return CpuAdamInputError(f"{name} must be sorted, distinct row ids in [0, {limit})")


def _ids_valid(ids: torch.Tensor, limit: int) -> bool:
    return not ids.numel() or (int(ids[0]) >= 0 and int(ids[-1]) < limit and bool((ids[1:] > ids[:-1]).all()))


def _check_width(**lengths: int) -> None:
    for name, n in lengths.items():
        if n % TAIL_WIDTH:
            raise CpuAdamInputError(f"{name} ({n}) must be a multiple of {TAIL_WIDTH}, the kernel's vector width: "
                                    "otherwise an element's rounding depends on where it sits in a call")


def _kernel_ran(entry: str, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor | None, geometry: tuple[int, ...], hp: list[float], num_threads: int | None,
                stream_out: bool, ids: tuple[str, int]) -> bool:
    """Run the C++ kernel's ``entry`` (``skip_rows`` or ``rows``); False when the fallback must run instead.
    ``ids``: the row-id argument's name and bound, for the error when the kernel finds them invalid."""
    kernel: _Kernel | None = _LOADER.get()
    if kernel is None or (not kernel.has_fp16 and torch.float16 in (g.dtype, getattr(out, "dtype", None))):
        return False
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    o_ptr, o_code = (None, -1) if out is None else (out.data_ptr(), _OUT_CODES[out.dtype])
    rc = getattr(kernel, entry)(p.data_ptr(), g.data_ptr(), _GRAD_CODES[g.dtype], m.data_ptr(), v.data_ptr(), o_ptr,
                                o_code, *geometry, *hp, threads, int(stream_out))  # fmt: skip
    if rc == -2:  # the row ids failed the kernel's check; nothing was written
        raise _bad_ids(*ids)
    if rc < 0:  # the kernel lacks a dtype this Python accepted: a build/version mismatch
        raise CpuAdamInputError(f"{entry}: the C++ kernel rejected {g.dtype} -> {o_code}")
    return True


def _hp(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
        grad_scale: float) -> list[float]:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise CpuAdamInputError(f"step must be an int >= 1 (already incremented), got {step!r}")
    return [float(x) for x in (lr, beta1, beta2, eps, weight_decay, step, grad_scale)]


def adamw_skip_rows(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                    base: int, row_len: int, skip: torch.Tensor, step: int, lr: float, beta1: float, beta2: float,
                    eps: float, weight_decay: float, grad_scale: float = 1.0, out: torch.Tensor | None = None,
                    num_threads: int | None = None, stream_out: bool = False) -> None:
    """AdamW over ``param`` etc. (``n`` elements: elements ``[base, base + n)`` of a row-major matrix with rows of
    ``row_len``), leaving every element of the rows in ``skip`` (sorted, distinct, whole-matrix row ids) as it
    was. Arguments otherwise as ``cpu_adam.adamw_step`` (``stream_out``: non-temporal stores for ``out``)."""
    n = param.numel() if isinstance(param, torch.Tensor) else -1
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check(name, t, {torch.float32: 0}, n)
    _check("grad", grad, _GRAD_CODES, n)
    if out is not None:
        _check("out", out, _OUT_CODES, n)
    _check_width(n=n, base=base, row_len=row_len)
    _check_ids("skip", skip)
    hp = _hp(step, lr, beta1, beta2, eps, weight_decay, grad_scale)
    if n == 0 or _kernel_ran("skip_rows", param, grad, exp_avg, exp_avg_sq, out,
                             (n, base, row_len, skip.data_ptr(), skip.numel()), hp, num_threads, stream_out,
                             ("skip", _NO_LIMIT)):
        return
    if not _ids_valid(skip, _NO_LIMIT):
        raise _bad_ids("skip", _NO_LIMIT)
    # Fallback: the whole range, then the skipped rows' elements put back as they were.
    inside = skip[(skip >= base // row_len) & (skip <= (base + n - 1) // row_len)]
    idx = (inside[:, None] * row_len + torch.arange(row_len) - base).reshape(-1)
    idx = idx[(idx >= 0) & (idx < n)]
    kept = [t.view(-1)[idx] for t in (param, exp_avg, exp_avg_sq, out) if t is not None]
    _torch_step(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, grad_scale=grad_scale, out=out, scratch=None)
    for t, k in zip([t for t in (param, exp_avg, exp_avg_sq, out) if t is not None], kept):
        t.view(-1)[idx] = k


def adamw_rows(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               lo: int, row_len: int, rows: torch.Tensor, step: int, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, grad_scale: float = 1.0, out: torch.Tensor | None = None,
               num_threads: int | None = None, stream_out: bool = False) -> None:
    """AdamW in place on rows ``rows`` (sorted, distinct) of the flat row-major matrices ``master``, ``exp_avg``,
    ``exp_avg_sq`` (and ``out``), from ``grad``: elements ``[lo, lo + n)`` of a compact gradient whose row ``i``
    belongs to matrix row ``rows[i]``."""
    total = master.numel() if isinstance(master, torch.Tensor) else -1
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check(name, t, {torch.float32: 0}, total)
    n = grad.numel() if isinstance(grad, torch.Tensor) else -1
    _check("grad", grad, _GRAD_CODES, n)
    if out is not None:
        _check("out", out, _OUT_CODES, total)
    _check_width(lo=lo, n=n, row_len=row_len)
    if row_len <= 0 or total % row_len:
        raise CpuAdamInputError(f"adamw_rows: {total} elements are not rows of {row_len}")
    _check_ids("rows", rows)
    if lo < 0 or lo + n > rows.numel() * row_len:
        raise CpuAdamInputError(f"adamw_rows: elements [{lo}, {lo + n}) are outside {rows.numel()} compact rows")
    hp = _hp(step, lr, beta1, beta2, eps, weight_decay, grad_scale)
    limit = total // row_len
    if n == 0 or _kernel_ran("rows", master, grad, exp_avg, exp_avg_sq, out,
                             (lo, n, row_len, rows.data_ptr(), rows.numel(), limit), hp, num_threads, stream_out,
                             ("rows", limit)):
        return
    if not _ids_valid(rows, limit):
        raise _bad_ids("rows", limit)
    # Fallback: gather the rows' elements, one step over them, scatter back.
    e = torch.arange(lo, lo + n)
    idx = rows[e // row_len] * row_len + e % row_len
    p, m, v = (t.view(-1)[idx] for t in (master, exp_avg, exp_avg_sq))
    o = None if out is None else torch.empty(n, dtype=out.dtype)
    _torch_step(p, grad.view(-1), m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, grad_scale=grad_scale, out=o, scratch=None)
    for t, src in ((master, p), (exp_avg, m), (exp_avg_sq, v), (out, o)):
        if t is not None:
            t.view(-1)[idx] = src
