"""Rows in and out for the data commands.

Input: any file the trainers read (JSONL, Parquet, a `datasets.save_to_disk` folder), each row a JSON object
located as "<path> line N" / "<path> row N". Output, two ways:
- `write_rows`: a whole result written to a temporary name and renamed into place, so a killed run leaves
  either nothing or the complete file (and rerunning the same command writes the same JSONL or Parquet
  file); `check_output` checks such an output path before any work;
- `ResumableJsonl`: rows appended one by one as model calls finish, flushed per row; a restarted run cuts a
  torn last line, skips every key already written (or recorded as skipped) and does only the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tulu_jax.data.chat import DataError
from tulu_jax.data.sources import iter_valid_rows


def iter_rows(
    path: str | Path, *, on_bad_row: str = "error", counts: dict[str, Any] | None = None
) -> Iterator[tuple[str, dict]]:
    """Yields (where, row) for every JSON-object row of one file or folder, in order. A line that is not
    JSON, not UTF-8 or not an object raises DataError (naming file and line) under on_bad_row="error", or is
    counted in `counts["rows_skipped"][reason]` under "skip". Raises FileNotFoundError for a missing path,
    DataError for an unsupported file type. (`tulu_jax.data.sources.iter_valid_rows` with an object check.)"""
    return iter_valid_rows([path], on_bad_row, {} if counts is None else counts, _json_object)


def _json_object(row: Any, where: str) -> tuple[str, dict]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}", "not_an_object")
    return where, row


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


OUTPUT_SUFFIXES = (".jsonl", ".parquet")
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json")


def output_format(path: str, flag: str = "--out") -> str:
    """The format a name asks for: "jsonl", "parquet", or "folder" (a `datasets.save_to_disk` folder) for
    a name without a suffix or ending in /. Raises InputError naming `flag` for a suffix in the wrong case
    (`.JSONL`: the readers know only the lower-case ones) and for any other suffix (`.json`, `.txt`), which
    would otherwise silently become a folder."""
    from tulu_jax.inputs import InputError

    lower = str(path).lower().rstrip("/")
    for suffix in OUTPUT_SUFFIXES:
        if lower.endswith(suffix):
            if not str(path).rstrip("/").endswith(suffix):
                raise InputError(f"{flag} {path}: write the suffix in lower case ({suffix})")
            return suffix[1:]
    ext = os.path.splitext(os.path.basename(lower))[1]
    if ext and not str(path).endswith("/"):
        raise InputError(
            f"{flag} {path}: unsupported output type {ext!r}: name it *.jsonl, *.parquet, or a folder "
            "(datasets.save_to_disk; end its name with / if it has a dot)"
        )
    return "folder"


def is_saved_dataset(path: str) -> bool:
    """True when `path` is a folder a single `datasets.Dataset.save_to_disk` wrote: dataset_info.json,
    state.json, one or more *.arrow shards and nothing else (so replacing it loses nothing else)."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return (
        all(
            n in _SAVED_DATASET_FILES or (n.endswith(".arrow") and os.path.isfile(os.path.join(path, n))) for n in names
        )
        and all(n in names for n in _SAVED_DATASET_FILES)
        and any(n.endswith(".arrow") for n in names)
    )


def partial_path(path: str, pid: int | None = None) -> str:
    """The temporary name `path` is written under before it is renamed into place: `.NAME.partial-PID`
    in the same folder."""
    path = str(path).rstrip("/")
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.partial-{os.getpid() if pid is None else pid}")


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(path: str) -> list[str]:
    """Removes the temporaries a killed writer of `path` left (`.NAME.partial-PID*` of a PID that is not
    running) -> the removed paths."""
    parent, name = os.path.split(os.path.abspath(str(path).rstrip("/")))
    pattern = re.compile(rf"\.{re.escape(name)}\.partial-(\d+)(\..*)?")
    removed = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else ():
        m = pattern.fullmatch(entry)
        if m is None or int(m.group(1)) == os.getpid() or _pid_running(int(m.group(1))):
            continue
        _remove(os.path.join(parent, entry))
        removed.append(os.path.join(parent, entry))
    return removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _overlap(out: str, source: str) -> str | None:
    """How output `out` collides with input `source` (both real paths), or None."""
    if out == source or (os.path.exists(out) and os.path.exists(source) and os.path.samefile(out, source)):
        return "is"
    if os.path.commonpath([out, source]) == source:
        return "is inside"
    if os.path.commonpath([out, source]) == out:
        return "contains"
    return None


def check_output(
    path: str, flag: str = "--out", *, overwrite: bool = False, sources: Iterable[tuple[str, str]] = ()
) -> str:
    """Checks an output path before any work -> `path`; InputError (one line naming `flag` and `path`) when:
    the suffix is in the wrong case; it exists and `overwrite` is off; it exists and is not what
    `write_rows` would replace (a folder that is not a save_to_disk output, a folder where a file is
    asked for); it is, is inside or contains one of `sources` ((label, path) pairs, e.g.
    ("sources[0].path", "a.jsonl"), compared by real path so symlinks count); it cannot be written. Also
    removes stale temporaries of `path` (`remove_stale_partials`)."""
    from tulu_jax.inputs import InputError, check_writable_output

    fmt = output_format(path, flag)
    real = os.path.realpath(path)
    for label, src in sources:
        how = _overlap(real, os.path.realpath(src))
        if how:
            raise InputError(f"{flag} {path}: {how} {label} ({src}); write the output elsewhere")
    if os.path.lexists(path):
        if not overwrite:
            raise InputError(f"{flag} {path}: exists; pass --overwrite to replace it")
        _check_replaceable(path, fmt, flag)
    if fmt != "folder":
        check_writable_output(path, flag)
    else:
        parent = os.path.dirname(os.path.abspath(path))
        above = parent
        while not os.path.exists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise InputError(f"{flag} {path}: {above} is a file, so no folder can be made below it")
        try:
            os.makedirs(parent, exist_ok=True)
            probe = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path.rstrip('/'))}.probe-")
            os.rmdir(probe)
        except OSError as e:
            raise InputError(f"{flag} {path}: cannot write a folder there: {e.strerror or e}") from None
    remove_stale_partials(path)
    return path


def _check_replaceable(path: str, fmt: str, flag: str) -> None:
    from tulu_jax.inputs import InputError

    if fmt == "folder":
        if not os.path.isdir(path):
            raise InputError(f"{flag} {path}: is a file; a name without .jsonl/.parquet is a save_to_disk folder")
        if not is_saved_dataset(path):
            raise InputError(
                f"{flag} {path}: is a folder that is not a datasets.save_to_disk output (only dataset_info.json, "
                "state.json and *.arrow); refusing to replace it: pick another --out"
            )
    elif os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory, expected a file")


def _write_jsonl(path: str, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def rows_table(rows: list[dict], path: str):
    """`rows` as a pyarrow Table, one column per field (in order of first appearance; a row without a field
    gets null there, and so do the keys a nested object lacks that others have). Integers and floats in
    one field become float64. Raises DataError naming `path` and the field when a field's values cannot
    share one Arrow type (an id that is a number in one source and a string in another): JSONL keeps them."""
    import pyarrow as pa

    names = dict.fromkeys(k for row in rows for k in row)
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            types = sorted({_json_type(v) for v in values if v is not None})
            what = " and ".join(types) if len(types) > 1 else (str(e).splitlines() or ["mixed types"])[0]
            raise DataError(
                f"{path}: field {name!r} has values of different types across rows ({what}); a Parquet or "
                "save_to_disk column needs one type: write a .jsonl output, or make the field one type in every "
                "source",
                "mixed_types",
            ) from None
    return pa.table(columns)


def _write_to(tmp: str, path: str, fmt: str, rows: Iterable[dict]) -> int:
    """Writes `rows` to `tmp` in format `fmt` -> the number of rows. Tables go through pyarrow directly, so
    nothing lands in the Hugging Face datasets cache."""
    if fmt == "jsonl":
        return _write_jsonl(tmp, rows)
    rows = list(rows)
    table = rows_table(rows, path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, tmp)
        return len(rows)
    if not rows:  # datasets cannot write (nor read back) a folder without a row
        raise DataError(f"{path}: no rows to write; a save_to_disk folder needs one: write a .jsonl output", "empty")
    import datasets

    datasets.Dataset(table).save_to_disk(tmp)
    return len(rows)


def write_rows(path: str | Path, rows: Iterable[dict], *, before_replace: Callable[[int], None] | None = None) -> int:
    """Writes `rows` to `path` whole -> the number of rows. The format follows the name (`output_format`):
    `.jsonl`, `.parquet`, anything else a `datasets.save_to_disk` folder. Written under a temporary name in
    the same folder (`partial_path`) and renamed into place, so a killed run never leaves a partial output;
    an exception or Ctrl-C while `rows` is consumed also removes the temporary, and stale temporaries of
    killed runs are removed at the start. `before_replace(n)` runs after the rows are written and before
    the rename (check the count, write a summary); an exception there leaves `path` as it was.

    An existing folder is replaced only when it is a save_to_disk output (`is_saved_dataset`); anything
    else raises InputError before a row is read (call `check_output` first to also refuse an output that
    overlaps an input). DataError for a field of mixed types in a table output (`rows_table`)."""
    from tulu_jax.inputs import InputError

    path = str(path).rstrip("/") or "/"
    fmt = output_format(path, "output")
    if os.path.lexists(path):
        _check_replaceable(path, fmt, "output")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(path)
    tmp = partial_path(path)
    try:
        n = _write_to(tmp, path, fmt, rows)
        if before_replace is not None:
            before_replace(n)
    except BaseException:  # an error or Ctrl-C while rows are produced: leave no temporary behind either
        _remove(tmp)
        raise
    if fmt == "folder" and os.path.isdir(path):
        if not is_saved_dataset(path):  # it changed while we wrote
            _remove(tmp)
            raise InputError(f"output {path}: is no longer a datasets.save_to_disk folder; refusing to replace it")
        old = tmp + ".old"
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
    return n


class ResumableJsonl:
    """An output JSONL written row by row by many threads, resumable after a kill.

    `key(row)` names what a row was made from (a prompt id, a persona index); keys already in `path`, or in
    `<path>.skipped.jsonl` (rows given up on for good, with the reason), are in `done` when the object is
    made, so a restarted command skips them. The files are read line by line (never whole), and `on_row`,
    when given, sees every row already in `path` (to rebuild dedup state). A torn last line (a kill
    mid-write) is cut away and its row made again (`repaired_torn_row`). `settings` (a JSON-able dict of
    what shapes the rows: seed, model, skill...) is kept in `<path>.settings.json`; resuming with other
    settings is refused, since the file would mix rows of two runs. `overwrite=True` starts every file
    afresh. A second command writing the same `path` at the same time is refused (an flock on the file).
    Raises DataError (one line naming the file) for a line that is not a JSON object with a key (not an
    output of this command), for changed settings, and for a file another run holds."""

    def __init__(
        self,
        path: str | Path,
        key: Callable[[dict], str],
        *,
        overwrite: bool = False,
        on_row: Callable[[dict], None] | None = None,
        settings: dict[str, Any] | None = None,
    ):
        import fcntl

        self.path, self.skipped_path, self.key = str(path), f"{path}.skipped.jsonl", key
        self.settings_path = f"{path}.settings.json"
        if not self.path.endswith(".jsonl"):
            raise DataError(f"{self.path}: row-by-row outputs are JSONL: name it *.jsonl", "bad_output")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
        self._out = open(self.path, "a", encoding="utf-8")
        try:
            fcntl.flock(self._out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._out.close()
            raise DataError(
                f"{self.path}: another command is writing it right now; wait for it or pick another --out", "busy"
            ) from None
        self.done: set[str] = set()
        self.repaired_torn_row = False
        if overwrite:
            for p in (self.path, self.skipped_path, self.settings_path):
                if p == self.path:
                    self._out.truncate(0)
                elif os.path.exists(p):
                    os.remove(p)
        if settings is not None:
            self._check_settings(settings)
        self._resume(self.path, on_row)
        if os.path.exists(self.skipped_path):
            self._resume(self.skipped_path, None)
        self._lock = threading.Lock()
        self._skips = open(self.skipped_path, "a", encoding="utf-8")
        self.written = self.skipped = 0

    def _check_settings(self, settings: dict[str, Any]) -> None:
        settings = json.loads(json.dumps(settings))  # the form it has on disk (tuples as lists...)
        if os.path.exists(self.settings_path):
            try:
                with open(self.settings_path, encoding="utf-8") as f:
                    before = json.load(f)
            except (OSError, ValueError):
                before = None
            if isinstance(before, dict) and before != settings:
                changed = [
                    f"{k}: {before.get(k)!r} -> {settings.get(k)!r}"
                    for k in sorted(set(before) | set(settings))
                    if before.get(k) != settings.get(k)
                ]
                raise DataError(
                    f"{self.path}: written by a run with other settings ({'; '.join(changed)}); rerun with the "
                    "same ones, or pass --overwrite or another --out",
                    "settings_changed",
                )
            if isinstance(before, dict):
                return
        elif os.path.getsize(self.path) > 0:
            return  # rows from before settings were recorded: nothing to compare with
        tmp = self.settings_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
        os.replace(tmp, self.settings_path)

    def _resume(self, path: str, on_row: Callable[[dict], None] | None) -> None:
        good = 0  # bytes of complete lines
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break  # torn: cut below
                try:
                    row = json.loads(line)
                    k = self.key(row) if path == self.path else row["key"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(
                        f"{path} line {n}: not a row this command wrote; pass --overwrite or another --out",
                        "bad_output",
                    ) from None
                self.done.add(str(k))
                if on_row is not None:
                    on_row(row)
                good += len(line)
        if good < os.path.getsize(path):
            with open(path, "rb+") as f:
                f.truncate(good)
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
