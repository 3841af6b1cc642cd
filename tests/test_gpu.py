"""GPU tests (run on the H100 box: ``pytest -m gpu``): BF16 parity, race hunting, memory flatness.

* Parity: the engine (BF16 weights and compute, FP32 master and moments) against HF + AdamW under
  BF16 autocast over an FP32 model, at window depths 1-3, both schedules. The engine's deviation from
  that reference is bounded by a multiple of the reference's own deviation from FP32 training (the
  size of BF16 rounding in this very run), so the bound scales with what BF16 can promise.
* Race amplifier: wide, thin layers (long transfers, tiny compute) for 20+ steps must equal, bitwise,
  the same engine with every copy made synchronous.
* Memory: device bytes do not grow with the number of layers.
* Upload copy (``engine.host_copy=bf16``): bitwise equal to uploads from the FP32 master (device cast).
* The split embedding update under the race amplifier (written in session 5 after its last device run).
* The forward preamble reused without a host sync (written in session 17 after its last device run).
* Recorded events taken from a ring per stream (session 18).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.reference import adamw_for, make_model, random_batch, reference_step, rel, tiny_config
from tests.tolerances import TOLERANCES

from slideformer import Engine, EngineConfig, OptimConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _updates(model: torch.nn.Module, init: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.detach().float().cpu() - init[n]).reshape(-1) for n, p in model.named_parameters()])


@pytest.mark.parametrize("family,window,accumulate,max_norm,resident", [
    ("llama", 1, 1, None, 0), ("llama", 2, 1, None, 0), ("llama", 3, 1, None, 0),
    ("llama_tied", 2, 2, 1.0, 0), ("qwen2", 2, 1, None, 0), ("qwen3", 3, 2, 1.0, 0), ("mistral", 1, 1, 0.5, 0),
    ("llama", 2, 1, None, 2), ("qwen3", 1, 1, None, 4), ("llama_tied", 2, 2, 1.0, 2), ("mistral", 1, 1, 0.5, 3),
    ("llama", 2, 1, None, "2c"), ("llama_tied", 1, 2, 1.0, "3c"),  # "c": weights cast on use
    # "v": a vocabulary large enough that the overlap schedule's gradient scratch lives in the head's weights
    ("llama", 2, 1, None, "2v"), ("llama_tied", 1, 1, None, "3cv"), ("qwen3", 2, 2, 1.0, "2v"),
])
def test_bf16_parity(family: str, window: int, accumulate: int, max_norm: float | None, resident: int | str) -> None:
    tol = TOLERANCES["gpu_bf16"]
    alias = str(resident).endswith("v")
    resident = str(resident).rstrip("v")
    cfg = tiny_config(family, layers=4, hidden=128, vocab=4096 if alias else 2048)
    cpu_model = make_model(cfg)
    init = {n: p.detach().clone() for n, p in cpu_model.named_parameters()}
    ref = copy.deepcopy(cpu_model).cuda()
    fp32 = copy.deepcopy(cpu_model).cuda()
    lr, wd = 1e-3, 0.1
    opt_ref, opt_fp32 = adamw_for(ref, lr, wd, fused=True), adamw_for(fp32, lr, wd, fused=True)
    weights = "cast" if str(resident).endswith("c") else "keep"
    engine = Engine(cpu_model, EngineConfig(device="cuda", window=window, chunk_mib=1,
                                            resident_layers=int(str(resident).rstrip("c")), resident_weights=weights),
                    OptimConfig(lr=lr, weight_decay=wd, max_grad_norm=max_norm))
    if alias:
        assert engine.resident is not None and engine.resident.aliased
    gen = torch.Generator().manual_seed(5)
    try:
        for step in range(5):
            mbs = [random_batch(cfg.vocab_size, 4, 64, gen) for _ in range(accumulate)]
            dev = [{k: v.cuda() for k, v in m.items()} for m in mbs]
            ref_loss = reference_step(ref, opt_ref, dev, max_norm, autocast=torch.bfloat16)
            reference_step(fp32, opt_fp32, dev, max_norm)
            res = engine.train_step(mbs if accumulate > 1 else mbs[0])
            assert abs(res.loss - ref_loss) <= tol["loss_rel"] * abs(ref_loss), (step, res.loss, ref_loss)
        trained = engine.hf_model()
        d_engine = rel(_updates(trained, init), _updates(ref, init))
        d_autocast = rel(_updates(ref, init), _updates(fp32, init))
        print(f"\n{family} w={window} K={accumulate} clip={max_norm} resident={resident}: "
              f"engine-vs-autocast update rel "
              f"{d_engine:.4f}, autocast-vs-fp32 {d_autocast:.4f}")
        assert d_engine <= max(tol["update_rel_factor"] * d_autocast, tol["update_rel_floor"])
    finally:
        engine.close()


@pytest.mark.parametrize("window,accumulate,resident", [(1, 1, 0), (2, 1, 0), (3, 1, 0), (2, 3, 0), (2, 1, 2),
                                                       (2, 3, 2)])
def test_race_amplifier(window: int, accumulate: int, resident: int) -> None:
    """Long transfers, tiny compute: every missing wait shows up as a bitwise difference."""
    _race("llama", window, accumulate, resident)


@pytest.mark.parametrize("family,resident", [("llama", 0), ("llama_tied", 2)])
def test_race_amplifier_split_embedding_update(family: str, resident: int) -> None:
    """The split embedding update (background early part, compact rows after the embedding backward), untied and
    tied, under the race amplifier."""
    _race(family, 2, 1, resident, embedding_update="split")


@pytest.mark.parametrize("family,accumulate,engine_kw", [
    ("llama", 1, {}), ("llama_tied", 1, {"embedding_update": "split"}), ("llama", 3, {})])
def test_race_amplifier_scratch_in_the_vocab_slot(family: str, accumulate: int, engine_kw: dict) -> None:
    """A vocabulary large enough that the resident layers' gradient scratch lives in the head's weights between the
    head and their next upload (runtime/resident.py), under the race amplifier: a missing wait shows as a difference."""
    _race(family, 2, accumulate, 2, vocab=57344, aliased=True, **engine_kw)


@pytest.mark.parametrize("family,vocab,engine_kw", [
    ("llama", 57344, {}), ("llama_tied", 57344, {"embedding_update": "split"}),
    ("llama", 4096, {"resident_weights": "cast"})])
def test_race_amplifier_resident_updates_on_their_stream(family: str, vocab: int, engine_kw: dict) -> None:
    """The overlap schedule's resident updates on their own stream (runtime/resident.py), each held back ~2 ms there,
    with the scratch in the head's weights (vocab 57,344) or cast weights: bitwise equal to the updates in
    compute-stream order (the synchronous run keeps them there). A missing wait shows as a difference."""
    _race(family, 2, 1, 2, vocab=vocab, aliased=vocab > 4096, side_delay=5_000_000, **engine_kw)


def _race(family: str, window: int, accumulate: int, resident: int, vocab: int = 4096, aliased: bool = False,
          side_delay: int = 0, **engine_kw: object) -> None:
    cfg = tiny_config(family, layers=5, hidden=1024, vocab=vocab)
    cfg.intermediate_size = 8192
    base = make_model(cfg)
    results = []
    for sync in (False, True):
        engine = Engine(copy.deepcopy(base),
                        EngineConfig(device="cuda", window=window, chunk_mib=2, staging_chunks=2, sync_copies=sync,
                                     resident_layers=resident, **engine_kw),
                        OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=1.0 if accumulate > 1 else None))
        if engine.resident is not None:
            assert engine.resident.aliased == aliased
            assert engine.resident.overlap == (not sync)
            engine.resident.side_delay_cycles = 0 if sync else side_delay
        gen = torch.Generator().manual_seed(7)
        losses = []
        for _ in range(20):
            mbs = [random_batch(cfg.vocab_size, 1, 16, gen) for _ in range(accumulate)]
            losses.append(engine.train_step(mbs if accumulate > 1 else mbs[0]).loss)
        state = {k: v.clone() for k, v in engine.state_dict()["params"].items()}
        engine.close()
        results.append((losses, state))
    (l_async, s_async), (l_sync, s_sync) = results
    assert l_async == l_sync
    for name in s_sync:
        assert torch.equal(s_async[name], s_sync[name]), name


def test_device_memory_flat_in_layers() -> None:
    peaks = {}
    # The first engine of a process also pays one-time allocations (cuBLAS workspaces, ...): warm up.
    for layers in (4, 4, 16):
        cfg = tiny_config("llama", layers=layers, hidden=256, vocab=4096)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        engine = Engine.from_config(cfg, EngineConfig(device="cuda", window=2), OptimConfig(lr=1e-4))
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            engine.train_step(random_batch(cfg.vocab_size, 4, 128, gen))
        engine.flush()
        peaks[layers] = (engine.memory_report()["device_bytes"], torch.cuda.max_memory_allocated() - before)
        engine.close()
    print(f"\ndevice bytes (engine buffers, peak allocated): {peaks}")
    assert peaks[4][0] == peaks[16][0]
    assert abs(peaks[16][1] - peaks[4][1]) <= 0.02 * peaks[4][1] + 4 * 2**20


@pytest.mark.parametrize("family,window,accumulate,max_norm", [
    ("llama", 1, 1, None), ("llama_tied", 2, 1, None), ("llama", 2, 2, 1.0), ("llama_tied", 1, 2, 1.0)])
def test_host_copy_bitwise(family: str, window: int, accumulate: int, max_norm: float | None) -> None:
    """The optimizer's pinned BF16 copy, DMA'd as is, trains bitwise like the FP32 master cast on the GPU."""
    cfg = tiny_config(family, layers=4, hidden=256, vocab=4096)
    base = make_model(cfg)
    results = []
    for host_copy in ("none", "bf16"):
        engine = Engine(copy.deepcopy(base), EngineConfig(device="cuda", window=window, chunk_mib=1 / 4,
                                                          host_copy=host_copy),
                        OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=max_norm))
        gen = torch.Generator().manual_seed(11)
        losses = []
        try:
            for _ in range(6):
                mbs = []
                for _ in range(accumulate):
                    b = random_batch(cfg.vocab_size, 2, 32, gen)
                    # Distinct token ids: the embedding's gradient scatter then adds one row per id, so CUDA
                    # atomics cannot reorder a sum between the two runs.
                    ids = torch.randperm(cfg.vocab_size, generator=gen)[:b["input_ids"].numel()]
                    b["labels"] = torch.where(b["labels"] == -100, b["labels"], ids.view_as(b["labels"]))
                    b["input_ids"] = ids.view_as(b["input_ids"])
                    mbs.append(b)
                losses.append(engine.train_step(mbs if accumulate > 1 else mbs[0]).loss)
            rep = engine.memory_report()
            assert rep["upload_cast"] == ("copy" if host_copy == "bf16" else "device"), rep["upload_cast"]
            if host_copy == "bf16":
                # The copies are page-locked at their exact size; the FP32 masters are not page-locked.
                assert rep["registered_bytes"] == rep["upload_copy_bytes"] > 0 and rep["pinned_fallbacks"] == 0
                engine.flush()
                for u in engine.units:
                    if u.upload_copy is not None:
                        assert torch.equal(u.upload_copy, u.master.to(torch.bfloat16)), u.name
            sd = engine.state_dict()
            results.append((losses, {p: {k: v.clone() for k, v in sd[p].items()}
                                     for p in ("params", "exp_avg", "exp_avg_sq")}))
        finally:
            engine.close()
    (l_off, s_off), (l_on, s_on) = results
    print(f"\nhost_copy {family} w={window} K={accumulate}: losses {l_on[0]:.4f} -> {l_on[-1]:.4f}")
    assert l_off == l_on
    for part in s_off:
        for name in s_off[part]:
            assert torch.equal(s_off[part][name], s_on[part][name]), (part, name)


def test_the_forward_preamble_does_not_sync_after_its_first_step() -> None:
    """Without a mask or position ids the layers' preamble arguments are reused (``ModelAdapter.layer_calls``): the
    second call queues no device work and reads nothing back. HF's preamble itself reads a packed-sequence flag from
    the device (a host sync before the forward's first kernel, ~1.9 ms of idle GPU per 3B step in session 17)."""
    from slideformer.models import get_adapter

    cfg = tiny_config("llama", layers=2)
    model = make_model(cfg).to("cuda", torch.bfloat16)
    adapter = get_adapter(cfg.model_type)
    parts = adapter.split(model)
    x = torch.randn(2, 16, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    adapter.layer_calls(parts, x, None, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first, calls = adapter.layer_calls(parts, x, None, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first is x and len(calls) == cfg.num_hidden_layers


def test_recorded_events_come_from_a_ring_per_stream_and_still_order() -> None:
    """``DeviceOps.record`` takes its events from a ring per stream (no CUDA event made per record in the hot loop,
    written in session 18): the ring comes round to the same event after ``EVENT_RING`` records on that stream, other
    streams have their own, and an event taken again marks its new record (a long kernel before it keeps it
    pending)."""
    from slideformer.runtime.device import EVENT_RING, DeviceOps

    ops = DeviceOps(torch.device("cuda"))
    side = ops.new_stream()
    first = ops.record(side)
    taken = [ops.record(side) for _ in range(EVENT_RING - 1)]
    assert first not in taken and len({id(e) for e in taken}) == EVENT_RING - 1
    assert ops.record(ops.compute_stream()) is not first
    with ops.on(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued on the side stream before the ring's turn
    again = ops.record(side)
    assert again is first and not ops.done(again)
    ops.host_wait(again)
    assert ops.done(again)
