"""Micro-benchmark of the LM head with its loss (``kernels.reference.linear_cross_entropy``), forward and backward.

Times, on the GPU, the engine's head for a shape's hidden size and vocabulary at ``tokens`` tokens: the logits
matmul, the loss and its gradient, and the two gradient matmuls (hidden states and the BF16 weight gradient),
chunk by chunk, for each loss path (``engine.loss_kernel``: 'torch' = FP32 upcast, log-softmax and autograd;
'triton' = the fused kernel of ``kernels/cross_entropy.py``) and chunk size. Per cell: the median seconds over
``--repeats`` calls (synchronised around each), the peak GPU memory the call allocated above its inputs, and
the share of the matmuls' FLOP rate (``6 * tokens * vocab * hidden`` FLOPs over the median).

    python benchmarks/bench_head.py --shapes llama3.2-3b,llama3.1-8b --out benchmarks/results/head.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

import common
import shapes
from slideformer.kernels import cross_entropy
from slideformer.kernels.reference import linear_cross_entropy


def bench_cell(hidden: int, vocab: int, tokens: int, kernel: str, chunk: int, repeats: int) -> dict[str, float]:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    gw = torch.empty_like(w)
    t = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    t[1023::1024] = -100  # the last position of each 1,024-token sequence, as shift_labels leaves it
    chunk_fn = cross_entropy.resolve(kernel, "cuda", None)
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731

    def call() -> torch.Tensor:
        return linear_cross_entropy(x, w, t, 1.0 / tokens, gw, chunk, None, chunk_fn)[0]

    call()
    sync()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    median = common.time_callable(call, iters=repeats, warmup=2, sync=sync)
    extra = torch.cuda.max_memory_allocated(device) - base
    flops = 6.0 * tokens * vocab * hidden
    loss = float(call())
    return {"seconds": median, "extra_gpu_bytes": int(extra), "matmul_tflops": flops / median / 1e12, "loss": loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama3.2-3b,llama3.1-8b")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x sequence length)")
    ap.add_argument("--chunks", default="512,1024,2048,4096")
    ap.add_argument("--kernels", default="torch,triton")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_head needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for name in args.shapes.split(","):
        cfg = shapes.hf_config(name)
        for kernel in args.kernels.split(","):
            for chunk in (int(c) for c in args.chunks.split(",")):
                cell = bench_cell(int(cfg.hidden_size), int(cfg.vocab_size), args.tokens, kernel, chunk, args.repeats)
                torch.cuda.empty_cache()  # the previous cell's tensors are gone: start each cell from the same pool
                rows.append({"shape": name, "kernel": kernel, "chunk_tokens": chunk, **cell})
                print(f"{name:12s} {kernel:6s} chunk {chunk:5d}: {cell['seconds'] * 1e3:7.2f} ms, "
                      f"+{cell['extra_gpu_bytes'] / 2**30:5.2f} GiB, {cell['matmul_tflops']:5.0f} TFLOP/s, "
                      f"loss {cell['loss']:.5f}", flush=True)
    record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, *sys.argv]), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "python": platform.python_version(), "tokens": args.tokens, "rows": rows}
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
