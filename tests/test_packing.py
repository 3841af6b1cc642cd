"""Packing with isolated documents: position ids restart per row, so each row attends only to itself.

The property: training on packed blocks equals training on the rows one by one (same logits per row,
same loss), with the engine matching plain PyTorch on such batches.
"""

from __future__ import annotations

import copy

import torch
from tests.reference import adamw_for, make_model, reference_step, rel, tiny_config
from tests.tolerances import TOLERANCES

from slideformer import Engine, EngineConfig, OptimConfig
from slideformer.train.data import IGNORE_INDEX, Encoded, collate, pack

TOL = TOLERANCES["cpu_fp32"]


def _docs(lengths: list[int], vocab: int = 1000, seed: int = 0) -> list[Encoded]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=gen).tolist()
        out.append(Encoded(ids, list(ids)))
    return out


def test_positions_restart_per_document_and_cross_document_targets_are_dropped():
    blocks = pack(_docs([5, 6, 5]), 8)
    assert [b.positions for b in blocks] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert blocks[0].labels[5] == IGNORE_INDEX and blocks[1].labels[3] == IGNORE_INDEX
    assert blocks[0].labels[4] != IGNORE_INDEX and blocks[1].labels[2] != IGNORE_INDEX
    plain = pack(_docs([5, 6, 5]), 8, isolate=False)
    assert all(b.positions is None for b in plain) and plain[0].labels[5] != IGNORE_INDEX
    batch = collate(blocks, pad_id=0)
    assert batch["position_ids"].tolist() == [b.positions for b in blocks] and "attention_mask" not in batch


def test_a_packed_row_gives_each_document_its_own_logits():
    model = make_model(tiny_config("llama")).eval()
    docs = _docs([7, 4, 9])
    (block,) = pack(docs, 20)
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([block.ids]), position_ids=torch.tensor([block.positions]),
                       use_cache=False).logits[0]  # transformers detects packing only without a cache
        start = 0
        for d in docs:
            alone = model(input_ids=torch.tensor([d.ids])).logits[0]
            torch.testing.assert_close(packed[start:start + len(d.ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(d.ids)


def test_engine_trains_isolated_packs_like_plain_pytorch():
    cfg = tiny_config("llama")
    ref = make_model(cfg)
    model = copy.deepcopy(ref)
    opt = adamw_for(ref, 1e-3, 0.1, fused=True)
    engine = Engine(model, EngineConfig(device="cpu", window=2, loss_chunk_tokens=16), OptimConfig(lr=1e-3,
                    weight_decay=0.1))
    try:
        for step in range(3):
            blocks = pack(_docs([9, 13, 5, 11, 8, 10, 7], seed=step), 21)
            batch = collate(blocks, pad_id=0)
            ref_loss = reference_step(ref, opt, [batch], None)
            res = engine.train_step(batch)
            assert abs(res.loss - ref_loss) <= TOL["loss_rel"] * abs(ref_loss), (step, res.loss, ref_loss)
        state = engine.state_dict()
        for name, p in ref.named_parameters():
            assert rel(state["params"][name], p.detach()) <= TOL["param_rel"], name
    finally:
        engine.close()
