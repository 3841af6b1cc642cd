"""The embedding rows gathered by the GPU out of page-locked host memory (``kernels/host_rows.py``,
``engine.embedding_gather``).

* CPU: the kernel's indexing under Triton's interpreter (host tensors stand in for the mapped table), bitwise against
  ``index_select``; its argument checks; the config's values.
* GPU: a pinned BF16 table and a ``cudaHostRegister``-ed FP32 one (cast to BF16 on the way) against ``index_select``,
  bitwise; the engine trained with the device gather against the host gather, tied (BF16 upload copy) and untied (FP32
  master): equal losses and parameters, bit for bit, and the device path really taken.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config

from slideformer import Engine, EngineConfig, OptimConfig
from slideformer.errors import ConfigError
from slideformer.kernels import host_rows

HAS_TRITON = importlib.util.find_spec("triton") is not None

_INTERPRETED = r"""
import json, torch
from slideformer.kernels import host_rows
torch.manual_seed(0)
out = {}
for dtype in (torch.float32, torch.bfloat16):
    for rows, width in ((50, 24), (7, 4100)):
        table = torch.randn(rows, width).to(dtype)
        ids = torch.randint(0, rows, (13,))
        got = torch.empty(13, width, dtype=dtype)
        host_rows.gather_(table, ids, got)
        out[f"{dtype}-{width}"] = bool(torch.equal(got, table[ids]))
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[test]' installs it)")
def test_gather_kernel_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got and all(got.values()), got


def test_usable_checks_and_config() -> None:
    table = torch.zeros(4, 8)
    assert not host_rows.usable(table, torch.device("cpu"))  # the CPU plays the device: the host gathers
    with pytest.raises(ValueError, match="contiguous"):
        host_rows.gather_(torch.zeros(4, 6), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="3 ids for 2 output rows"):
        host_rows.gather_(table, torch.zeros(3, dtype=torch.int64), torch.zeros(2, 8))
    with pytest.raises(ConfigError, match="engine.embedding_gather must be"):
        EngineConfig(embedding_gather="gpu")


def _cuda() -> None:
    if not (torch.cuda.is_available() and HAS_TRITON):
        pytest.skip("needs a CUDA GPU and triton")


@pytest.mark.gpu
def test_gather_from_pinned_and_registered_tables() -> None:
    _cuda()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 5003, (2051,), generator=gen)
    pinned = torch.randn(5003, 3072, generator=gen).to(torch.bfloat16).pin_memory()
    out = torch.empty(2051, 3072, dtype=torch.bfloat16, device="cuda")
    assert host_rows.usable(pinned, out.device)
    host_rows.gather_(pinned, ids.cuda(), out)
    assert torch.equal(out.cpu(), pinned[ids])
    master = torch.randn(5003, 4096, generator=gen)
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(master.data_ptr(), master.numel() * 4, 0)) == 0
    try:
        assert host_rows.usable(master, out.device)
        out2 = torch.empty(2051, 4096, dtype=torch.bfloat16, device="cuda")
        host_rows.gather_(master, ids.cuda(), out2)
        torch.cuda.synchronize()
        assert torch.equal(out2.cpu(), master[ids].to(torch.bfloat16))  # one round-to-nearest cast, as the host's
    finally:
        cudart.cudaHostUnregister(master.data_ptr())


@pytest.mark.gpu
@pytest.mark.parametrize("family,opts", [("llama_tied", {"host_copy": "bf16"}), ("llama", {})])
def test_engine_device_gather_is_bitwise_the_host_gather(family: str, opts: dict) -> None:
    _cuda()
    cfg = tiny_config(family, layers=3, hidden=128, vocab=5003)
    model = make_model(cfg)
    runs = {}
    for gather in ("host", "auto"):
        engine = Engine(copy.deepcopy(model), EngineConfig(device="cuda", chunk_mib=1, embedding_gather=gather, **opts),
                        OptimConfig(lr=1e-3, weight_decay=0.1))
        try:
            assert engine.gather_on_device == (gather == "auto")
            gen = torch.Generator().manual_seed(5)
            losses = [engine.train_step(random_batch(cfg.vocab_size, 3, 37, gen)).loss for _ in range(3)]
            runs[gather] = (losses, {k: v.detach().clone() for k, v in engine.hf_model().state_dict().items()})
            if gather == "auto":
                assert host_rows.usable((engine.units[0].upload_copy if opts else engine.units[0].master),
                                        torch.device("cuda"))
        finally:
            engine.close()
    assert runs["auto"][0] == runs["host"][0]
    for k, v in runs["host"][1].items():
        assert torch.equal(runs["auto"][1][k], v), k
