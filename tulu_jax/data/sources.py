"""Reading chat rows from JSONL, Parquet or a local `datasets.save_to_disk` folder, with validation.

Every row is located as "<path> line N" (JSONL, 1-based line) or "<path> row N" (1-based row of a
table), so a bad row can be found and fixed.
"""

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tulu_jax.config import ON_BAD_ROW
from tulu_jax.data.chat import DataError, validate_messages

T = TypeVar("T")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:  # bytes, so that one line that is not UTF-8 is a bad row, not a crash
        for n, raw in enumerate(f, start=1):
            where = f"{path} line {n}"
            try:  # a UTF-8 byte-order mark (Windows editors write one) may open the file
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not UTF-8 text (byte {e.start + 1})", "not_utf8")
                continue
            if not line.strip():  # Blank lines (e.g. a trailing newline) are not rows.
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})", "invalid_json")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})", "bad_file") from None
    n = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path} row {n}", row


def _hf_folder_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        msg = "not a datasets.save_to_disk folder (nor a .jsonl or .parquet file)"
        raise DataError(f"{path}: {msg}: {str(e).strip().splitlines()[0]}", "bad_file") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(
                f"{path}: a DatasetDict with splits {sorted(ds)}; pass one split's folder, e.g. {path}/train",
                "bad_file",
            )
        ds = next(iter(ds.values()))
    for n, row in enumerate(ds, start=1):
        yield f"{path} row {n}", row


def iter_raw_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yields (where, row) for one file; `row` is a DataError for an unparsable JSONL line."""
    path = Path(path)
    if path.is_dir():
        return _hf_folder_rows(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise DataError(f"{path}: unsupported file type (expected .jsonl, .parquet or a datasets folder)", "bad_file")


def iter_valid_rows(
    files: Sequence[str | Path], on_bad_row: str, counts: dict[str, Any], parse: Callable[[Any, str], T]
) -> Iterator[T]:
    """Yields `parse(row, where)` for every row of `files` in order (streaming, so big files fit in memory).

    Updates `counts` in place: `rows_read` and `rows_skipped` (reason -> count). A row that `parse`
    rejects with a DataError stops the run under on_bad_row="error" and is only counted under "skip".
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    counts.setdefault("rows_read", 0)
    skipped = counts.setdefault("rows_skipped", {})
    for path in files:
        for where, row in iter_raw_rows(path):
            counts["rows_read"] += 1
            try:
                if isinstance(row, DataError):
                    raise row
                parsed = parse(row, where)
            except DataError as e:
                if on_bad_row == "error":
                    raise
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            yield parsed


def iter_conversations(
    files: Sequence[str | Path], on_bad_row: str, counts: dict[str, Any]
) -> Iterator[list[dict[str, str]]]:
    """The validated conversations (`messages`) of `files`, in order; see `iter_valid_rows`."""
    return iter_valid_rows(files, on_bad_row, counts, validate_messages)
