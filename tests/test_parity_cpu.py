"""The engine trains exactly like plain HF + torch.optim.AdamW (CPU, FP32 compute).

For each supported family (tiny configs built in code, tied and untied heads, padded batches), over
five optimizer steps, every step's loss and every final parameter and moment must match the reference
within the ``cpu_fp32`` tolerances, for both schedules: update-in-backward ("overlap") and deferred
(gradient accumulation over micro-batches and global-norm clipping).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.reference import FAMILIES, adamw_for, make_model, random_batch, reference_step, rel, tiny_config
from tests.tolerances import TOLERANCES

from slideformer import Engine, EngineConfig, OptimConfig

TOL = TOLERANCES["cpu_fp32"]
STEPS = 5


def _run(family: str, *, accumulate: int, max_norm: float | None, window: int = 2, schedule: str = "auto",
         pad_left: bool = False, layers: int = 3, lr_schedule: bool = False, fused: bool = True,
         chunk_mib: float = 1, staging_chunks: int = 4, resident_layers: int = 0,
         placement: str = "first", resident_weights: str = "auto", unpadded: bool = False,
         embedding_update: str = "auto", token_range: int = 0) -> None:
    cfg = tiny_config(family, layers=layers)
    ref = make_model(cfg)
    model = copy.deepcopy(ref)
    lr, wd = 1e-4, 0.1
    # fused=True: the same per-element AdamW arithmetic as the engine's kernel, so what is compared is
    # the engine's gradients and schedule; test_window_depths uses torch's default implementation.
    opt = adamw_for(ref, lr, wd, fused=fused)
    engine = Engine(model, EngineConfig(device="cpu", window=window, schedule=schedule, chunk_mib=chunk_mib,
                                        staging_chunks=staging_chunks, loss_chunk_tokens=16,
                                        resident_layers=resident_layers, resident_placement=placement,
                                        resident_weights=resident_weights, embedding_update=embedding_update),
                    OptimConfig(lr=lr, weight_decay=wd, max_grad_norm=max_norm))
    gen = torch.Generator().manual_seed(1)
    try:
        for step in range(STEPS):
            step_lr = lr * (1 + step) / STEPS if lr_schedule else lr
            for g in opt.param_groups:
                g["lr"] = step_lr
            mbs = [random_batch(token_range or cfg.vocab_size, 3, 11, gen, pad_left=pad_left)
                   for _ in range(accumulate)]
            if unpadded:  # no mask, no position ids: the engine reuses the layers' preamble arguments
                mbs = [{k: v for k, v in mb.items() if k != "attention_mask"} for mb in mbs]
            ref_loss = reference_step(ref, opt, mbs, max_norm)
            res = engine.train_step(mbs if accumulate > 1 else mbs[0], lr=step_lr)
            assert abs(res.loss - ref_loss) <= TOL["loss_rel"] * abs(ref_loss), (step, res.loss, ref_loss)
        state = engine.state_dict()
        names = dict(ref.named_parameters())
        assert set(state["params"]) == set(names)
        for name, p in names.items():
            assert rel(state["params"][name], p.detach()) <= TOL["param_rel"], name
            st = opt.state[p]
            assert rel(state["exp_avg"][name], st["exp_avg"]) <= 1e-4, name
            assert rel(state["exp_avg_sq"][name], st["exp_avg_sq"]) <= 1e-4, name
        assert state["step"] == STEPS
    finally:
        engine.close()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_overlap_schedule_matches_reference(family: str) -> None:
    _run(family, accumulate=1, max_norm=None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_accumulation_and_clipping_match_reference(family: str) -> None:
    # max_norm well below the measured gradient norms (~1-5) so clipping is active at every step.
    _run(family, accumulate=3, max_norm=0.5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unpadded_batches_match_reference(family: str) -> None:
    """Batches without a mask or position ids (the benchmarks' and packed-free training's case) reuse the preamble's
    layer arguments from the first step on (``ModelAdapter.layer_calls``) and still train like the reference."""
    _run(family, accumulate=2, max_norm=0.5, unpadded=True)


def test_the_preamble_runs_once_per_shape_without_mask_or_positions() -> None:
    """``layer_calls`` runs HF's preamble once per input shape when there is no mask and no position ids (it read a
    flag back from the device every step: a host sync), every time otherwise, and keeps at most ``PREAMBLE_CACHE``
    shapes."""
    from slideformer.models.adapter import PREAMBLE_CACHE

    cfg = tiny_config("llama", layers=2)
    engine = Engine(make_model(cfg), EngineConfig(device="cpu", loss_chunk_tokens=16), OptimConfig(lr=1e-4))
    runs: list[int] = []
    engine.parts.base.register_forward_pre_hook(lambda *_: runs.append(1))
    gen = torch.Generator().manual_seed(3)
    try:
        def step(seq: int, masked: bool) -> None:
            mb = random_batch(cfg.vocab_size, 2, seq, gen)
            engine.train_step(mb if masked else {k: v for k, v in mb.items() if k != "attention_mask"})

        for _ in range(3):
            step(9, masked=False)
        engine.eval_loss({k: v for k, v in random_batch(cfg.vocab_size, 2, 9, gen).items() if k != "attention_mask"})
        assert len(runs) == 1  # three steps and an evaluation of one shape: one preamble
        for _ in range(2):
            step(9, masked=True)
        assert len(runs) == 3  # with a mask it runs every time
        for seq in range(10, 10 + PREAMBLE_CACHE):
            step(seq, masked=False)
        assert len(runs) == 3 + PREAMBLE_CACHE and len(engine.parts.preamble_calls) == PREAMBLE_CACHE
        step(9, masked=False)  # the oldest shape was dropped: it runs again
        assert len(runs) == 4 + PREAMBLE_CACHE
    finally:
        engine.close()


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_window_depths(window: int) -> None:
    _run("llama", accumulate=1, max_norm=None, window=window, layers=4, fused=False)


def test_deferred_without_clipping_or_accumulation() -> None:
    _run("llama_tied", accumulate=1, max_norm=None, schedule="deferred", lr_schedule=True)


def test_clipping_only_and_left_padding() -> None:
    _run("qwen2", accumulate=1, max_norm=0.3, pad_left=True)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
@pytest.mark.parametrize("update", ["whole", "split"])
def test_repeated_tokens_sum_into_their_rows(family: str, update: str) -> None:
    """Every token of a batch drawn from 7 ids (33 tokens: each row summed from several): the embedding backward's
    per-row sums (``step.rows_grad``) onto the head's part (tied) or alone (untied), with the whole and the split
    update, train like the reference."""
    _run(family, accumulate=1, max_norm=None, embedding_update=update, token_range=7)
    _run(family, accumulate=2, max_norm=0.5, embedding_update=update, token_range=7)


@pytest.mark.parametrize("family", ["llama_tied", "qwen3"])
def test_tiny_chunks_and_parking_pool(family: str) -> None:
    """Units span many 16 KiB chunks and are larger than the 4-chunk parking pool: the optimizer must
    stream them while they download, and reorder whole ones, without changing a number."""
    _run(family, accumulate=1, max_norm=None, chunk_mib=1 / 64, staging_chunks=2, window=1)
    _run(family, accumulate=3, max_norm=0.5, chunk_mib=1 / 64, staging_chunks=2, window=2)


@pytest.mark.parametrize("family,resident,window,placement", [
    ("llama", 1, 1, "first"), ("llama_tied", 2, 2, "spread"), ("qwen3", 3, 2, "first"), ("gemma2", 2, 1, "spread"),
    ("llama", 4, 2, "first"), ("llama", 2, 1, "spread"), ("llama_tied", 2, 2, "spread_top")])
def test_resident_layers(family: str, resident: int, window: int, placement: str) -> None:
    """Layers kept on the device with their optimizer there train exactly like streamed ones."""
    _run(family, accumulate=1, max_norm=None, window=window, resident_layers=resident, layers=4,
         placement=placement)


@pytest.mark.parametrize("weights", ["keep", "cast"])
def test_resident_layers_report_the_whole_gradient_norm(weights: str) -> None:
    """The resident updates' norms (taken on their own stream, runtime/resident.py) join the step's: the reported
    gradient norm equals the all-streamed engine's on the same batches."""
    cfg = tiny_config("llama_tied", layers=4)
    base = make_model(cfg)
    norms = []
    for resident in (0, 3):
        with Engine(copy.deepcopy(base), EngineConfig(device="cpu", resident_layers=resident, resident_weights=weights),
                    OptimConfig(lr=1e-3, weight_decay=0.1)) as engine:
            gen = torch.Generator().manual_seed(3)
            norms.append([engine.train_step(random_batch(cfg.vocab_size, 3, 11, gen)).grad_norm for _ in range(3)])
    for ours, streamed in zip(*norms, strict=True):
        assert ours == pytest.approx(streamed, rel=1e-5)


def test_close_after_a_failed_step_joins_the_resident_updates() -> None:
    """A step that fails between two resident updates leaves the first on the resident stream; ``close`` joins it
    before the memory goes back (on the GPU the allocator's reuse follows the compute stream only)."""
    cfg = tiny_config("llama", layers=4)
    engine = Engine(make_model(cfg), EngineConfig(device="cpu", resident_layers=2), OptimConfig(lr=1e-3))
    resident, real = engine.resident, engine.resident.update
    calls = []

    def update(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("injected after the first resident update")
        real(*args, **kwargs)

    resident.update = update
    with pytest.raises(Exception, match="injected"):
        engine.train_step(random_batch(cfg.vocab_size, 2, 9, torch.Generator().manual_seed(0)))
    assert resident.sq_target is not None  # the first update's norm, not joined by the failed step
    engine.close()
    assert resident.sq_target is None


@pytest.mark.parametrize("family,resident,accumulate,max_norm,window", [
    ("llama", 3, 1, None, 2), ("llama_tied", 2, 1, None, 1), ("gemma2", 2, 1, None, 2), ("qwen3", 2, 3, 0.5, 2),
    ("llama_tied", 3, 2, 1e-3, 1)])
def test_resident_layers_with_weights_cast_on_use(family: str, resident: int, accumulate: int,
                                                  max_norm: float | None, window: int) -> None:
    """``resident_weights='cast'``: no weights kept, every resident layer cast into one shared buffer before each
    forward and backward (both schedules); still the same training as plain PyTorch."""
    _run(family, accumulate=accumulate, max_norm=max_norm, window=window, resident_layers=resident, layers=4,
         resident_weights="cast")


@pytest.mark.parametrize("family,resident,accumulate,max_norm,window", [
    ("llama", 2, 1, 0.5, 2), ("llama_tied", 1, 3, 0.5, 1), ("qwen3", 3, 2, None, 2), ("gemma2", 2, 1, 1e-3, 1)])
def test_resident_layers_under_the_deferred_schedule(family: str, resident: int, accumulate: int,
                                                     max_norm: float | None, window: int) -> None:
    """Clipping and accumulation with resident layers: accumulated and clipped on the device, updated
    before their next forward; the same training as plain PyTorch."""
    _run(family, accumulate=accumulate, max_norm=max_norm, window=window, resident_layers=resident, layers=4)


def test_accumulation_without_clipping() -> None:
    _run("llama", accumulate=2, max_norm=None, lr_schedule=True)


def test_hf_model_after_training_is_the_master_model() -> None:
    cfg = tiny_config("llama_tied")
    model = make_model(cfg)
    engine = Engine(model, EngineConfig(device="cpu"), OptimConfig(lr=1e-3))
    gen = torch.Generator().manual_seed(3)
    batch = random_batch(cfg.vocab_size, 2, 9, gen)
    engine.train_step(batch)
    trained = engine.hf_model()
    state = engine.state_dict()["params"]
    for name, p in trained.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32
        assert torch.equal(p.detach(), state[name])
    assert trained.lm_head.weight is trained.model.embed_tokens.weight
    engine.close()


@pytest.mark.parametrize("family,schedule", [("llama_tied", "auto"), ("qwen3", "deferred")])
def test_bf16_compute_on_cpu_tracks_autocast(family: str, schedule: str) -> None:
    """BF16 weights and compute (the GPU's arithmetic, run by the CPU): the engine's parameter updates stay
    within a few times of how far BF16 autocast itself drifts from FP32 training (as the GPU tests bound)."""
    tol = TOLERANCES["gpu_bf16"]
    cfg = tiny_config(family, layers=3)
    base = make_model(cfg)
    init = {n: p.detach().clone() for n, p in base.named_parameters()}
    ref, fp32 = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref, opt_fp32 = adamw_for(ref, 1e-3, 0.1, fused=True), adamw_for(fp32, 1e-3, 0.1, fused=True)
    engine = Engine(copy.deepcopy(base), EngineConfig(device="cpu", compute_dtype="bfloat16", schedule=schedule,
                                                      chunk_mib=1 / 16), OptimConfig(lr=1e-3, weight_decay=0.1))
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        mb = random_batch(cfg.vocab_size, 3, 16, gen)
        ref_loss = reference_step(ref, opt_ref, [mb], None, autocast=torch.bfloat16)
        reference_step(fp32, opt_fp32, [mb], None)
        res = engine.train_step(mb)
        assert not res.skipped and abs(res.loss - ref_loss) <= tol["loss_rel"] * abs(ref_loss)
    trained = engine.hf_model()

    def updates(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([(p.detach().float() - init[n]).reshape(-1) for n, p in m.named_parameters()])

    d_engine, d_autocast = rel(updates(trained), updates(ref)), rel(updates(ref), updates(fp32))
    assert d_engine <= max(tol["update_rel_factor"] * d_autocast, tol["update_rel_floor"]), (d_engine, d_autocast)
    engine.close()


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_the_resident_gradient_scratch_lives_in_the_vocab_slots_idle_weights(family: str) -> None:
    """The overlap schedule's FP32 gradient scratch aliases the vocabulary slot's weights (runtime/resident.py): the
    engine counts no bytes for it, the slot is re-uploaded after a step wrote it (an eval right after a step sees the
    updated head, as the reference does), and the deferred schedule's clipped update gets a buffer of its own."""
    cfg = tiny_config(family, layers=4)
    ref = make_model(cfg)
    model = copy.deepcopy(ref)
    opt = adamw_for(ref, 1e-3, 0.1, fused=True)
    gen = torch.Generator().manual_seed(3)
    with Engine(model, EngineConfig(device="cpu", window=1, resident_layers=2, loss_chunk_tokens=16),
                OptimConfig(lr=1e-3, weight_decay=0.1)) as engine:
        res = engine.resident
        assert res is not None and res.aliased and res.deferred32 is None
        weights = engine.vocab_slot.weight
        assert res.grad32.untyped_storage().data_ptr() == weights.untyped_storage().data_ptr()
        own = sum(t.numel() * t.element_size() for t in [*res.flat.values(), *res.weight.values()])
        assert res.device_bytes() == own
        for _ in range(2):
            batch = random_batch(cfg.vocab_size, 3, 11, gen)
            reference_step(ref, opt, [batch], None)
            engine.train_step(batch)
            assert engine.vocab_slot.content is None  # the scratch wrote over the head: upload it again
            probe = random_batch(cfg.vocab_size, 3, 11, gen)
            mean, _ = engine.eval_loss(probe)
            with torch.no_grad():
                expect = ref(**probe).loss.item()
            assert abs(mean - expect) <= TOL["loss_rel"] * abs(expect)
    # Clipping: the deferred schedule's scaled gradient cannot use the head's memory (it runs in the next forward).
    ref = make_model(cfg)
    model = copy.deepcopy(ref)
    opt = adamw_for(ref, 1e-3, 0.1, fused=True)
    with Engine(model, EngineConfig(device="cpu", window=1, resident_layers=2, loss_chunk_tokens=16),
                OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=1e-3)) as engine:
        res = engine.resident
        for _ in range(2):
            batch = random_batch(cfg.vocab_size, 3, 11, gen)
            reference_step(ref, opt, [batch], 1e-3)
            engine.train_step(batch)
        assert res.deferred32 is not None
        assert res.deferred32.untyped_storage().data_ptr() != engine.vocab_slot.weight.untyped_storage().data_ptr()
        own = sum(t.numel() * t.element_size() for t in [*res.flat.values(), *res.weight.values(), *res.acc.values()])
        assert res.device_bytes() == own + res.deferred32.numel() * 4
        state = engine.state_dict()
        for name, p in ref.named_parameters():
            assert rel(state["params"][name], p.detach()) <= TOL["param_rel"], name
