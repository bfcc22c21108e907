"""Removing training rows that contain evaluation instances (`tulu-jax data decontaminate`).

Tülu 3 §3 ("decontamination") checks every training prompt against the evaluation suites with 8-gram
matching (open-instruct `decontamination/search.py`, there through Elasticsearch) and drops training
data where an evaluation instance scores above 0.5. Here:
- evaluation files are rows with a text field (`load_eval_sets`), tokenized and indexed in memory
  (`Decontaminator`, built on `ngram_index.NgramIndex`);
- training rows (their user turns, `rows.user_text`) stream through worker processes in chunks
  (`scan_rows`); a row is contaminated when some instance's score against it (`ngrams.coverage`) is
  strictly greater than the threshold, and every such score is exact (hash candidates are re-scored);
- `decontaminate` writes the clean rows, the removed ones with what matched, and collects a `Summary`
  for the printed table and the Markdown report (`decontam_report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import multiprocessing.pool
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice, repeat
from pathlib import Path
from typing import Any

import numpy as np

from tulu_jax.curation.ngram_index import NgramIndex
from tulu_jax.curation.ngrams import coverage, tokenize
from tulu_jax.curation.rows import iter_rows, user_text, write_rows
from tulu_jax.data.chat import DataError
from tulu_jax.inputs import InputError

EVAL_FIELDS = ("prompt", "question", "problem", "messages")
CHUNK_ROWS = 4096  # training rows per task sent to a worker
EXAMPLES = 3  # examples per training source and per evaluation set in the report


@dataclasses.dataclass
class EvalSet:
    """One evaluation file: `name` (its file name without extension, made unique), `path`, the instances'
    `texts` in file order and `fields` (text field -> rows that used it)."""

    name: str
    path: str
    texts: list[str]
    fields: dict[str, int]


def eval_text(row: dict, where: str, field: str | None = None) -> tuple[str, str]:
    """(field, text) of one evaluation row: `field` when given, else the first of `EVAL_FIELDS` present; a
    string is used as is, a list of messages gives its user turns. Raises DataError naming `where` and the
    field when there is none, it is empty or it has another type."""
    for name in (field,) if field else EVAL_FIELDS:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, list):  # chat messages: their user turns
            context = where if name == "messages" else f"{where} (--eval-field {name!r}, read as messages)"
            return name, user_text({"messages": value}, context)
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string or a list of messages", "bad_eval_text")
        if not value.strip():
            raise DataError(f"{where}: field {name!r} is empty", "bad_eval_text")
        return name, value
    if field:
        raise DataError(f"{where}: no field {field!r} (--eval-field)", "no_eval_text")
    raise DataError(
        f"{where}: no evaluation text field (expected one of {', '.join(EVAL_FIELDS)}; or pass --eval-field)",
        "no_eval_text",
    )


def _set_names(paths: Sequence[str]) -> list[str]:
    """Each file's name without extension, or its whole path where two names are alike."""
    stems = [Path(p).name.removesuffix(".jsonl").removesuffix(".parquet") for p in paths]
    names = [s if stems.count(s) == 1 else str(p) for s, p in zip(stems, paths)]
    for name in names:
        if names.count(name) > 1:
            raise InputError(f"--eval: {name} is given twice")
    return names


def load_eval_sets(paths: Sequence[str], field: str | None = None) -> list[EvalSet]:
    """Reads every evaluation file (JSONL, Parquet or datasets folder) -> one EvalSet each, in order.
    Every row must give a text (`eval_text`); raises DataError naming the file and row otherwise, or for a
    file without rows, and FileNotFoundError for a missing path."""
    sets = []
    for name, path in zip(_set_names(paths), paths):
        texts, fields = [], {}
        for where, row in iter_rows(path):
            used, text = eval_text(row, where, field)
            texts.append(text)
            fields[used] = fields.get(used, 0) + 1
        if not texts:
            raise DataError(f"{path}: no rows (an evaluation set needs at least one instance)", "empty_eval")
        sets.append(EvalSet(name, str(path), texts, fields))
    return sets


class Decontaminator:
    """The evaluation instances of `sets`, tokenized (`ngrams.tokenize`) and indexed for n-grams of length
    `n`; scores above `threshold` (in [0, 1)) mark a training text as contaminated. Raises InputError (a
    ValueError naming the flag) for n < 1 or a threshold outside [0, 1)."""

    def __init__(self, sets: Sequence[EvalSet], n: int = 8, threshold: float = 0.5):
        if n < 1:
            raise InputError(f"--ngram must be >= 1, got {n}")
        if not 0 <= threshold < 1:
            raise InputError(f"--threshold must be in [0, 1), got {threshold}")
        self.sets, self.n, self.threshold = list(sets), n, threshold
        tokens = [tokenize(text) for eval_set in self.sets for text in eval_set.texts]
        # token -> id >= 1 in order of first use; 0 = a token that no instance has
        self.vocab = {t: k for k, t in enumerate(dict.fromkeys(chain.from_iterable(tokens)), start=1)}
        self.instances = [np.array([self.vocab[t] for t in toks], dtype=np.int64) for toks in tokens]
        # instance -> (set index, row index in the set)
        self.owner = [(s, i) for s, eval_set in enumerate(self.sets) for i in range(len(eval_set.texts))]
        self.index = NgramIndex(self.instances, n, len(self.vocab) + 1)

    def token_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The texts' token ids (0 for tokens that no instance has) as `ngram_index.join` lays them out:
        (flat int64 [T], starts int64 [len(texts)]), each text followed by a 0."""
        get, flat, starts = self.vocab.get, [], []
        for text in texts:
            starts.append(len(flat))
            flat += map(get, tokenize(text), repeat(0))
            flat.append(0)
        return np.array(flat, dtype=np.int64), np.array(starts, dtype=np.int64)

    def scan(self, texts: Sequence[str]) -> list[tuple[int, list[tuple[int, float]], float]]:
        """For each text (by position) sharing at least one n-gram with an instance: (position, matches,
        best_other). `matches`: (instance, exact score) for every instance scoring > threshold, best
        first (ties: lower instance first); `best_other`: the highest hashed score of the other
        instances sharing an n-gram (an upper bound, 0.0 when none)."""
        flat, starts = self.token_ids(texts)
        ends = np.append(starts[1:], len(flat)) - 1  # each text's 0 separator
        doc, inst, score = self.index.match_joined(flat, starts)
        out = []
        heads = np.flatnonzero(np.diff(doc, prepend=-1)) if len(doc) else np.zeros(0, np.int64)
        for lo, hi in zip(heads, [*heads[1:], len(doc)]):
            matches, other = [], 0.0
            doc_ids = None
            for i, s in zip(inst[lo:hi].tolist(), score[lo:hi].tolist()):
                if s > self.threshold:  # hashed >= exact: only these can pass, so re-score them exactly
                    d = doc[lo]
                    doc_ids = flat[starts[d] : ends[d]].tolist() if doc_ids is None else doc_ids
                    s = coverage(self.instances[i].tolist(), doc_ids, self.n)
                if s > self.threshold:
                    matches.append((i, s))
                else:
                    other = max(other, s)
            matches.sort(key=lambda m: (-m[1], m[0]))
            out.append((int(doc[lo]), matches, other))
        return out


_WORKER: Decontaminator | None = None  # set before forking: workers inherit the index


def _scan_in_worker(texts: list[str]):
    return _WORKER.scan(texts)


@dataclasses.dataclass
class Verdict:
    """A training row after the scan: `matches` as `Decontaminator.scan` gives them (empty: clean) and
    `best_other` (the best hashed score of instances at or under the threshold)."""

    where: str
    source: str
    row: dict
    matches: list[tuple[int, float]]
    best_other: float


def training_rows(
    paths: Sequence[str], on_bad_row: str, counts: dict[str, Any]
) -> Iterator[tuple[str, str, dict, str]]:
    """(where, source, row, user text) of every training row of `paths`, in order; `source` is the row's
    string `source` field, else its file. A row without user text raises DataError (on_bad_row="error")
    or is counted in counts["rows_skipped"] and left out ("skip")."""
    for path in paths:
        for where, row in iter_rows(path, on_bad_row=on_bad_row, counts=counts):
            try:
                text = user_text(row, where)
            except DataError as e:
                if on_bad_row == "error":
                    raise
                counts["rows_skipped"][e.reason] = counts["rows_skipped"].get(e.reason, 0) + 1
                continue
            source = row.get("source")
            yield where, source if isinstance(source, str) and source else str(path), row, text


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    return iter(lambda: list(islice(items, size)), [])


def _verdicts(chunk: list, found: list) -> Iterator[Verdict]:
    by_pos = {pos: (matches, other) for pos, matches, other in found}
    for pos, (where, source, row, _) in enumerate(chunk):
        matches, other = by_pos.get(pos, ([], 0.0))
        yield Verdict(where, source, row, matches, other)


@contextlib.contextmanager
def worker_pool(deco: Decontaminator, workers: int) -> Iterator[multiprocessing.pool.Pool | None]:
    """A pool of `workers` forked processes that inherit `deco` (None for workers <= 1: scan in this
    process). Enter it before starting threads (a progress bar): fork copies no threads."""
    global _WORKER
    if workers <= 1:
        yield None
        return
    _WORKER = deco
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield pool
    finally:
        _WORKER = None


def scan_rows(
    rows: Iterable[tuple[str, str, dict, str]],
    deco: Decontaminator,
    pool: multiprocessing.pool.Pool | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    in_flight: int = 4,
) -> Iterator[Verdict]:
    """A Verdict for every (where, source, row, text) of `rows`, in order. Chunks of `chunk_rows` texts
    are scanned here (pool None) or in `pool` (from `worker_pool`, with the same `deco`), at most
    `in_flight` chunks at a time, so memory stays bounded however long the input."""
    if pool is None:
        for chunk in _chunks(rows, chunk_rows):
            yield from _verdicts(chunk, deco.scan([c[3] for c in chunk]))
        return
    pending: deque = deque()
    for chunk in _chunks(rows, chunk_rows):
        pending.append((chunk, pool.apply_async(_scan_in_worker, ([c[3] for c in chunk],))))
        if len(pending) >= in_flight:
            done, result = pending.popleft()
            yield from _verdicts(done, result.get())
    while pending:
        done, result = pending.popleft()
        yield from _verdicts(done, result.get())


@dataclasses.dataclass
class Summary:
    """What a run found, for the printed table and the report. `per_source`: source -> {"rows",
    "removed"}; `per_set`: set name -> {"instances", "short" (instances under n tokens), "matched" (instances
    scoring > threshold against some row), "rows" (rows with a match in the set), "best" (rows whose best
    match is in the set)}; `pairs`: (source, set name of the best match) -> rows; `examples`: removed
    records (as in the removed file) per "source:NAME" / "set:NAME", at most EXAMPLES each; `near_misses`:
    kept rows sharing an n-gram with some instance, by best hashed score bucket (tenths)."""

    n: int
    threshold: float
    train_paths: list[str]
    sets: list[EvalSet]
    out: str
    removed_path: str
    report_path: str | None = None
    rows_read: int = 0
    rows_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    rows_kept: int = 0
    rows_removed: int = 0
    seconds: float = 0.0
    workers: int = 1
    per_source: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    per_set: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    pairs: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    near_misses: dict[float, int] = dataclasses.field(default_factory=dict)

    @property
    def prompts_per_s(self) -> float:
        scanned = self.rows_kept + self.rows_removed
        return scanned / self.seconds if self.seconds > 0 else 0.0


def companion_path(out: str, suffix: str) -> str:
    """`out` without a .jsonl/.parquet extension (or trailing slash) plus `suffix`: the removed-rows file
    ("clean.jsonl" -> "clean.removed.jsonl") and the default report ("clean.report.md")."""
    base = str(out).rstrip("/\\")
    for ext in (".jsonl", ".parquet"):
        base = base.removesuffix(ext)
    return base + suffix


def removed_record(v: Verdict, deco: Decontaminator) -> dict:
    """The line of the removed file for one contaminated row: where it was, its source, the best match
    (eval_set, eval_file, eval_index, eval_text, score), every instance over the threshold (`matches`:
    eval_set, eval_index, score) and the row itself, unchanged (`row`)."""
    inst, score = v.matches[0]
    s, i = deco.owner[inst]
    return {
        "where": v.where,
        "source": v.source,
        "eval_set": deco.sets[s].name,
        "eval_file": deco.sets[s].path,
        "eval_index": i,
        "eval_text": deco.sets[s].texts[i],
        "score": round(score, 6),
        "matches": [
            {"eval_set": deco.sets[deco.owner[k][0]].name, "eval_index": deco.owner[k][1], "score": round(x, 6)}
            for k, x in v.matches
        ],
        "row": v.row,
    }


def _tally(summary: Summary, deco: Decontaminator, v: Verdict, matched: set[int], removed: list[dict]) -> bool:
    """Counts one verdict into `summary` -> whether the row stays."""
    src = summary.per_source.setdefault(v.source, {"rows": 0, "removed": 0})
    src["rows"] += 1
    if not v.matches:
        summary.rows_kept += 1
        if v.best_other > 0:
            bucket = min(int(v.best_other * 10), 9) / 10
            summary.near_misses[bucket] = summary.near_misses.get(bucket, 0) + 1
        return True
    summary.rows_removed += 1
    src["removed"] += 1
    record = removed_record(v, deco)
    removed.append(record)
    for set_name in dict.fromkeys(m["eval_set"] for m in record["matches"]):
        summary.per_set[set_name]["rows"] += 1
    summary.per_set[record["eval_set"]]["best"] += 1
    key = (v.source, record["eval_set"])
    summary.pairs[key] = summary.pairs.get(key, 0) + 1
    matched.update(k for k, _ in v.matches)
    for group in (f"source:{v.source}", f"set:{record['eval_set']}"):
        examples = summary.examples.setdefault(group, [])
        if len(examples) < EXAMPLES:
            examples.append(record)
    return False


def decontaminate(
    train_paths: Sequence[str],
    sets: Sequence[EvalSet],
    out: str,
    *,
    n: int = 8,
    threshold: float = 0.5,
    workers: int | None = None,
    on_bad_row: str = "error",
    removed_path: str | None = None,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> Summary:
    """Writes every training row of `train_paths` that no instance of `sets` contaminates to `out`
    (`rows.write_rows`: .jsonl, .parquet or a datasets folder), unchanged and in order, and the others to
    `removed_path` (default `companion_path(out, ".removed.jsonl")`, lines as `removed_record`) -> Summary.

    workers: processes scanning rows (default os.cpu_count()); progress: a tqdm bar on stderr. Raises
    DataError for a bad training row under on_bad_row="error" (no output is written then),
    FileNotFoundError for a missing input, InputError for bad n/threshold/workers or when `out` or the
    removed file is an input."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    removed_path = removed_path or companion_path(out, ".removed.jsonl")
    for path in (out, removed_path):
        if any(os.path.abspath(path) == os.path.abspath(p) for p in train_paths):
            raise InputError(f"--out {path} is also a training input (--data); write it elsewhere")
    deco = Decontaminator(sets, n, threshold)
    summary = Summary(n, threshold, [str(p) for p in train_paths], list(sets), str(out), removed_path)
    summary.workers = workers
    summary.per_set = {e.name: dict.fromkeys(("instances", "short", "matched", "rows", "best"), 0) for e in sets}
    for (s, _), ids in zip(deco.owner, deco.instances):
        summary.per_set[deco.sets[s].name]["instances"] += 1
        summary.per_set[deco.sets[s].name]["short"] += len(ids) < n
    counts: dict[str, Any] = {}
    matched: set[int] = set()
    removed: list[dict] = []
    start = time.perf_counter()

    def kept_rows():
        from tqdm import tqdm

        rows = training_rows(train_paths, on_bad_row, counts)
        with (
            worker_pool(deco, workers) as pool,  # forks before tqdm starts its monitor thread
            tqdm(unit=" prompts", file=sys.stderr, disable=not progress, mininterval=1.0, delay=0.1) as bar,
        ):
            for v in scan_rows(rows, deco, pool, chunk_rows=chunk_rows, in_flight=2 * workers):
                bar.update(1)
                if _tally(summary, deco, v, matched, removed):
                    yield v.row

    write_rows(out, kept_rows())
    summary.seconds = time.perf_counter() - start
    write_rows(removed_path, removed)
    summary.rows_read = counts.get("rows_read", 0)
    summary.rows_skipped = dict(counts.get("rows_skipped", {}))
    for k in matched:
        summary.per_set[deco.sets[deco.owner[k][0]].name]["matched"] += 1
    return summary
