"""Probe (session 12): can a Triton kernel read rows straight out of page-locked host memory (UVA zero-copy), and how
fast? Run on the H100 box by `run_on_box.sh pool3b12` (as ab/probe_gather.py); its output is in
`results/gather_probe_h100_202611.log`. The engine path built on it (764314f) was reverted as neutral."""
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _gather(src, ids, dst, hidden: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    r = tl.load(ids + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    for i in range(0, hidden, BLOCK):
        m = i + cols < hidden
        tl.store(dst + row * hidden + i + cols, tl.load(src + r * hidden + i + cols, mask=m), mask=m)


vocab, hidden, n = 128256, 3072, 8192
host = torch.randn(vocab, hidden).to(torch.bfloat16).pin_memory()
reg = torch.randn(vocab, hidden).to(torch.bfloat16)
torch.cuda.cudart().cudaHostRegister(reg.data_ptr(), reg.numel() * 2, 0)
ids = torch.randint(0, vocab, (n,))
ids_d = ids.cuda()
dst = torch.empty(n, hidden, dtype=torch.bfloat16, device="cuda")
for name, src in (("pin_memory", host), ("cudaHostRegister", reg)):
    try:
        for block in (1024, 2048, 4096):
            _gather[(n,)](src, ids_d, dst, hidden, BLOCK=block, num_warps=4)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                _gather[(n,)](src, ids_d, dst, hidden, BLOCK=block, num_warps=4)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / 10 * 1e3
            ok = torch.equal(dst.cpu(), src[ids])
            print(f"{name} BLOCK={block}: {ms:.2f} ms ({n * hidden * 2 / ms / 1e6:.1f} GB/s) equal={ok}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: {type(exc).__name__}: {exc}")
t = time.perf_counter()
for _ in range(5):
    stage = torch.index_select(host, 0, ids)
print(f"CPU index_select alone: {(time.perf_counter() - t) / 5 * 1e3:.2f} ms")
