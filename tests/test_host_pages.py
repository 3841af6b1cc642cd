"""``engine.host_pages``: the large host buffers on 2 MiB transparent huge pages (``memory/host_pages.py``).

* ``huge_empty``: exactly the asked size and dtype, contiguous, zeroed, starting on a 2 MiB boundary, advised for
  huge pages (the kernel's own ``THPeligible`` flag for that mapping, where its policy allows them), alive as long as
  a view of it is.
* ``thp_mode`` reads the kernel's policy file.
* The engine: with 'huge' every unit's flat buffer and upload copy is such a buffer, and training is bitwise that of
  'small' (losses, every parameter and moment), tied and untied, overlap and deferred schedules; 'auto' follows the
  kernel's policy; a bad value is a ConfigError.
* GPU: a huge-page buffer page-locked in place carries copies both ways bitwise, and the engine on CUDA trains
  bitwise the same with either pages.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config

from slideformer import ConfigError, Engine, EngineConfig, OptimConfig
from slideformer.memory import host_pages
from slideformer.memory.host_pages import HUGE_PAGE, huge_empty, thp_mode
from slideformer.runtime import build


def _smaps_field(addr: int, field: str) -> str | None:
    """The ``field`` of the mapping holding ``addr`` in /proc/self/smaps (None: not found)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return None


@pytest.mark.parametrize("numel, dtype", [(1, torch.float32), (3, torch.bfloat16), (HUGE_PAGE // 4 + 5, torch.float32),
                                          (0, torch.float32)])
def test_huge_empty_is_an_aligned_zeroed_buffer(numel: int, dtype: torch.dtype) -> None:
    t = huge_empty(numel, dtype)
    assert t.shape == (numel,) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    if numel:
        assert t.data_ptr() % HUGE_PAGE == 0
        assert torch.count_nonzero(t) == 0
        t.fill_(1.5)
        assert float(t.float().sum()) == 1.5 * numel


def test_a_view_keeps_the_mapping_alive() -> None:
    t = huge_empty(HUGE_PAGE, torch.float32)
    t.copy_(torch.arange(HUGE_PAGE, dtype=torch.float32))
    tail = t[-4:]
    del t
    gc.collect()
    huge_empty(HUGE_PAGE, torch.float32).fill_(7.0)  # would reuse freed pages
    assert tail.tolist() == [float(HUGE_PAGE - k) for k in range(4, 0, -1)]


@pytest.mark.skipif(not host_pages.huge_pages_available() or not Path("/proc/self/smaps").exists(),
                    reason="the kernel offers no transparent huge pages here")
def test_the_buffer_is_advised_for_huge_pages() -> None:
    t = huge_empty(4 * HUGE_PAGE // 4, torch.float32).fill_(1.0)
    assert _smaps_field(t.data_ptr(), "THPeligible") == "1"
    # torch's own allocation of the same size is eligible only where the policy is 'always'.
    plain = torch.empty(4 * HUGE_PAGE // 4, dtype=torch.float32).fill_(1.0)
    assert _smaps_field(plain.data_ptr(), "THPeligible") == ("1" if thp_mode() == "always" else "0")


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                                        ("always madvise [never]", "never"), ("garbled", "unavailable")])
def test_thp_mode_reads_the_policy(tmp_path: Path, text: str, mode: str) -> None:
    f = tmp_path / "enabled"
    f.write_text(text)
    assert thp_mode(f) == mode
    assert thp_mode(tmp_path / "missing") == "unavailable"


def test_config_and_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="host_pages"):
        EngineConfig(host_pages="giant")
    assert build.host_alloc(EngineConfig(host_pages="small")) is None
    assert build.host_alloc(EngineConfig(host_pages="huge")) is huge_empty
    for offered, expected in ((True, huge_empty), (False, None)):
        monkeypatch.setattr(host_pages, "huge_pages_available", lambda offered=offered: offered)
        assert build.host_alloc(EngineConfig(host_pages="auto")) is expected


def _train(family: str, device: str, pages: str, max_norm: float | None = None,
           **kw: object) -> tuple[list[float], dict]:
    """Three BF16 steps of a tiny ``family`` model with ``engine.host_pages=pages``: (losses, state)."""
    cfg = tiny_config(family, layers=3)
    engine = Engine(make_model(cfg),
                    EngineConfig(device=device, compute_dtype="bfloat16", host_pages=pages, chunk_mib=1 / 64,
                                 loss_chunk_tokens=16, **kw),
                    OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=max_norm))
    gen = torch.Generator().manual_seed(3)
    try:
        if pages == "huge":
            for u in engine.units:
                assert u.flat.data_ptr() % HUGE_PAGE == 0, u.name
                if u.upload_copy is not None:
                    assert u.upload_copy.data_ptr() % HUGE_PAGE == 0, u.name
        losses = [engine.train_step(random_batch(cfg.vocab_size, 2, 13, gen)).loss for _ in range(3)]
        sd = engine.state_dict()
        state = {part: {k: v.clone() for k, v in sd[part].items()} for part in ("params", "exp_avg", "exp_avg_sq")}
    finally:
        engine.close()
    return losses, state


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0]
    for part in a[1]:
        for name, t in a[1][part].items():
            assert torch.equal(t, b[1][part][name]), (part, name)


@pytest.mark.parametrize("family, opts", [
    ("llama", {}),
    ("qwen2", {"host_copy": "bf16"}),
    ("llama", {"schedule": "deferred", "max_norm": 0.5}),
])
def test_engine_trains_bitwise_the_same_on_huge_pages(family: str, opts: dict) -> None:
    _assert_same(_train(family, "cpu", "small", **opts), _train(family, "cpu", "huge", **opts))


@pytest.mark.gpu
def test_gpu_copies_from_a_page_locked_huge_buffer() -> None:
    n = 3 * HUGE_PAGE // 2 + 7
    host = huge_empty(n, torch.bfloat16).copy_(torch.randn(n).to(torch.bfloat16))
    assert int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), n * 2, 0)) == 0
    try:
        dev = torch.empty(n, dtype=torch.bfloat16, device="cuda")
        dev.copy_(host, non_blocking=True)
        back = huge_empty(n, torch.bfloat16)
        back.copy_(dev * 2)
        torch.cuda.synchronize()  # the test reads the copies' results on the host
        assert torch.equal(back, host * 2)
    finally:
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [{}, {"host_copy": "bf16"}])
def test_gpu_engine_trains_bitwise_the_same_on_huge_pages(opts: dict) -> None:
    _assert_same(_train("llama", "cuda", "small", **opts), _train("llama", "cuda", "huge", **opts))
