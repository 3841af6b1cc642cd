"""Reading dataset rows from local files, each row tagged with where it came from.

Owns the file formats: JSON Lines, a JSON array, Parquet (needs ``pyarrow``) and a directory written by
``datasets.Dataset.save_to_disk`` (needs ``datasets``). Invariant: every row handed on is a ``dict`` and
carries ``where`` ("file:line" for JSON formats, "file:row N" otherwise), so any later complaint about
a row can name its origin.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slideformer.errors import SlideformerError


class DataError(SlideformerError, ValueError):
    """A dataset file is missing, unreadable, malformed, or yields no usable rows."""


@dataclass(frozen=True)
class Row:
    """One dataset record and its origin."""

    data: dict[str, Any]
    """The record's fields."""
    where: str
    """'file:line' (JSON Lines, JSON) or 'file:row N' (Parquet, datasets)."""


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply to read") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            yield Row(obj, f"{path}:{lineno}")


def _json_rows(path: Path) -> Iterator[Row]:
    """Elements of a top-level JSON array, with the line each element starts on."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip_ws(0)
    if i >= n or text[i] != "[":
        raise DataError(f"{path}: expected a JSON array of objects (use .jsonl for one object per line)")
    i = skip_ws(i + 1)
    if i < n and text[i] == "]":
        return
    while True:
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{line}: JSON nested too deeply to read") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        yield Row(obj, f"{path}:{line}")
        i = skip_ws(i)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
        elif i < n and text[i] == "]":
            return
        else:
            raise DataError(
                f"{path}:{text.count(chr(10), 0, i) + 1}: expected ',' or ']' after an array element"
            )


def _parquet_rows(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq  # optional dependency
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            index += 1
            yield Row(obj, f"{path}:row {index}")


def _datasets_rows(path: Path) -> Iterator[Row]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(
            f"{path} is a directory; reading a dataset saved with save_to_disk needs the datasets package "
            "(pip install datasets), or export it to .jsonl"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    for index, obj in enumerate(ds, start=1):
        yield Row(dict(obj), f"{path}:row {index}")


def read_rows(path: str | Path, max_rows: int = 0) -> list[Row]:
    """All rows of a dataset file or saved-dataset directory (at most ``max_rows`` when > 0).

    Raises:
        DataError: the path is missing or unreadable, a record is malformed, or the format is unknown.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"dataset {p} does not exist")
    if p.is_dir():
        it = _datasets_rows(p)
    else:
        suffix = p.suffix.lower()
        readers = {
            ".jsonl": _jsonl_rows,
            ".ndjson": _jsonl_rows,
            ".json": _json_rows,
            ".parquet": _parquet_rows,
        }
        if suffix not in readers:
            raise DataError(
                f"dataset {p}: unknown format {suffix!r} (use .jsonl, .json, .parquet or a directory)"
            )
        it = readers[suffix](p)
    rows: list[Row] = []
    try:
        for row in it:
            rows.append(row)
            if max_rows and len(rows) >= max_rows:
                break
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"dataset {p} could not be read: {e}") from e
    return rows
