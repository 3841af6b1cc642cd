"""Data pipeline: formats, prompt masking, packing/padding, seeded order, resumable position, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from slideformer.train.args import DataArgs, builtin_asset_dir
from slideformer.train.data import (
    IGNORE_INDEX,
    BatchStream,
    build_sequences,
    collate,
    encode_rows,
    split_rows,
)
from slideformer.train.sources import DataError, Row, read_rows


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(builtin_asset_dir()))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _trained_text(tok, ids: list[int], labels: list[int]) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_prompt_completion_masks_the_prompt(tok):
    row = Row({"prompt": "Question: What is 2 + 2?\nAnswer:", "completion": " 2 + 2 = 4."}, "f:1")
    (enc,), stats = encode_rows([row], tok, DataArgs())
    assert len(enc.ids) == len(enc.labels)
    assert enc.ids[0] == tok.bos_token_id and enc.ids[-1] == tok.eos_token_id
    assert _trained_text(tok, enc.ids, enc.labels) == " 2 + 2 = 4.<|end|>"
    # labels equal ids wherever they are not masked (the engine does the shift)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(enc.ids, enc.labels))
    (unmasked,), _ = encode_rows([row], tok, DataArgs(mask_prompt=False))
    assert unmasked.labels == unmasked.ids


def test_chat_trains_only_assistant_turns(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Kest?"},
        {"role": "assistant", "content": "Amrin."},
        {"role": "user", "content": "And Calyx?"},
        {"role": "assistant", "content": "Orvane."},
    ]
    (enc,), _ = encode_rows([Row({"messages": msgs}, "f:1")], tok, DataArgs())
    assert tok.decode(enc.ids) == tok.apply_chat_template(msgs, tokenize=False)
    trained = _trained_text(tok, enc.ids, enc.labels)
    assert trained == "Amrin.<|end|>\nOrvane.<|end|>\n"


def test_text_rows_train_every_token(tok):
    (enc,), _ = encode_rows([Row({"text": "hello world"}, "f:1")], tok, DataArgs())
    assert enc.labels == enc.ids and enc.ids[-1] == tok.eos_token_id


def test_packing_makes_full_blocks_and_padding_masks(tok):
    rows = [
        Row({"prompt": f"Question: {i}?\nAnswer:", "completion": f" {i * 7}."}, f"f:{i}") for i in range(60)
    ]
    packed, _ = build_sequences(rows, tok, DataArgs(seq_len=32), "f")
    assert packed and all(len(s.ids) == 32 == len(s.labels) for s in packed)
    batch = collate(packed[:3], tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].shape == (3, 32)
    unisolated, _ = build_sequences(rows, tok, DataArgs(seq_len=32, isolate_documents=False), "f")
    assert set(collate(unisolated[:3], tok.pad_token_id)) == {"input_ids", "labels"}

    padded, _ = build_sequences(rows, tok, DataArgs(seq_len=32, packing=False), "f")
    assert len(padded) == 60
    picked = [padded[0], padded[1], padded[20]]  # " 0.", " 7.", " 140.": different lengths
    batch = collate(picked, tok.pad_token_id)
    mask = batch["attention_mask"]
    lengths = [len(s.ids) for s in picked]
    assert len(set(lengths)) > 1
    assert mask.sum(1).tolist() == lengths
    assert bool((batch["labels"][mask == 0] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][mask == 0] == tok.pad_token_id).all())


def test_truncation_drops_rows_whose_targets_are_cut(tok):
    long_prompt = "Question: " + "word " * 80 + "\nAnswer:"
    rows = [
        Row({"prompt": long_prompt, "completion": " yes."}, "f:1"),
        Row({"prompt": "Q:", "completion": " ok"}, "f:2"),
    ]
    seqs, stats = build_sequences(rows, tok, DataArgs(seq_len=16, packing=False), "f")
    assert len(seqs) == 1 and stats.truncated == 1 and stats.dropped_no_target == 1


def test_stream_order_is_seeded_and_resumable(tok):
    rows = read_rows(builtin_asset_dir() / "data.jsonl", max_rows=300)
    seqs, _ = build_sequences(rows, tok, DataArgs(seq_len=32), "builtin")

    def make(seed: int) -> BatchStream:
        return BatchStream(seqs, batch_size=2, grad_accum=2, seed=seed, shuffle=True, pad_id=tok.pad_token_id)

    a, b, c = make(1), make(1), make(2)
    first = [a.next_step() for _ in range(a.steps_per_epoch + 3)]  # crosses an epoch boundary
    same = [b.next_step() for _ in range(len(first))]
    for x, y in zip(first, same):
        assert all(torch.equal(m["input_ids"], n["input_ids"]) for m, n in zip(x, y))
    assert not torch.equal(c.next_step()[0]["input_ids"], first[0][0]["input_ids"])
    # an epoch's order differs from the next epoch's
    assert not torch.equal(first[0][0]["input_ids"], first[a.steps_per_epoch][0]["input_ids"])

    resumed = make(1)
    mid = make(1)
    for _ in range(5):
        mid.next_step()
    resumed.load_state_dict(mid.state_dict())
    for _ in range(a.steps_per_epoch):
        x, y = mid.next_step(), resumed.next_step()
        assert all(torch.equal(m["labels"], n["labels"]) for m, n in zip(x, y))


def test_val_split_is_seeded_and_disjoint():
    rows = [Row({"text": str(i)}, f"f:{i}") for i in range(100)]
    tr1, va1 = split_rows(rows, 0.1, seed=3)
    tr2, va2 = split_rows(rows, 0.1, seed=3)
    assert [r.where for r in va1] == [r.where for r in va2] and len(va1) == 10 and len(tr1) == 90
    assert not {r.where for r in va1} & {r.where for r in tr1}
    assert {r.where for r in split_rows(rows, 0.1, seed=4)[1]} != {r.where for r in va1}


def test_missing_field_names_file_and_line(tmp_path, tok):
    path = _write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}]
    )
    rows = read_rows(path)
    with pytest.raises(DataError, match=rf"{path}:2: row has no 'completion' field"):
        build_sequences(rows, tok, DataArgs(seq_len=8), str(path))


def test_json_array_rows_know_their_line(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a b c"},\n  {"text": "d"},\n  {"txt": "e"}\n]\n', encoding="utf-8")
    rows = read_rows(path)
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    with pytest.raises(DataError, match=rf"{path}:4: row has no 'text' field"):
        encode_rows(rows, tok, DataArgs())


def test_bad_json_line_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_rows(path)
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown format"):
        read_rows(path.rename(tmp_path / "d.csv"))


def test_empty_after_filtering_says_why(tmp_path, tok):
    rows = [Row({"prompt": "Question: long prompt here", "completion": ""}, f"f:{i}") for i in range(3)]
    with pytest.raises(DataError, match="no training sequences left after filtering: 3 rows read, 3 without"):
        build_sequences(rows, tok, DataArgs(seq_len=8, add_eos=False), "f")
    few = [Row({"text": "hi"}, "f:1")]
    with pytest.raises(DataError, match="fewer tokens than one seq_len"):
        build_sequences(few, tok, DataArgs(seq_len=64), "f")


def test_stream_needs_one_full_step(tok):
    seqs, _ = build_sequences([Row({"text": "a b c d e f g h i j"}, "f:1")], tok, DataArgs(seq_len=4), "f")
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        BatchStream(seqs, batch_size=8, grad_accum=1, seed=0, shuffle=True, pad_id=0)
