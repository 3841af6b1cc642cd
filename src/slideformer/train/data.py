"""From dataset rows to the engine's micro-batches: tokenize, mask prompts, pack or pad, shuffle by seed.

Owns the label convention handed to the engine: ``labels`` are *unshifted* (as for an HF causal LM;
the engine shifts), with -100 on prompt tokens, non-assistant chat turns and padding. Invariants: the
sequence of batches is a pure function of (data, tokenizer, config, seed, epoch, position), so a run
restored from ``BatchStream.state_dict()`` sees exactly the batches it would have seen; and every
sequence handed out has at least one trainable label.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slideformer.train.args import DataArgs
from slideformer.train.sources import DataError, Row

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized row (or packed block): token ids and unshifted labels of the same length."""

    ids: list[int]
    labels: list[int]
    positions: list[int] | None = None
    """Position ids of a packed block whose documents are isolated (restarting at 0 per document)."""


@dataclass
class DataStats:
    """What happened to the rows on the way to sequences (for messages and run metadata)."""

    rows: int = 0
    dropped_no_target: int = 0
    truncated: int = 0
    tokens: int = 0
    sequences: int = 0
    sources: list[str] = field(default_factory=list)


def detect_format(row: Row, args: DataArgs) -> str:
    """The row format named by ``args.format``, or guessed from the first row's fields when 'auto'."""
    if args.format != "auto":
        return args.format
    keys = row.data.keys()
    if args.messages_field in keys:
        return "chat"
    if args.prompt_field in keys and args.completion_field in keys:
        return "prompt_completion"
    if args.text_field in keys:
        return "text"
    raise DataError(
        f"{row.where}: cannot tell the data format from fields {sorted(keys)}; expected "
        f"'{args.text_field}', '{args.prompt_field}'+'{args.completion_field}' or '{args.messages_field}' "
        "(set data.format and the data.*_field names)"
    )


def _field(row: Row, name: str, kind: type) -> Any:
    if name not in row.data:
        raise DataError(f"{row.where}: row has no '{name}' field (fields: {', '.join(sorted(row.data))})")
    value = row.data[name]
    if not isinstance(value, kind):
        raise DataError(f"{row.where}: field '{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _render_chat(row: Row, tokenizer: Any, args: DataArgs) -> tuple[str, list[tuple[int, int]]]:
    """The chat rendered by the tokenizer's template, and the character spans of assistant turns."""
    messages = _field(row, args.messages_field, list)
    if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{row.where}: '{args.messages_field}' must be a non-empty list of {{role, content}}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{row.where}: chat rows need a tokenizer with a chat_template; this one has none")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{row.where}: the chat template does not render conversations prefix by prefix, so "
                "assistant "
                "turns cannot be located; set data.mask_prompt=false to train on every token"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_rows(rows: Sequence[Row], tokenizer: Any, args: DataArgs) -> tuple[list[Encoded], DataStats]:
    """Tokenize rows into (ids, labels); rows without any trainable token are dropped and counted."""
    stats = DataStats(rows=len(rows))
    if not rows:
        return [], stats
    fmt = detect_format(rows[0], args)
    texts: list[str] = []
    spans: list[list[tuple[int, int]] | None] = []  # character spans that carry loss; None: all
    for row in rows:
        if fmt == "text":
            texts.append(_field(row, args.text_field, str))
            spans.append(None)
        elif fmt == "prompt_completion":
            prompt = _field(row, args.prompt_field, str)
            completion = _field(row, args.completion_field, str)
            texts.append(prompt + completion)
            spans.append([(len(prompt), len(prompt) + len(completion))] if args.mask_prompt else None)
        else:
            text, chat_spans = _render_chat(row, tokenizer, args)
            texts.append(text)
            spans.append(chat_spans if args.mask_prompt else None)
    # Chat templates write their own BOS into the text; plain text gets the tokenizer's special tokens.
    enc = tokenizer(texts, add_special_tokens=fmt != "chat", return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    out: list[Encoded] = []
    for ids, offsets, keep in zip(enc["input_ids"], enc["offset_mapping"], spans):
        ids = list(ids)
        if keep is None:
            labels = list(ids)
        else:
            labels = [
                t if any(s < b and e > a for a, b in keep) else IGNORE_INDEX  # token overlaps a kept span
                for t, (s, e) in zip(ids, offsets)
            ]
        if args.add_eos and fmt != "chat" and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        if all(lab == IGNORE_INDEX for lab in labels[1:]):  # position 0 is never a target after the shift
            stats.dropped_no_target += 1
            continue
        stats.tokens += len(ids)
        out.append(Encoded(ids, labels))
    return out, stats


def pack(encoded: Sequence[Encoded], seq_len: int, isolate: bool = True) -> list[Encoded]:
    """Concatenate rows and cut the stream into ``seq_len`` blocks (the incomplete tail is dropped).

    ``isolate``: each block carries position ids that restart at 0 at every document start (and at the
    block start, for a document cut by the previous block), and the first token of each document is not
    a target (it would be predicted from the previous document). Given position ids and no attention
    mask, transformers builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``),
    so a document attends only to itself, with its own RoPE positions: the same training as unpacked
    rows. Otherwise attention is causal over the whole block (rows separated only by EOS).
    """
    ids = [t for e in encoded for t in e.ids]
    labels = [t for e in encoded for t in e.labels]
    pos = [i for e in encoded for i in range(len(e.ids))]
    blocks = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        lab = labels[start : start + seq_len]
        positions = None
        if isolate:
            positions = _restart_positions(pos[start : start + seq_len])
            lab = [IGNORE_INDEX if k > 0 and p == 0 else t for k, (t, p) in enumerate(zip(lab, positions))]
        if any(x != IGNORE_INDEX for x in lab[1:]):
            blocks.append(Encoded(ids[start : start + seq_len], lab, positions))
    return blocks


def _restart_positions(doc_pos: list[int]) -> list[int]:
    """Positions within each document, counted from the block start for the document cut by it."""
    out, offset = [], doc_pos[0] if doc_pos else 0
    for p in doc_pos:
        if p == 0:
            offset = 0
        out.append(p - offset)
    return out


def truncate(encoded: Sequence[Encoded], seq_len: int, stats: DataStats) -> list[Encoded]:
    """One sequence per row, cut to ``seq_len``; rows whose targets all fall past the cut are dropped."""
    out = []
    for e in encoded:
        if len(e.ids) > seq_len:
            stats.truncated += 1
            e = Encoded(e.ids[:seq_len], e.labels[:seq_len])
            if all(x == IGNORE_INDEX for x in e.labels[1:]):
                stats.dropped_no_target += 1
                continue
        out.append(e)
    return out


def build_sequences(
    rows: Sequence[Row], tokenizer: Any, args: DataArgs, what: str
) -> tuple[list[Encoded], DataStats]:
    """Rows -> training sequences (packed or truncated), raising if nothing usable is left.

    Args:
        rows: the dataset rows.
        tokenizer: an HF fast tokenizer (offset mapping is needed for prompt masking).
        args: the data section of the config.
        what: a name for messages, e.g. the file path.
    """
    encoded, stats = encode_rows(rows, tokenizer, args)
    seqs = (pack(encoded, args.seq_len, args.isolate_documents) if args.packing
            else truncate(encoded, args.seq_len, stats))
    stats.sequences = len(seqs)
    if not seqs:
        reason = (
            f"{stats.rows} rows read, {stats.dropped_no_target} without trainable tokens, "
            f"{stats.tokens} tokens in the rest"
        )
        hint = (
            f" (fewer tokens than one seq_len={args.seq_len} block; lower data.seq_len)"
            if args.packing
            else ""
        )
        raise DataError(f"{what}: no training sequences left after filtering: {reason}{hint}")
    return seqs, stats


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, val): a seeded random ``fraction`` of the rows goes to validation (at least one row)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    n_val = max(1, int(round(len(rows) * fraction)))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val_idx], [rows[i] for i in sorted(val_idx)]


def collate(seqs: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch: input_ids, labels [B, S] (right-padded to the longest), attention_mask if padded."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        labels[i, : len(s.labels)] = torch.tensor(s.labels, dtype=torch.long)
        mask[i, : len(s.ids)] = 1
    batch = {"input_ids": ids, "labels": labels}
    if not bool(mask.all()):
        batch["attention_mask"] = mask
    elif all(s.positions is not None for s in seqs):  # packed blocks (all seq_len long): documents isolated
        batch["position_ids"] = torch.tensor([s.positions for s in seqs], dtype=torch.long)
    return batch


class BatchStream:
    """Optimizer steps' worth of micro-batches, epoch after epoch, in a seeded order; resumable.

    ``state_dict()`` is the position (epoch, next sequence index); a stream restored from it yields the
    same steps as the original would have. An incomplete last step of an epoch is skipped.
    """

    def __init__(
        self, seqs: list[Encoded], *, batch_size: int, grad_accum: int, seed: int, shuffle: bool, pad_id: int
    ) -> None:
        self.seqs = seqs
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.per_step = batch_size * grad_accum
        self.steps_per_epoch = len(seqs) // self.per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(seqs)} training sequences are fewer than one optimizer step needs "
                f"(train.batch_size x train.grad_accum = {self.per_step}); lower them or add data"
            )
        self.epoch = 0
        self.index = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.seqs)))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.seqs), generator=gen).tolist()

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next optimizer step (``grad_accum`` dicts of ``batch_size`` rows)."""
        if self.index + self.per_step > len(self.seqs):
            self.epoch += 1
            self.index = 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.index : self.index + self.per_step]
        self.index += self.per_step
        return [
            collate([self.seqs[j] for j in idx[k : k + self.batch_size]], self.pad_id)
            for k in range(0, self.per_step, self.batch_size)
        ]

    def state_dict(self) -> dict[str, int]:
        """The position in the stream."""
        return {"epoch": self.epoch, "index": self.index, "num_sequences": len(self.seqs)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by ``state_dict`` (the data must be the same)."""
        if int(state["num_sequences"]) != len(self.seqs):
            raise DataError(
                f"the checkpoint's data had {state['num_sequences']} sequences, this run's has "
                f"{len(self.seqs)}; "
                "resume needs the same data and data settings"
            )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = self._epoch_order(self.epoch)


def eval_batches(
    seqs: list[Encoded], batch_size: int, max_batches: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Validation micro-batches in file order (``max_batches`` of them when > 0)."""
    n = 0
    for start in range(0, len(seqs), batch_size):
        if max_batches and n >= max_batches:
            return
        yield collate(seqs[start : start + batch_size], pad_id)
        n += 1
