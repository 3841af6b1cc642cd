"""``engine.embedding_update='split'`` trains bitwise like one whole-matrix embedding update.

The split update (``runtime/embedding_split.py``) updates the rows outside the batch early (untied: zero
gradient; tied: the head's gradient) and the batch's rows after the embedding backward. On the CPU (which
plays the device) losses, every parameter and both moments must be *equal* to ``'whole'`` over several steps:
tied and untied heads, a padding row (phi3), an embedding scale (gemma2), FP32 and BF16 compute with the BF16
upload copy, optimizer chunks smaller than the matrix, resident layers, and with evaluation and a checkpoint
round trip between steps. The deferred schedule (clipping) keeps the whole update, and the split is really
taken (its device buffer exists) without keeping anything aside on the host.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.reference import make_model, random_batch, tiny_config

from slideformer import Engine, EngineConfig, OptimConfig


def _engine(model: torch.nn.Module, update: str, dtype: str = "float32", max_norm: float | None = None,
            **kw: object) -> Engine:
    cfg = EngineConfig(device="cpu", compute_dtype=dtype, embedding_update=update, loss_chunk_tokens=16,
                       **{"chunk_mib": 1 / 64, **kw})
    return Engine(copy.deepcopy(model), cfg, OptimConfig(lr=1e-3, weight_decay=0.1, max_grad_norm=max_norm))


def _state(engine: Engine) -> dict[str, dict[str, torch.Tensor]]:
    sd = engine.state_dict()
    return {part: {k: v.clone() for k, v in sd[part].items()} for part in ("params", "exp_avg", "exp_avg_sq")}


def _run(engine: Engine, vocab: int, steps: int, *, eval_every: int = 0, seq: int = 11,
         norms: list[float] | None = None) -> list[float]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for step in range(steps):
        res = engine.train_step(random_batch(vocab, 3, seq, gen))
        out.append(res.loss)
        if norms is not None:
            norms.append(res.grad_norm)
        if eval_every and step % eval_every == 0:
            out.append(engine.eval_loss(random_batch(vocab, 2, seq, gen))[0])
    return out


def _compare(family: str, steps: int = 4, **kw: object) -> Engine:
    cfg = tiny_config(family, vocab=512)
    model = make_model(cfg)
    runs, norms = {}, {}
    for update in ("whole", "split"):
        engine = _engine(model, update, **kw)
        try:
            norms[update] = []
            losses = _run(engine, cfg.vocab_size, steps, eval_every=2, norms=norms[update])
            runs[update] = (losses, _state(engine), engine.embed_split is not None)
        finally:
            engine.close()
    assert runs["whole"][0] == runs["split"][0]
    # The reported norm sums the same squares in another grouping (rows outside / inside the batch).
    assert norms["split"] == pytest.approx(norms["whole"], rel=1e-5)
    for part, tensors in runs["whole"][1].items():
        for name, t in tensors.items():
            assert torch.equal(t, runs["split"][1][part][name]), (family, part, name)
    assert not runs["whole"][2] and runs["split"][2]
    return engine


@pytest.mark.parametrize("family", ["llama", "llama_tied", "phi3", "gemma2"])
def test_split_equals_whole_fp32(family: str) -> None:
    _compare(family)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_split_equals_whole_bf16_with_upload_copy(family: str) -> None:
    _compare(family, dtype="bfloat16", host_copy="bf16")


def test_split_equals_whole_with_resident_layers_and_one_big_chunk() -> None:
    _compare("llama_tied", resident_layers=1, chunk_mib=4)


def test_split_with_checkpoint_round_trip() -> None:
    """Save after 2 steps, load into a fresh engine, 2 more steps: equal to 4 uninterrupted steps."""
    cfg = tiny_config("llama_tied", vocab=512)
    model = make_model(cfg)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batches_a = [random_batch(cfg.vocab_size, 3, 11, gen_a) for _ in range(4)]
    batches_b = [random_batch(cfg.vocab_size, 3, 11, gen_b) for _ in range(4)]
    straight = _engine(model, "split")
    try:
        for b in batches_a:
            straight.train_step(b)
        want = _state(straight)
    finally:
        straight.close()
    first = _engine(model, "split")
    try:
        for b in batches_b[:2]:
            first.train_step(b)
        saved = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                 for k, v in first.state_dict().items()}
    finally:
        first.close()
    second = _engine(model, "split")
    try:
        second.load_state_dict(saved)
        for b in batches_b[2:]:
            second.train_step(b)
        got = _state(second)
    finally:
        second.close()
    for part, tensors in want.items():
        for name, t in tensors.items():
            assert torch.equal(t, got[part][name]), (part, name)


def test_deferred_schedule_keeps_the_whole_update() -> None:
    """With clipping every update waits for the global norm: the split has nothing to overlap and is not
    used; results are still those of 'whole'."""
    _compare("llama", max_norm=0.5)


def test_rows_buffer_is_sized_by_the_batch_and_nothing_is_kept_aside_on_the_host() -> None:
    cfg = tiny_config("llama", vocab=512)
    engines = {u: _engine(make_model(cfg), u, max_tokens_per_micro_batch=64) for u in ("whole", "split")}
    try:
        split = engines["split"].embed_split
        assert split is not None and split.capacity == 64  # the device buffer: the largest micro-batch
        ids = torch.tensor([[5, 9, 5, 7, 9, 9]])
        for engine in engines.values():
            engine.train_step({"input_ids": ids, "labels": ids})
            _run(engine, cfg.vocab_size, 1, seq=40)  # 120 tokens: the device buffer grows between steps
        assert split.capacity == 120
        # The batch's rows are updated in place: the split holds no host buffers beyond the whole update's.
        reports = {u: e.memory_report() for u, e in engines.items()}
        assert reports["split"]["staging_bytes"] == reports["whole"]["staging_bytes"]
    finally:
        for engine in engines.values():
            engine.close()


def test_auto_splits_an_untied_embedding_and_keeps_a_tied_one_whole() -> None:
    for family, auto in (("llama", True), ("llama_tied", False)):
        for update, split in (("auto", auto), ("whole", False), ("split", True)):
            engine = _engine(make_model(tiny_config(family, vocab=512)), update)
            try:
                assert (engine.embed_split is not None) is split, (family, update)
            finally:
                engine.close()


def test_planner_counts_the_rows_gradient_where_the_split_runs() -> None:
    from slideformer.planner import Hardware, make_plan

    hw = Hardware(gpu_memory_bytes=80 << 30, host_memory_bytes=1 << 40)
    key = "embedding rows' gradient (split update)"

    def plan(family: str, clipping: bool, update: str = "auto"):
        return make_plan(tiny_config(family, vocab=512), seq_len=16, batch_size=4, grad_accum=1, clipping=clipping,
                         engine=EngineConfig(device="cuda", embedding_update=update), hardware=hw)

    tied = plan("llama_tied", clipping=False, update="split")
    assert tied.gpu[key] == 64 * 64 * 2  # 64 tokens -> at most 64 rows of 64 BF16 gradients
    assert not any("split" in k for k in tied.host)  # the rows are updated in place: nothing kept aside
    assert key not in plan("llama_tied", clipping=True, update="split").gpu  # deferred schedule: whole update
    assert key not in plan("llama_tied", clipping=False).gpu  # 'auto' keeps a tied embedding whole
    assert key in plan("llama", clipping=False).gpu  # and splits an untied one
    assert key in plan("llama", clipping=False, update="split").gpu


def test_hidden_size_off_the_kernel_width_keeps_the_whole_update() -> None:
    """A call's last n % 8 elements take torch's scalar-tail arithmetic, so with a hidden size off that width
    the two paths would round a few elements differently: the engine keeps the whole update there."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=52, intermediate_size=104, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=26, vocab_size=509, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = make_model(cfg)
    states = []
    for update in ("whole", "split"):
        engine = _engine(model, update)
        try:
            assert engine.embed_split is None
            _run(engine, cfg.vocab_size, 3)
            states.append(_state(engine))
        finally:
            engine.close()
    for part, tensors in states[0].items():
        for name, t in tensors.items():
            assert torch.equal(t, states[1][part][name]), (part, name)
