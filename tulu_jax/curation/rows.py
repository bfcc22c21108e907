"""Rows in and out for the data commands.

Input: any file the trainers read (JSONL, Parquet, a `datasets.save_to_disk` folder), each row a JSON object
located as "<path> line N" / "<path> row N". Output, two ways:
- `write_rows`: a whole result written to a temporary name and renamed into place, so a killed run leaves
  either nothing or the complete file (and rerunning the same command writes the same file);
- `ResumableJsonl`: rows appended one by one as model calls finish, flushed per row; a restarted run cuts a
  torn last line, skips every key already written (or recorded as skipped) and does only the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tulu_jax.data.chat import DataError
from tulu_jax.data.sources import iter_raw_rows

ON_BAD_ROW = ("error", "skip")


def iter_rows(path: str | Path, *, on_bad_row: str = "error", counts: dict[str, Any] | None = None):
    """Yields (where, row) for every JSON-object row of one file or folder, in order. A line that is not
    JSON, not UTF-8 or not an object raises DataError (naming file and line) under on_bad_row="error", or is
    counted in `counts["rows_skipped"][reason]` under "skip". Raises FileNotFoundError for a missing path,
    DataError for an unsupported file type."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    counts = {} if counts is None else counts
    counts.setdefault("rows_read", 0)
    skipped = counts.setdefault("rows_skipped", {})
    for where, row in iter_raw_rows(path):
        counts["rows_read"] += 1
        if not isinstance(row, (dict, DataError)):
            row = DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "not_an_object")
        if isinstance(row, DataError):
            if on_bad_row == "error":
                raise row
            skipped[row.reason] = skipped.get(row.reason, 0) + 1
            continue
        yield where, row


def _turns_text(messages: Any, where: str, field: str, role: str = "user") -> str:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages", "bad_messages")
    parts = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: {field}[{k}] must be an object with string 'role' and 'content'", "bad_messages")
        if m["role"] == role:
            parts.append(m["content"])
    if not parts:
        raise DataError(f"{where}: field {field!r} has no {role} turn", "no_user_turn")
    return "\n".join(parts)


PROMPT_FIELDS = ("messages", "chosen", "prompt")


def user_text(row: dict, where: str) -> str:
    """The text a row asks: its user turns joined by newlines, from `messages` (SFT and RLVR rows), else
    `chosen` (preference rows; the rejected side shares the prompt), else a string `prompt`. Raises
    DataError naming `where` and the field when none is usable."""
    for field in PROMPT_FIELDS:
        if field in row and row[field] is not None:
            value = row[field]
            if field == "prompt":
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where}: field 'prompt' must be a non-empty string", "bad_prompt")
                return value
            return _turns_text(value, where, field)
    raise DataError(f"{where}: no prompt field (expected one of {', '.join(PROMPT_FIELDS)})", "no_prompt")


def _write_jsonl(path: str, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def _write_to(tmp: str, path: str, rows: Iterable[dict]) -> int:
    """Writes `rows` to `tmp` in the format `path`'s name asks for -> the number of rows."""
    if path.endswith(".jsonl"):
        return _write_jsonl(tmp, rows)
    import datasets

    rows = list(rows)
    # JSON-encode through a JSONL file so mixed or nested fields get the schema datasets infers for them.
    _write_jsonl(tmp + ".jsonl", rows)
    try:
        ds = datasets.Dataset.from_json(tmp + ".jsonl") if rows else datasets.Dataset.from_list([])
    finally:
        os.remove(tmp + ".jsonl")
    if path.endswith(".parquet"):
        ds.to_parquet(tmp)
    else:
        ds.save_to_disk(tmp)
    return len(rows)


def write_rows(path: str | Path, rows: Iterable[dict]) -> int:
    """Writes `rows` to `path` whole -> the number of rows. The format follows the name: `.jsonl`,
    `.parquet`, anything else a `datasets.save_to_disk` folder. Written under a temporary name in the same
    folder and renamed into place, so a killed run never leaves a partial output (an exception or Ctrl-C
    while `rows` is consumed also removes the temporary; only a hard kill can leave a hidden
    `.NAME.partial-PID` next to it)."""
    path = str(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        n = _write_to(tmp, path, rows)
    except BaseException:  # an error or Ctrl-C while rows are produced: leave no temporary behind either
        for p in (tmp, tmp + ".jsonl"):
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
        raise
    if os.path.isdir(path) and not path.endswith((".jsonl", ".parquet")):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return n


class ResumableJsonl:
    """An output JSONL written row by row by many threads, resumable after a kill.

    `key(row)` names what a row was made from (a prompt id, a persona index); keys already in `path`, or in
    `<path>.skipped.jsonl` (rows given up on for good, with the reason), are in `done` when the object is
    made, so a restarted command skips them. A torn last line (a kill mid-write) is cut away and its row
    made again (`repaired_torn_row`). `overwrite=True` starts both files afresh. Raises DataError naming the
    file and line when a complete line is not a JSON object with a key, i.e. not an output of this command."""

    def __init__(self, path: str | Path, key: Callable[[dict], str], *, overwrite: bool = False):
        self.path, self.skipped_path, self.key = str(path), f"{path}.skipped.jsonl", key
        if not self.path.endswith(".jsonl"):
            raise DataError(f"{self.path}: row-by-row outputs are JSONL: name it *.jsonl", "bad_output")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        self.done: set[str] = set()
        self.rows: list[dict] = []  # the rows already in `path` (dedup state is rebuilt from them)
        self.repaired_torn_row = False
        for p in (self.path, self.skipped_path):
            if overwrite and os.path.exists(p):
                os.remove(p)
            if os.path.exists(p):
                self._resume(p)
        self._lock = threading.Lock()
        self._out = open(self.path, "a", encoding="utf-8")
        self._skips = open(self.skipped_path, "a", encoding="utf-8")
        self.written = self.skipped = 0

    def _resume(self, path: str) -> None:
        with open(path, "rb") as f:
            data = f.read()
        *complete, tail = data.split(b"\n")
        for n, line in enumerate(complete, 1):
            try:
                row = json.loads(line)
                k = self.key(row) if path == self.path else row["key"]
            except (ValueError, KeyError, TypeError):
                raise DataError(
                    f"{path} line {n}: not a row this command wrote; pass --overwrite or another --out", "bad_output"
                ) from None
            self.done.add(str(k))
            if path == self.path:
                self.rows.append(row)
        if tail:
            with open(path, "rb+") as f:
                f.truncate(len(data) - len(tail))
            self.repaired_torn_row = True

    def append(self, row: dict) -> None:
        """Writes one finished row (flushed at once, so a kill loses at most the line being written)."""
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()
            self.done.add(str(self.key(row)))
            self.written += 1

    def skip(self, key: str, reason: str, **detail: Any) -> None:
        """Records that `key` was given up on for good (a duplicate, output still malformed after retries),
        so a restarted command does not try it again."""
        line = json.dumps({"key": str(key), "reason": reason, **detail}, ensure_ascii=False) + "\n"
        with self._lock:
            self._skips.write(line)
            self._skips.flush()
            self.done.add(str(key))
            self.skipped += 1

    def close(self) -> None:
        """Syncs and closes both files."""
        with self._lock:
            for f in (self._out, self._skips):
                if not f.closed:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_table(header: list[str], rows: Iterable[Iterable[Any]], title: str | None = None) -> str:
    """A plain-text table with right-aligned numbers, for the summary each data command prints."""
    body = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if c.replace(".", "", 1).replace("-", "", 1).isdigit() else c.ljust(w)
            for c, w in zip(cells, widths)
        ).rstrip()

    out = ([title] if title else []) + [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]
    return "\n".join(out)


def read_all(paths: Iterable[str], *, on_bad_row: str, counts: dict[str, Any]) -> Iterator[tuple[str, dict]]:
    """`iter_rows` over several paths in order, sharing `counts`."""
    for p in paths:
        yield from iter_rows(p, on_bad_row=on_bad_row, counts=counts)
