"""Removing training rows that contain evaluation instances (`tulu-jax data decontaminate`).

Tülu 3 §3 ("decontamination") checks every training prompt against the evaluation suites with 8-gram
matching (open-instruct `decontamination/search.py`, there through Elasticsearch) and drops training
data where an evaluation instance scores above 0.5. Here:
- evaluation files are rows with a text field (`load_eval_sets`), tokenized and indexed in memory
  (`Decontaminator`, built on `ngram_index.NgramIndex`);
- training rows (their user turns, `user_turns`; no n-gram spans two turns) stream through worker
  processes in chunks (`scan_rows`); a row is contaminated when some instance's score against it (`ngrams.coverage`) is
  strictly greater than the threshold, and every such score is exact (hash candidates are re-scored);
  instances shorter than n tokens are skipped, as in the reference (or matched whole on request);
- `decontaminate` writes the clean rows, streams the removed ones with what matched, and collects a
  `Summary` for the printed table and the Markdown report (`decontam_report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain, islice, repeat
from pathlib import Path
from typing import IO, Any

import numpy as np

from tulu_jax.curation.ngram_index import NgramIndex
from tulu_jax.curation.ngrams import coverage, tokenize
from tulu_jax.curation.rows import (
    PROMPT_FIELDS,
    check_output,
    iter_rows,
    partial_path,
    remove_stale_partials,
    user_text,
    write_rows,
)
from tulu_jax.data.chat import DataError
from tulu_jax.inputs import InputError, check_writable_output

EVAL_FIELDS = ("prompt", "question", "problem", "messages")
CHUNK_ROWS = 4096  # training rows per task sent to a worker
EXAMPLES = 3  # examples per training source and per evaluation set in the report
SOURCE_EXAMPLE_GROUPS = 200  # sources whose examples are kept (a `source` per row would keep every row)
SHORT_MODES = ("skip", "whole")  # --short-instances
SHORT_WARN_FRACTION = 0.01  # warn when more of a set's instances than this are shorter than n


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


def check_settings(n: int, threshold: float, workers: int | None = None, short_instances: str = "skip") -> None:
    """Raises InputError (one line naming the flag) for n < 1, a threshold outside [0, 1) (NaN included),
    workers < 1 or a `short_instances` other than "skip"/"whole"."""
    if n < 1:
        raise InputError(f"--ngram must be >= 1, got {n}")
    if not 0 <= threshold < 1:
        raise InputError(f"--threshold must be in [0, 1), got {threshold}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if short_instances not in SHORT_MODES:
        raise InputError(f"--short-instances must be one of {', '.join(SHORT_MODES)}, got {short_instances!r}")


class Decontaminator:
    """The evaluation instances of `sets`, tokenized (`ngrams.tokenize`) and indexed for n-grams of length
    `n`; scores above `threshold` (in [0, 1)) mark a training text as contaminated.

    An instance shorter than n tokens has no n-gram. short_instances="skip" (the default, as open-instruct
    `decontamination/search.py`, which never matches one) leaves it out of the index; "whole" indexes its
    whole token sequence, so a text containing it whole scores 1.0 against it. `short` holds a flag per
    instance. Raises InputError (`check_settings`) for a bad n, threshold or mode."""

    def __init__(self, sets: Sequence[EvalSet], n: int = 8, threshold: float = 0.5, short_instances: str = "skip"):
        check_settings(n, threshold, short_instances=short_instances)
        self.sets, self.n, self.threshold, self.short_instances = list(sets), n, threshold, short_instances
        tokens = [tokenize(text) for eval_set in self.sets for text in eval_set.texts]
        # token -> id >= 1 in order of first use; 0 = a token that no instance has
        self.vocab = {t: k for k, t in enumerate(dict.fromkeys(chain.from_iterable(tokens)), start=1)}
        self.instances = [np.array([self.vocab[t] for t in toks], dtype=np.int64) for toks in tokens]
        self.short = [len(ids) < n for ids in self.instances]
        # instance -> (set index, row index in the set)
        self.owner = [(s, i) for s, eval_set in enumerate(self.sets) for i in range(len(eval_set.texts))]
        skip = short_instances == "skip"
        indexed = [np.zeros(0, np.int64) if skip and short else ids for ids, short in zip(self.instances, self.short)]
        self.index = NgramIndex(indexed, n, len(self.vocab) + 1)

    def token_ids(self, texts: Sequence[str | Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """The texts' token ids (0 for tokens that no instance has) as `ngram_index.join` lays them out:
        (flat int64 [T], starts int64 [len(texts)]), each text followed by a 0. A text given as a sequence
        of turns gets a 0 between its turns too, so that no n-gram spans two turns."""
        get, flat, starts = self.vocab.get, [], []
        for text in texts:
            starts.append(len(flat))
            for k, turn in enumerate((text,) if isinstance(text, str) else text):
                if k:
                    flat.append(0)
                flat += map(get, tokenize(turn), repeat(0))
            flat.append(0)
        return np.array(flat, dtype=np.int64), np.array(starts, dtype=np.int64)

    def scan(self, texts: Sequence[str | Sequence[str]]) -> list[tuple[int, list[tuple[int, float]], float]]:
        """For each text (a string, or a sequence of turns that n-grams do not span) sharing at least one
        n-gram with an indexed instance: (position, matches, best_other). `matches`: (instance, exact score)
        for every instance scoring > threshold, best first (ties: lower instance first); `best_other`: the
        highest hashed score of the other instances sharing an n-gram (an upper bound, 0.0 when none)."""
        flat, starts = self.token_ids(texts)
        ends = np.append(starts[1:], len(flat)) - 1  # each text's final 0 separator
        doc, inst, score = self.index.match_joined(flat, starts)
        out = []
        heads = np.flatnonzero(np.diff(doc, prepend=-1)) if len(doc) else np.zeros(0, np.int64)
        for lo, hi in zip(heads, [*heads[1:], len(doc)]):
            matches, other = [], 0.0
            doc_ids = None
            for i, s in zip(inst[lo:hi].tolist(), score[lo:hi].tolist()):
                if s > self.threshold:  # hashed >= exact: only these can pass, so re-score them exactly
                    d = doc[lo]
                    # turn separators (0) stay in: no instance n-gram contains a 0
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
WORKER_DIED = "a scan worker died (out of memory?); rerun with fewer --workers"


def _scan_in_worker(texts: list):
    return _WORKER.scan(texts)


def _ready() -> bool:
    return _WORKER is not None


@dataclasses.dataclass
class Verdict:
    """A training row after the scan: `matches` as `Decontaminator.scan` gives them (empty: clean) and
    `best_other` (the best hashed score of instances at or under the threshold)."""

    where: str
    source: str
    row: dict
    matches: list[tuple[int, float]]
    best_other: float


def user_turns(row: dict, where: str) -> tuple[str, ...]:
    """The user turns of a row, each on its own (`rows.user_text` joins them): from `messages`, else
    `chosen`, else the string `prompt` (one turn). Raises DataError as `rows.user_text` does."""
    text = user_text(row, where)  # validates the row
    for field in PROMPT_FIELDS:
        value = row.get(field)
        if value is not None:
            return (text,) if field == "prompt" else tuple(m["content"] for m in value if m["role"] == "user")
    raise AssertionError("user_text accepted a row without a prompt field")


def training_rows(
    paths: Sequence[str], on_bad_row: str, counts: dict[str, Any]
) -> Iterator[tuple[str, str, dict, tuple[str, ...]]]:
    """(where, source, row, user turns) of every training row of `paths`, in order; `source` is the row's
    string `source` field, else its file. A row without user text raises DataError (on_bad_row="error")
    or is counted in counts["rows_skipped"] and left out ("skip")."""
    for path in paths:
        for where, row in iter_rows(path, on_bad_row=on_bad_row, counts=counts):
            try:
                turns = user_turns(row, where)
            except DataError as e:
                if on_bad_row == "error":
                    raise
                counts["rows_skipped"][e.reason] = counts["rows_skipped"].get(e.reason, 0) + 1
                continue
            source = row.get("source")
            yield where, source if isinstance(source, str) and source else str(path), row, turns


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    items = iter(items)
    return iter(lambda: list(islice(items, size)), [])


def _verdicts(chunk: list, found: list) -> Iterator[Verdict]:
    by_pos = {pos: (matches, other) for pos, matches, other in found}
    for pos, (where, source, row, _) in enumerate(chunk):
        matches, other = by_pos.get(pos, ([], 0.0))
        yield Verdict(where, source, row, matches, other)


def _result(future: Future):
    """The future's result; a dead worker (OOM-killed) breaks the pool: InputError naming --workers."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise InputError(WORKER_DIED) from None


@contextlib.contextmanager
def worker_pool(deco: Decontaminator, workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` forked processes that inherit `deco` (None for workers <= 1: scan in this
    process). Every worker is forked on entry (the fork context starts them all with the first task), so
    enter it before starting threads (a progress bar): fork copies no threads. A worker that dies makes
    every pending result raise InputError (`WORKER_DIED`) instead of waiting forever."""
    global _WORKER
    if workers <= 1:
        yield None
        return
    _WORKER = deco
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        _result(pool.submit(_ready))
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _WORKER = None


def scan_rows(
    rows: Iterable[tuple[str, str, dict, Any]],
    deco: Decontaminator,
    pool: ProcessPoolExecutor | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    in_flight: int = 4,
) -> Iterator[Verdict]:
    """A Verdict for every (where, source, row, text or turns) of `rows`, in order. Chunks of `chunk_rows`
    texts are scanned here (pool None) or in `pool` (from `worker_pool`, with the same `deco`), at most
    `in_flight` chunks at a time, so memory stays bounded however long the input. Raises InputError when a
    worker dies."""
    if pool is None:
        for chunk in _chunks(rows, chunk_rows):
            yield from _verdicts(chunk, deco.scan([c[3] for c in chunk]))
        return
    pending: deque = deque()
    for chunk in _chunks(rows, chunk_rows):
        pending.append((chunk, pool.submit(_scan_in_worker, [c[3] for c in chunk])))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield from _verdicts(done, _result(future))
    while pending:
        done, future = pending.popleft()
        yield from _verdicts(done, _result(future))


@dataclasses.dataclass
class Summary:
    """What a run found, for the printed table and the report. `per_source`: source -> {"rows",
    "removed"}; `per_set`: set name -> {"instances", "short" (instances under n tokens), "matched" (instances
    scoring > threshold against some row), "rows" (rows with a match in the set), "best" (rows whose best
    match is in the set)}; `short`: set name -> row indexes of its instances under n tokens; `pairs`:
    (source, set name of the best match) -> rows; `examples`: removed records (as in the removed file) per
    "source:NAME" (for the first SOURCE_EXAMPLE_GROUPS sources with removals) / "set:NAME", at most
    EXAMPLES each; `near_misses`: kept rows sharing an n-gram with some instance, by best hashed score
    bucket (tenths)."""

    n: int
    threshold: float
    train_paths: list[str]
    sets: list[EvalSet]
    out: str
    removed_path: str
    report_path: str | None = None
    short_instances: str = "skip"
    rows_read: int = 0
    rows_skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    rows_kept: int = 0
    rows_removed: int = 0
    seconds: float = 0.0
    workers: int = 1
    per_source: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    per_set: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    short: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    pairs: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    examples: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    near_misses: dict[float, int] = dataclasses.field(default_factory=dict)

    @property
    def prompts_per_s(self) -> float:
        """Training rows scanned per second of the whole run (0.0 before any time has passed)."""
        scanned = self.rows_kept + self.rows_removed
        return scanned / self.seconds if self.seconds > 0 else 0.0


def companion_path(out: str, suffix: str) -> str:
    """`out` without a .jsonl/.parquet extension (or trailing slash) plus `suffix`: the removed-rows file
    ("clean.jsonl" -> "clean.removed.jsonl") and the default report ("clean.report.md")."""
    base = str(out).rstrip("/\\")
    for ext in (".jsonl", ".parquet"):
        base = base.removesuffix(ext)
    return base + suffix


def check_outputs(
    out: str, removed_path: str, report_path: str | None, sources: Sequence[tuple[str, str]], overwrite: bool
) -> None:
    """Checks the three outputs before anything is read; InputError (one line naming the flag and path)
    when `out` exists without `overwrite`, or any of them is, is inside or contains an input of `sources`
    ((flag, path) pairs), is a directory, cannot be written, or two of them are the same path
    (`rows.check_output`). The removed file and the report belong to `out`: they are replaced without
    --overwrite (a run killed before `out` was renamed into place can leave them)."""
    check_output(out, "--out", overwrite=overwrite, sources=sources)
    outputs = [("--out", out)]
    for flag, path in [("--out (removed-rows file)", removed_path), ("--report", report_path)]:
        if path is None:
            continue
        real = os.path.realpath(path)
        for label, other in [*sources, *outputs]:
            theirs = os.path.realpath(other)
            if real == theirs or os.path.commonpath([real, theirs]) in (real, theirs):
                raise InputError(f"{flag} {path}: is, is inside or contains {label} ({other}); write it elsewhere")
        check_writable_output(path, flag)
        remove_stale_partials(path)
        outputs.append((flag, path))


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


def _tally(summary: Summary, deco: Decontaminator, v: Verdict, matched: set[int], removed: IO[str]) -> bool:
    """Counts one verdict into `summary` and writes a removed row's record to `removed` -> whether the
    row stays."""
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
    removed.write(json.dumps(record, ensure_ascii=False) + "\n")
    for set_name in dict.fromkeys(m["eval_set"] for m in record["matches"]):
        summary.per_set[set_name]["rows"] += 1
    summary.per_set[record["eval_set"]]["best"] += 1
    key = (v.source, record["eval_set"])
    summary.pairs[key] = summary.pairs.get(key, 0) + 1
    matched.update(k for k, _ in v.matches)
    source_group = f"source:{v.source}"
    if source_group not in summary.examples and len(summary.examples) >= SOURCE_EXAMPLE_GROUPS + len(deco.sets):
        source_group = None  # per-row sources: keep examples of the first sources only
    for group in (source_group, f"set:{record['eval_set']}"):
        if group is None:
            continue
        examples = summary.examples.setdefault(group, [])
        if len(examples) < EXAMPLES:
            examples.append(record)
    return False


def _new_summary(deco: Decontaminator, train_paths, out: str, removed_path: str, workers: int) -> Summary:
    summary = Summary(deco.n, deco.threshold, [str(p) for p in train_paths], deco.sets, str(out), removed_path)
    summary.workers, summary.short_instances = workers, deco.short_instances
    summary.per_set = {e.name: dict.fromkeys(("instances", "short", "matched", "rows", "best"), 0) for e in deco.sets}
    summary.short = {e.name: [] for e in deco.sets}
    for (s, i), short in zip(deco.owner, deco.short):
        summary.per_set[deco.sets[s].name]["instances"] += 1
        summary.per_set[deco.sets[s].name]["short"] += short
        if short:
            summary.short[deco.sets[s].name].append(i)
    return summary


def short_warnings(summary: Summary) -> list[str]:
    """One line per evaluation set with more than SHORT_WARN_FRACTION of its instances under n tokens."""
    lines = []
    for name, v in summary.per_set.items():
        if v["short"] > SHORT_WARN_FRACTION * v["instances"]:
            what = (
                "they are skipped, as in open-instruct (--short-instances whole: a row containing one whole is removed)"
                if summary.short_instances == "skip"
                else "each removes every training row that contains it whole (--short-instances whole)"
            )
            lines.append(
                f"decontaminate: warning: {name}: {v['short']} of {v['instances']} instances "
                f"({100 * v['short'] / v['instances']:.1f}%) are shorter than {summary.n} tokens; {what}"
            )
    return lines


def decontaminate(
    train_paths: Sequence[str],
    sets: Sequence[EvalSet],
    out: str,
    *,
    n: int = 8,
    threshold: float = 0.5,
    short_instances: str = "skip",
    workers: int | None = None,
    on_bad_row: str = "error",
    removed_path: str | None = None,
    report_path: str | None = None,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> Summary:
    """Writes every training row of `train_paths` that no instance of `sets` contaminates to `out`
    (`rows.write_rows`: .jsonl, .parquet or a datasets folder), unchanged and in order, the others to
    `removed_path` (default `companion_path(out, ".removed.jsonl")`, lines as `removed_record`, streamed to
    a temporary file) and, when `report_path` is given, the Markdown report there -> Summary. The removed
    file and the report are renamed into place before `out`, so an existing `out` has both; a failed or
    killed run leaves none of them new (nor a temporary). Warns on stderr about sets with many instances
    shorter than n (`short_warnings`); `short_instances` as in `Decontaminator`.

    workers: processes scanning rows (default os.cpu_count()); progress: a tqdm bar on stderr. Raises
    DataError for a bad training row under on_bad_row="error", FileNotFoundError for a missing input,
    InputError for bad n/threshold/workers (`check_settings`), when a scan worker dies, or when `out` or
    the removed file is an input. Callers that should refuse an existing `out` call `check_outputs` first."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    check_settings(n, threshold, workers, short_instances)
    removed_path = removed_path or companion_path(out, ".removed.jsonl")
    sources = [("--data", str(p)) for p in train_paths]
    check_outputs(out, removed_path, report_path, sources, overwrite=True)
    deco = Decontaminator(sets, n, threshold, short_instances)
    summary = _new_summary(deco, train_paths, out, removed_path, workers)
    summary.report_path = report_path
    for line in short_warnings(summary):
        print(line, file=sys.stderr)
    counts: dict[str, Any] = {}
    matched: set[int] = set()
    start = time.perf_counter()
    removed_tmp = partial_path(removed_path)
    removed = open(removed_tmp, "w", encoding="utf-8")

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

    def finish(_kept: int) -> None:  # after CLEAN is written, before it is renamed into place
        summary.seconds = time.perf_counter() - start
        summary.rows_read = counts.get("rows_read", 0)
        summary.rows_skipped = dict(counts.get("rows_skipped", {}))
        for k in matched:
            summary.per_set[deco.sets[deco.owner[k][0]].name]["matched"] += 1
        removed.flush()
        os.fsync(removed.fileno())
        removed.close()
        if report_path is not None:
            from tulu_jax.curation.decontam_report import write_report

            write_report(summary, report_path)
        os.replace(removed_tmp, removed_path)

    try:
        write_rows(out, kept_rows(), before_replace=finish)
    except BaseException:
        removed.close()
        if os.path.exists(removed_tmp):
            os.remove(removed_tmp)
        raise
    return summary
