"""The vocabulary-blocked head (``kernels/vocab_head.py``, ``engine.head_schedule='vocab'``) against the one-pass head.

* CPU: ``VocabBlockedHead`` on its torch path against ``reference.linear_cross_entropy`` in FP32 on odd shapes with
  ignored rows: loss, the input's and the weight's gradients, and each block of the weight's gradient final when
  ``on_block`` says so.
* CPU: its two Triton kernels under Triton's interpreter (as ``test_cross_entropy.py``), against the torch path.
* CPU: the engine with a tied embedding and the split update, 'vocab' against 'tokens' over several steps (losses,
  norms, every parameter and both moments, FP32 and BF16 with the upload copy, parking chunks smaller than a block),
  the blocks really taken; the config's errors; the planner's 'auto'.
* GPU: the kernels in BF16 on the Llama-3 vocabulary (within one BF16 unit of the torch path), and the engine trained
  with 'vocab' against 'tokens' within test_gpu.py's BF16 bounds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.engine_ab import bf16_ab
from tests.reference import make_model, random_batch, tiny_config
from tests.triton_interp import HAS_TRITON, NO_TRITON, run_interpreted

from slideformer import Engine, EngineConfig, OptimConfig
from slideformer.errors import ConfigError
from slideformer.kernels import reference, vocab_head
from slideformer.kernels.vocab_head import VocabBlockedHead


def _blocked(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, scale: float, *, rows: int, kernels: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]], bool]:
    gw = torch.full_like(w, float("nan"))  # every row must be written
    head = VocabBlockedHead(x, w, t, block_rows=rows, kernels=kernels)
    loss = head.loss(scale)
    blocks, snapshots = [], []

    def on_block(lo: int, hi: int) -> None:
        blocks.append((lo, hi))
        snapshots.append(gw[lo:hi].clone())

    gx = head.backward(scale, gw, on_block)
    final = all(torch.equal(s, gw[lo:hi]) for s, (lo, hi) in zip(snapshots, blocks))
    return loss, gx, gw, blocks, final


@pytest.mark.parametrize("n,vocab,hidden,chunk,rows",
                         [(21, 300, 16, 8, 128), (5, 97, 8, 2, 40), (33, 1000, 24, 33, 999)])
def test_blocked_head_matches_the_one_pass_head_fp32(n: int, vocab: int, hidden: int, chunk: int, rows: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x, w = torch.randn(n, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen)
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[[0, n // 2]] = reference.IGNORE_INDEX
    t[-1] = vocab - 1  # a target in the last block's last column
    scale = 1 / (n - 2)
    gw_ref = torch.empty_like(w)
    loss_ref, gx_ref = reference.linear_cross_entropy(x, w, t, scale, gw_ref, chunk_tokens=chunk)
    loss, gx, gw, blocks, final = _blocked(x, w, t, scale, rows=rows)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    assert blocks == [(lo, min(lo + rows, vocab)) for lo in range(0, vocab, rows)]
    assert final, "a block's gradient changed after on_block"
    assert gx.dtype == x.dtype and not torch.isnan(gw).any()


def test_block_rows_and_device_bytes() -> None:
    assert VocabBlockedHead.block_rows_for(128256, 8) == 16128  # a multiple of 128, 8 blocks
    assert VocabBlockedHead.block_rows_for(300, 8) == 128
    # 3B at batch 8: 8,192 x 16,128 BF16 logits (0.26 GB, half the one-pass head's 2,048-token chunk), FP32 dx, lse.
    got = VocabBlockedHead.device_bytes(8192, 128256, 3072, 16128, 2)
    assert sorted(got.values()) == [8192 * 3072 * 4 + 8192 * 4, 8192 * 16128 * 2]


_INTERPRETED = r"""
import json, torch
from slideformer.kernels import vocab_head as vh, reference as ref
from slideformer.kernels.vocab_head import VocabBlockedHead
torch.manual_seed(0)
x, w = torch.randn(21, 16), torch.randn(300, 16)
t = torch.randint(0, 300, (21,))
t[[0, 13]] = -100
t[5] = 299
res = {}
for name, kernels in (("torch", False), ("kernel", True)):
    gw = torch.empty_like(w)
    head = VocabBlockedHead(x, w, t, block_rows=128, kernels=kernels)
    loss = head.loss(1 / 19)
    gx = head.backward(1 / 19, gw)
    res[name] = (float(loss), gx, gw, head.lse.clone())
a, b = res["torch"], res["kernel"]
print(json.dumps({"loss": [a[0], b[0]], "gx_err": float((a[1] - b[1]).abs().max()), "gx_max": float(a[1].abs().max()),
                  "gw_err": float((a[2] - b[2]).abs().max()), "gw_max": float(a[2].abs().max()),
                  "lse_ignored_inf": bool(torch.isinf(b[3][[0, 13]]).all()),
                  "lse_err": float((a[3] - b[3])[torch.isfinite(a[3])].abs().max())}))
"""


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_kernels_match_the_torch_path_under_the_interpreter() -> None:
    got = run_interpreted(_INTERPRETED)
    assert abs(got["loss"][0] - got["loss"][1]) <= 1e-6 * abs(got["loss"][0]), got
    assert got["gx_err"] <= 1e-5 * got["gx_max"] and got["gw_err"] <= 1e-5 * got["gw_max"], got
    assert got["lse_ignored_inf"] and got["lse_err"] <= 1e-5, got


def _train(family: str, schedule: str, steps: int = 4, **kw: object) -> tuple[list[float], list[float], dict, int]:
    """Losses, grad norms, the state (params' updates from the initial model, both moments) and the engine's
    ``head_blocks`` after ``steps`` steps with the tied split update and ``head_schedule=schedule``."""
    cfg = tiny_config(family, vocab=512)
    model = make_model(cfg)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opts = {"chunk_mib": 1 / 64, "loss_chunk_tokens": 16, **kw}
    engine = Engine(copy.deepcopy(model), EngineConfig(device="cpu", embedding_update="split", head_schedule=schedule,
                                                       **opts),
                    OptimConfig(lr=1e-3, weight_decay=0.1))
    try:
        gen = torch.Generator().manual_seed(7)
        losses, norms = [], []
        for _ in range(steps):
            res = engine.train_step(random_batch(cfg.vocab_size, 3, 11, gen))
            losses.append(res.loss)
            norms.append(res.grad_norm)
        sd = engine.state_dict()
        state = {part: {k: v.clone() for k, v in sd[part].items()} for part in ("exp_avg", "exp_avg_sq")}
        state["update"] = {k: v - init[k] for k, v in sd["params"].items() if k in init}
        return losses, norms, state, engine.head_blocks
    finally:
        engine.close()


def _flat(state: dict, part: str) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for _, t in sorted(state[part].items())])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_engine_vocab_blocks_match_the_one_pass_head() -> None:
    """Tied embedding, split update: 'vocab' (4 blocks of 128 rows, each many parking chunks) against 'tokens', in FP32
    and in BF16 with the upload copy. The two heads round differently (the weight's gradient is one matmul instead of a
    sum over token chunks): FP32 runs stay apart by FP32 rounding, which AdamW's early steps magnify only where a
    moment is tiny; BF16 runs may differ by no more than BF16 itself moves the training (the same head in BF16 against
    FP32)."""
    bf16 = {"compute_dtype": "bfloat16", "host_copy": "bf16"}
    runs = {(sched, dt): _train("llama_tied", sched, **(bf16 if dt else {}))
            for sched in ("tokens", "vocab") for dt in (False, True)}
    assert runs["tokens", False][3] == 0 and runs["vocab", False][3] == 128 and runs["vocab", True][3] == 128
    (l_t, n_t, s_t, _), (l_v, n_v, s_v, _) = runs["tokens", False], runs["vocab", False]
    assert l_v == pytest.approx(l_t, rel=1e-6) and n_v == pytest.approx(n_t, rel=1e-6)
    for part in ("update", "exp_avg", "exp_avg_sq"):
        assert _rel(_flat(s_v, part), _flat(s_t, part)) < 1e-4, part
    for part, tensors in s_t.items():
        for name, t in tensors.items():
            torch.testing.assert_close(s_v[part][name], t, rtol=1e-4, atol=2e-5, msg=f"{part} {name}")
    (l_tb, _, s_tb, _), (l_vb, _, s_vb, _) = runs["tokens", True], runs["vocab", True]
    assert l_vb == pytest.approx(l_tb, rel=2e-3)
    for part in ("update", "exp_avg", "exp_avg_sq"):
        bf16_effect = _rel(_flat(s_tb, part), _flat(s_t, part))
        assert _rel(_flat(s_vb, part), _flat(s_tb, part)) <= bf16_effect, part


@pytest.mark.parametrize("chunk_mib", [5 / 256, 1 / 16, 1.0])
def test_the_gradient_ring_holds_two_blocks_and_grows_for_a_step_that_needs_the_whole_matrix(chunk_mib: float) -> None:
    """The blocked head writes the tied matrix's gradient into a ring of two blocks (runtime/head_blocks.py), read by
    parking chunks that straddle blocks (5,120-element chunks, 8,192-element blocks), that hold two blocks, or the
    whole matrix (a chunk then copies block by block: it must not wait for blocks its own copies free; the GPU's
    32 MiB chunks hang there otherwise); a step with two micro-batches
    (the deferred schedule, the whole embedding update) gives the slot the whole matrix's buffer, and the blocked head
    then runs over it. The same training as the one-pass head through the same steps."""
    cfg = tiny_config("llama_tied", vocab=512)
    model = make_model(cfg)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states, rings = {}, {}
    for sched in ("tokens", "vocab"):
        opts = {"chunk_mib": chunk_mib, "loss_chunk_tokens": 16, "embedding_update": "split", "head_schedule": sched}
        with Engine(copy.deepcopy(model), EngineConfig(device="cpu", **opts),
                    OptimConfig(lr=1e-3, weight_decay=0.1)) as engine:
            gen = torch.Generator().manual_seed(11)
            seen = [engine.vocab_ring is not None, engine.vocab_slot.grad.numel()]
            for batch in ([random_batch(cfg.vocab_size, 3, 11, gen)] for _ in range(2)):
                engine.train_step(batch[0])
            seen.append(engine.vocab_ring is not None)
            engine.train_step([random_batch(cfg.vocab_size, 3, 11, gen) for _ in range(2)])
            seen += [engine.vocab_ring is not None, engine.vocab_slot.grad.numel()]
            engine.train_step(random_batch(cfg.vocab_size, 3, 11, gen))
            sd = engine.state_dict()
            states[sched] = {k: v - init[k] for k, v in sd["params"].items() if k in init}
            rings[sched] = seen
    uh = cfg.hidden_size  # the head unit: the final norm's weight
    assert rings["vocab"] == [True, 2 * 128 * cfg.hidden_size + uh, True, False, (512 + 1) * cfg.hidden_size]
    assert rings["tokens"][0] is False
    ref = torch.cat([t.reshape(-1) for _, t in sorted(states["tokens"].items())])
    got = torch.cat([t.reshape(-1) for _, t in sorted(states["vocab"].items())])
    assert _rel(got, ref) < 1e-4


def test_vocab_needs_the_tied_split_else_one_pass() -> None:
    """'vocab' on an untied head, or a tied one with the whole update, runs the one-pass head."""
    assert _train("llama", "vocab", steps=1)[3] == 0
    cfg = tiny_config("llama_tied", vocab=512)
    with Engine(make_model(cfg), EngineConfig(device="cpu", embedding_update="whole", head_schedule="vocab")) as e:
        assert e.head_blocks == 0
    with Engine(make_model(cfg), EngineConfig(device="cpu", embedding_update="split")) as e:
        assert e.head_blocks == 0  # 'auto' on the CPU
    with pytest.raises(ConfigError, match="engine.head_schedule must be"):
        EngineConfig(head_schedule="rows")


def test_planner_auto_takes_vocab_where_the_host_is_the_bound() -> None:
    """The planner's 'auto' (fused kernel: triton importable here): the 3B at batch 8 on a 24 GiB card with 15 cast
    resident layers and the BF16 copy is host-bound -> vocab; with every layer resident (80 GB) it is GPU-bound."""
    from benchmarks.shapes import hf_config as shape_config

    from slideformer.planner import Hardware, make_plan

    if not HAS_TRITON:
        pytest.skip("the planner counts the fused kernel only where triton imports")
    cfg3b = shape_config("llama3.2-3b")
    hw = Hardware(gpu_memory_bytes=80 << 30, host_memory_bytes=125 << 30)

    def plan(resident: int, schedule: str = "auto") -> dict:
        eng = EngineConfig(device="cuda", resident_layers=resident, resident_weights="cast", host_copy="bf16",
                           embedding_update="split", head_schedule=schedule)
        return make_plan(cfg3b, seq_len=1024, batch_size=8, grad_accum=1, clipping=False, engine=eng,
                         hardware=hw).settings

    assert plan(15)["head_schedule"] == "vocab"
    assert plan(28)["head_schedule"] == "tokens"
    assert plan(28, "vocab")["head_schedule"] == "vocab" and plan(15, "tokens")["head_schedule"] == "tokens"


@pytest.mark.gpu
@pytest.mark.parametrize("n,vocab", [(8192, 128256), (37, 4097), (5, 300)])
def test_blocked_head_on_the_gpu(n: int, vocab: int) -> None:
    """BF16: loss, input and weight gradients against the one-pass head's kernel, within BF16 rounding."""
    if not (torch.cuda.is_available() and HAS_TRITON):
        pytest.skip("needs a CUDA GPU and triton")
    from slideformer.kernels import cross_entropy

    hidden = 256 if n > 1000 else 64
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) / hidden**0.5).bfloat16()
    t = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    t[1] = -100
    scale = 1 / (n - 1)
    # The reference: the torch path in FP32 (exact to FP32), the one-pass kernel in BF16 beside it.
    gw32 = torch.empty(vocab, hidden, device="cuda")
    loss32, gx32 = reference.linear_cross_entropy(x.float(), w.float(), t, scale, gw32, chunk_tokens=1024)
    gw1 = torch.empty_like(w)
    loss1, gx1 = reference.linear_cross_entropy(x, w, t, scale, gw1, chunk_tokens=2048,
                                                chunk_fn=cross_entropy.loss_grad_)
    loss2, gx2, gw2, blocks, final = _blocked(x, w, t, scale, kernels=True,
                                              rows=VocabBlockedHead.block_rows_for(vocab, vocab_head.BLOCKS))
    assert final and blocks[-1][1] == vocab
    assert float(loss2) == pytest.approx(float(loss1), rel=1e-5)
    assert float(loss2) == pytest.approx(float(loss32), rel=2e-3)
    for mine, one_pass, exact in ((gx2, gx1, gx32), (gw2, gw1, gw32)):
        # No further from the FP32 result than the one-pass kernel's BF16 result is (plus a BF16 unit of slack).
        err_mine = (mine.float() - exact).norm() / exact.norm()
        err_one = (one_pass.float() - exact).norm() / exact.norm()
        assert float(err_mine) <= float(err_one) * 1.05 + 2**-8, (float(err_mine), float(err_one))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama_tied"])
def test_engine_vocab_vs_tokens_bf16(family: str) -> None:
    """4 steps, BF16, tied split update: head_schedule='vocab' against 'tokens', within test_gpu.py's bounds."""
    if not (torch.cuda.is_available() and HAS_TRITON):
        pytest.skip("needs a CUDA GPU and triton")

    def blocks(name: str, engine: Engine) -> None:
        assert bool(engine.head_blocks) == (name == "vocab")

    bf16_ab(family, 5003, {k: {"head_schedule": k, "embedding_update": "split", "loss_chunk_tokens": 40}
                           for k in ("tokens", "vocab")}, blocks)
