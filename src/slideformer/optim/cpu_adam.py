"""The host AdamW step over one flat FP32 buffer: a C++/OpenMP kernel, or a pure-torch fallback.

``adamw_step`` reads the gradient (FP32, BF16 or FP16), updates the FP32 master weights and both
FP32 moments in place and, when ``out`` is given, writes the updated weights in BF16/FP16 (the next
upload copy) in the same pass over memory. The C++ kernel (``cpu_adam.cpp``, ``cpu_adam_rows.cpp`` and
their ``cpu_adam_core.h``) is built on first use
on the machine that runs it (``-march=native``) and cached under ``$SLIDEFORMER_CACHE`` (default
``~/.cache/slideformer``) in a directory keyed by a hash of the source, the flags, the compiler,
torch, Python and the CPU's feature flags, so a cache copied to another machine is never reused.
Without ninja or a compiler, when the build fails, or with ``SLIDEFORMER_NO_EXT=1``, the fallback
runs ``torch._fused_adamw_`` with separate cast passes (one warning says why and what it costs).

Invariant: both paths are ``torch.optim.AdamW`` with torch's CPU fused arithmetic: on CPUs where
torch runs its AVX2/AVX-512 kernels the result is bitwise that of ``torch._fused_adamw_`` applied
to ``grad.float() * grad_scale``, and ``out`` is bitwise ``param.to(out.dtype)``. Inputs are
validated here (device, dtype, size, contiguity) before any memory is touched. The kernel is called
through ctypes, which releases the GIL (as torch's ops in the fallback do), so a worker thread can
run it while the main thread drives the GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from slideformer.errors import SlideformerError

__all__ = ["CpuAdamInputError", "adamw_step", "build_info", "extension_available"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_adam.cpp")
_SOURCES = (_SOURCE, _SOURCE.with_name("cpu_adam_rows.cpp"))
_KERNEL_FILES = (*_SOURCES, _SOURCE.with_name("cpu_adam_core.h"))
"""Everything the library is built from (the two sources include the core header): all of it keys the cache."""
_CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-DNDEBUG",
)
_LDFLAGS = ("-fopenmp",)
TAIL_WIDTH = 8
"""A call's last ``n % TAIL_WIDTH`` elements take torch's scalar-tail arithmetic (the second moment contracted
the other way, ``cpu_adam.cpp``), so an element's result can depend on where it sits in a call; calls whose
lengths are multiples of this give every element the same arithmetic."""
_GRAD_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OUT_CODES = {torch.bfloat16: 1, torch.float16: 2}
_FALLBACK_COST = (
    "the fallback makes separate cast passes (about 46 instead of 30 bytes of memory "
    "traffic per parameter), so the bandwidth-bound host optimizer runs about 1.5x slower"
)


class CpuAdamInputError(SlideformerError, ValueError):
    """A tensor handed to ``adamw_step`` has the wrong device, dtype, size or layout."""


class _Kernel:
    """The built library's C entry points (ctypes releases the GIL for every call)."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        c = ctypes
        self.step = lib.slideformer_adamw_step
        self.step.argtypes = [c.c_void_p, c.c_void_p, c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int,
                              c.c_int64, *([c.c_double] * 7), c.c_int, c.c_int]  # fmt: skip
        self.step.restype = c.c_int
        hp = [*([c.c_double] * 7), c.c_int, c.c_int]  # lr, betas, eps, wd, step, grad_scale; threads, stream_out
        self.skip_rows = lib.slideformer_adamw_skip_rows  # cpu_adam_rows.adamw_skip_rows
        self.skip_rows.argtypes = [c.c_void_p, c.c_void_p, c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int,
                                   c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, *hp]  # fmt: skip
        self.skip_rows.restype = c.c_int
        self.rows = lib.slideformer_adamw_rows  # cpu_adam_rows.adamw_rows
        self.rows.argtypes = [c.c_void_p, c.c_void_p, c.c_int, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int,
                              c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_int64, *hp]  # fmt: skip
        self.rows.restype = c.c_int
        lib.slideformer_simd.restype = c.c_char_p
        self.simd: str = lib.slideformer_simd().decode().strip()
        self.has_fp16 = bool(lib.slideformer_has_fp16())
        self.max_threads = int(lib.slideformer_max_threads())


class _Loader:
    """Builds or loads the extension once per process (thread-safe) and remembers why it could not."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tried = False
        self.kernel: _Kernel | None = None
        self.reason: str | None = None
        self.info: dict[str, Any] = {}

    def get(self) -> _Kernel | None:
        if self.tried:
            return self.kernel
        with self.lock:
            if not self.tried:
                self.kernel = self._load()
                self.tried = True
        return self.kernel

    def _load(self) -> _Kernel | None:
        if os.environ.get("SLIDEFORMER_NO_EXT", "") not in ("", "0"):
            self.reason = "disabled by SLIDEFORMER_NO_EXT"
            return None
        from torch.utils import cpp_extension

        cxx = os.environ.get("CXX", "c++")
        why = None
        missing = [f.name for f in _KERNEL_FILES if not f.is_file()]
        if missing:
            why = f"kernel source {', '.join(missing)} missing from the install (package data)"
        elif shutil.which(cxx) is None:
            why = f"no C++ compiler ({cxx!r} not on PATH; install g++ or set CXX)"
        elif not cpp_extension.is_ninja_available():
            why = "ninja not found (pip install ninja)"
        if why is None:
            key = _cache_key(cxx)
            name = f"slideformer_cpu_adam_{key[:16]}"
            build_dir = _cache_root() / "cpu_adam" / key[:16]
            cached = (build_dir / f"{name}.so").exists()
            t0 = time.perf_counter()
            try:
                build_dir.mkdir(parents=True, exist_ok=True)
                path = cpp_extension.load(
                    name,
                    [str(f) for f in _SOURCES],
                    extra_cflags=list(_CFLAGS),
                    extra_ldflags=list(_LDFLAGS),
                    build_directory=str(build_dir),
                    verbose=False,
                    is_python_module=False,
                )
                kernel = _Kernel(path if isinstance(path, str) else str(build_dir / f"{name}.so"))
            except Exception as exc:  # any build or import failure means: use the fallback
                logger.debug("cpu_adam build failed", exc_info=True)
                text = str(exc).splitlines() or [""]
                lines = [ln for ln in text if "error:" in ln] or [ln for ln in text if "rror" in ln] or text
                why = f"build failed: {type(exc).__name__}: {lines[0][:300]}"
            else:
                seconds = time.perf_counter() - t0
                self.info = {
                    "path": str(build_dir),
                    "cached": cached,
                    "load_seconds": round(seconds, 3),
                    "simd": kernel.simd,
                    "has_fp16": kernel.has_fp16,
                    "omp_max_threads": kernel.max_threads,
                }
                logger.info(
                    "cpu_adam extension %s in %.1f s (%s)",
                    "loaded" if cached else "built",
                    seconds,
                    build_dir,
                )
                return kernel
        self.reason = why
        warnings.warn(
            f"slideformer: the C++ CPU AdamW is unavailable ({why}); using the pure-torch "
            f"fallback: {_FALLBACK_COST}. Set SLIDEFORMER_NO_EXT=1 to choose the fallback "
            "without this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


_LOADER = _Loader()
_STEP = threading.local()


def _cache_root() -> Path:
    env = os.environ.get("SLIDEFORMER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slideformer"


def _cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler_id(cxx: str) -> str:
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
        return res.stdout.splitlines()[0] if res.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def _cache_key(cxx: str) -> str:
    h = hashlib.sha256()
    for f in _KERNEL_FILES:
        h.update(f.read_bytes() + b"\0")
    for part in (
        " ".join(_CFLAGS + _LDFLAGS),
        _compiler_id(cxx),
        torch.__version__,
        f"{sys.version_info[0]}.{sys.version_info[1]}",
        platform.machine(),
        _cpu_flags(),
    ):
        h.update(b"\0" + part.encode())
    return h.hexdigest()


def extension_available() -> bool:
    """Whether the C++ kernel runs; the first call builds it (seconds) or loads it from the cache."""
    return _LOADER.get() is not None


def build_info() -> dict[str, Any]:
    """How ``adamw_step`` runs here: backend, why not the extension, build directory, SIMD, timings."""
    kernel = _LOADER.get()
    return {
        "backend": "extension" if kernel is not None else "torch",
        "reason": _LOADER.reason,
        "cflags": list(_CFLAGS),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **_LOADER.info,
    }


def _check(name: str, t: object, dtypes: dict[torch.dtype, int], n: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise CpuAdamInputError(f"adamw_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise CpuAdamInputError(f"adamw_step: {name} must live on the CPU, got {t.device}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CpuAdamInputError(f"adamw_step: {name} must be {allowed}, got {t.dtype}")
    if t.numel() != n:
        raise CpuAdamInputError(f"adamw_step: {name} has {t.numel()} elements, param has {n}")
    if not t.is_contiguous():
        raise CpuAdamInputError(
            f"adamw_step: {name} must be contiguous (a flat buffer or a slice of one); "
            f"got shape {tuple(t.shape)} with strides {t.stride()}"
        )
    return t


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
    num_threads: int | None = None,
    scratch: torch.Tensor | None = None,
    stream_out: bool = False,
) -> None:
    """One AdamW step over flat CPU buffers, in place (``torch.optim.AdamW`` semantics).

    ``param``, ``exp_avg``, ``exp_avg_sq``: FP32, contiguous, ``n`` elements. ``grad``: FP32, BF16 or
    FP16, ``n`` elements, multiplied by ``grad_scale`` (the clipping coefficient) before use and never
    modified. ``step``: the step count, already incremented (>= 1). ``out``: optional BF16/FP16 buffer
    (may be pinned) that receives the updated ``param`` cast. ``num_threads``: OpenMP threads of the
    C++ kernel (default ``torch.get_num_threads()``); the fallback uses torch's intra-op pool.
    ``scratch``: optional FP32 buffer of >= ``n`` elements the fallback casts the gradient into
    (otherwise it allocates one when the gradient is not FP32 or ``grad_scale != 1``).
    ``stream_out``: write ``out`` with non-temporal stores (the C++ kernel on x86 with AVX2): it skips
    reading the copy buffer into the cache before overwriting it (2 of ~30 bytes per parameter);
    whether that is faster depends on the machine (``benchmarks/bench_cpu_adam.py`` measures both).
    """
    n = param.numel() if isinstance(param, torch.Tensor) else -1
    _check("param", param, {torch.float32: 0}, n)
    _check("grad", grad, _GRAD_CODES, n)
    _check("exp_avg", exp_avg, {torch.float32: 0}, n)
    _check("exp_avg_sq", exp_avg_sq, {torch.float32: 0}, n)
    if out is not None:
        _check("out", out, _OUT_CODES, n)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise CpuAdamInputError(f"adamw_step: step must be an int >= 1 (already incremented), got {step!r}")
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise CpuAdamInputError(f"adamw_step: num_threads must be >= 1, got {num_threads}")
    if n == 0:
        return
    kernel = _LOADER.get()
    if kernel is not None and (kernel.has_fp16 or torch.float16 not in (grad.dtype, getattr(out, "dtype", None))):
        o_ptr, o_code = (None, -1) if out is None else (out.data_ptr(), _OUT_CODES[out.dtype])
        hp = map(float, (lr, beta1, beta2, eps, weight_decay, step, grad_scale))
        rc = kernel.step(param.data_ptr(), grad.data_ptr(), _GRAD_CODES[grad.dtype], exp_avg.data_ptr(),
                         exp_avg_sq.data_ptr(), o_ptr, o_code, n, *hp, threads, int(stream_out))  # fmt: skip
        if rc < 0:  # the kernel lacks a dtype this Python accepted: a build/version mismatch
            raise CpuAdamInputError(f"adamw_step: the C++ kernel rejected {grad.dtype} -> {o_code}")
        return
    _torch_step(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        step=step,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        grad_scale=grad_scale,
        out=out,
        scratch=scratch,
    )


def _torch_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: float,
    out: torch.Tensor | None,
    scratch: torch.Tensor | None,
) -> None:
    """The fallback: cast (and scale) the gradient into FP32, ``_fused_adamw_``, cast the copy out."""
    n = param.numel()
    g = grad.view(-1)
    if grad.dtype != torch.float32 or grad_scale != 1.0:
        if scratch is not None:
            _check("scratch", scratch, {torch.float32: 0}, scratch.numel())
            if scratch.numel() < n:
                raise CpuAdamInputError(f"adamw_step: scratch has {scratch.numel()} elements, needs {n}")
            buf = scratch.view(-1)[:n]
        else:
            buf = torch.empty(n, dtype=torch.float32)
        if g.dtype == torch.float32:
            torch.mul(g, grad_scale, out=buf)  # FP32 * f32(grad_scale), as the C++ kernel
        else:
            buf.copy_(g)
            if grad_scale != 1.0:
                buf.mul_(grad_scale)
        g = buf
    step_t: torch.Tensor | None = getattr(_STEP, "tensor", None)
    if step_t is None:
        step_t = _STEP.tensor = torch.zeros((), dtype=torch.float32)
    step_t.fill_(float(step))
    with torch.no_grad():
        torch._fused_adamw_(
            [param.view(-1)],
            [g],
            [exp_avg.view(-1)],
            [exp_avg_sq.view(-1)],
            [],
            [step_t],
            lr=float(lr),
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=float(weight_decay),
            eps=float(eps),
            amsgrad=False,
            maximize=False,
        )
        if out is not None:
            out.view(-1).copy_(param.view(-1))
