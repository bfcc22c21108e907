"""`tulu-jax verify`: scores a JSONL of responses with the RLVR verifiers and prints accuracy per verifier.

Input rows use the field names of Tülu's RLVR data (open-instruct `ground_truth_utils.py`, Tülu 3 §6):
`response` (the model output; the text after its last `<|assistant|>\\n` is checked), `ground_truth` and
`dataset` (`gsm8k`, `math`/`MATH`, `ifeval`, `google_ifeval`; case-insensitive). `ground_truth` must be a
string: IF constraints are the JSON text Tülu's datasets store there, not a decoded object, so the
verifier sees exactly what the dataset holds; a ground truth its verifier cannot use
(`tulu_jax.rewards.check_ground_truth`) makes the row a bad row. Each row of `--out` is the input row, in
input order, plus `score` (1.0/0.0), `verifier` (canonical dataset name) and `verify_status` (ok, timeout,
error) with `verify_message` when not ok. Under `--on-bad-row skip` a bad row is written too, as
`verify_status: "skipped"` with `score` and `verifier` null, so line N of --out is row N of --data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from tulu_jax.inputs import InputError, check_data_path, check_writable_output

BATCH_ROWS = 4096  # rows scored per Scorer call (and per --out flush)
FIELDS = ("response", "ground_truth", "dataset")
WORKERS_PER_CPU = 4  # more verifier processes than this only cost memory and start-up time
SHOWN_ERRORS = 5  # error/timeout messages printed under the table


def add_arguments(p) -> None:
    """The `verify` subcommand's flags, on the argparse parser `p`."""
    p.add_argument("--data", required=True, help="JSONL (or Parquet) of rows {response, ground_truth, dataset}")
    p.add_argument(
        "--out",
        help="JSONL: every input row, in order, plus score, verifier, verify_status (and verify_message when "
        "not ok); a skipped bad row has verify_status skipped and no score",
    )
    from tulu_jax.rewards.scorer import DEFAULT_MAX_WORKERS

    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"verifier processes (default: one per CPU, at most {DEFAULT_MAX_WORKERS}; "
        f"at most {WORKERS_PER_CPU} per CPU when given)",
    )
    p.add_argument(
        "--timeout-s", type=float, default=10.0, help="hard deadline per response, seconds (default: %(default)s)"
    )
    p.add_argument(
        "--if-semantics",
        default="head",
        help="IF constraint semantics: head (open-instruct HEAD), 2024, or 2024:f1,f2 (2024 for those functions)",
    )
    p.add_argument(
        "--on-bad-row",
        choices=("error", "skip"),
        default="error",
        help="a bad row (invalid JSON, missing field, unknown dataset, unusable ground truth): error stops with "
        "its file, line and field; skip counts it and writes it to --out as skipped (default: %(default)s)",
    )


def parse_row(row: Any, where: str):
    """The VerifyItem of one input row. Raises DataError naming `where` (file and line) and the field:
    not an object, a missing or non-string field, an unknown dataset (the message lists the known ones),
    a ground truth the dataset's verifier cannot use (`check_ground_truth`, reason "bad_ground_truth")."""
    from tulu_jax.data.chat import DataError
    from tulu_jax.rewards.registry import UnknownDataset, canonical_dataset, check_ground_truth
    from tulu_jax.rewards.scorer import VerifyItem

    if not isinstance(row, Mapping):
        raise DataError(f"{where}: field '<row>': expected a JSON object, got {type(row).__name__}", "not_an_object")
    for field in FIELDS:
        if field not in row:
            raise DataError(f"{where}: field '{field}': missing", f"missing_{field}")
        if not isinstance(row[field], str):
            got = "null" if row[field] is None else type(row[field]).__name__
            raise DataError(f"{where}: field '{field}': expected a string, got {got}", f"bad_{field}")
    try:
        dataset = canonical_dataset(row["dataset"])
    except UnknownDataset as e:
        raise DataError(f"{where}: field 'dataset': {e}", "unknown_dataset") from None
    try:
        check_ground_truth(dataset, row["ground_truth"])
    except ValueError as e:
        raise DataError(f"{where}: field 'ground_truth': {e}", "bad_ground_truth") from None
    return row, VerifyItem(dataset, row["response"], row["ground_truth"])


class _Row(NamedTuple):
    where: str
    row: Any  # the decoded row (None for a line that is not JSON)
    item: Any  # its VerifyItem, or None for a skipped bad row
    skipped: str | None  # why it was skipped


def _read(data: str, on_bad_row: str, counts: dict[str, Any]) -> Iterator[_Row]:
    """Every row of `data` in order, bad rows included (as skipped) under on_bad_row="skip"; counts
    `rows_read` and `rows_skipped` (reason -> count). Raises the first bad row's DataError otherwise."""
    from tulu_jax.data.chat import DataError
    from tulu_jax.data.sources import iter_raw_rows

    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    counts.setdefault("rows_read", 0)
    skipped = counts.setdefault("rows_skipped", {})
    for where, row in iter_raw_rows(data):
        counts["rows_read"] += 1
        try:
            if isinstance(row, DataError):
                raise row
            yield _Row(where, *parse_row(row, where), None)
        except DataError as e:
            if on_bad_row == "error":
                raise
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            yield _Row(where, None if isinstance(row, DataError) else row, None, str(e))


def _batches(rows: Iterator, size: int) -> Iterator[list]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _out_line(entry: _Row, verdict) -> str:
    base = dict(entry.row) if isinstance(entry.row, Mapping) else {}
    if verdict is None:
        scored = {**base, "score": None, "verifier": None, "verify_status": "skipped", "verify_message": entry.skipped}
    else:
        scored = {**base, "score": verdict.score, "verifier": verdict.verifier, "verify_status": verdict.status}
        if verdict.status != "ok":
            scored["verify_message"] = verdict.message
    return json.dumps(scored, ensure_ascii=False) + "\n"


def verify_file(
    data: str,
    out: str | None = None,
    *,
    workers: int | None = None,
    timeout_s: float = 10.0,
    if_semantics: str = "head",
    on_bad_row: str = "error",
) -> dict:
    """Scores every row of `data` (see the module docstring) in a Scorer pool and writes `out` (if given).
    Returns {"verifiers": {name: {n, passed, accuracy, timeouts, errors}}, "rows_read", "rows_skipped"
    (reason -> count), "problems" (the first SHOWN_ERRORS "where (verifier, status): message" of items
    that timed out or raised)}. `out` is written as `out`.tmp and renamed on success; on any error the tmp
    file is removed and an existing `out` is left as it was. Raises DataError for a bad row unless
    on_bad_row="skip", and DataError "no rows to verify" when `data` has no row or every row was skipped."""
    from tqdm import tqdm

    from tulu_jax.data.chat import DataError
    from tulu_jax.rewards.scorer import Scorer

    counts: dict[str, Any] = {}
    table: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    # Rows go to OUT.tmp, renamed to OUT only on success: a bad row late in the file (or Ctrl-C) leaves no
    # truncated OUT, and an OUT from an earlier run stays as it was.
    tmp = f"{out}.tmp" if out else None
    # A lone surrogate (valid in JSON escapes) cannot be UTF-8: it is written back as the same \\uXXXX escape.
    sink = open(tmp, "w", encoding="utf-8", errors="backslashreplace") if tmp else None  # noqa: SIM115
    try:
        with Scorer(workers, timeout_s, if_semantics) as scorer, tqdm(unit="row", disable=None) as bar:
            for batch in _batches(_read(data, on_bad_row, counts), BATCH_ROWS):
                scored = iter(scorer.score([e.item for e in batch if e.item is not None]))
                verdicts = [None if e.item is None else next(scored) for e in batch]
                for entry, v in zip(batch, verdicts, strict=True):
                    if v is None:
                        continue
                    stats = table.setdefault(v.verifier, {"n": 0, "passed": 0, "timeouts": 0, "errors": 0})
                    stats["n"] += 1
                    stats["passed"] += v.score == 1.0
                    stats["timeouts"] += v.status == "timeout"
                    stats["errors"] += v.status == "error"
                    if v.status != "ok" and len(problems) < SHOWN_ERRORS:
                        problems.append(f"{entry.where} ({v.verifier}, {v.status}): {v.message}")
                if sink is not None:
                    sink.write("".join(_out_line(e, v) for e, v in zip(batch, verdicts, strict=True)))
                    sink.flush()
                bar.update(len(batch))
        if not table:
            skipped = counts.get("rows_skipped", {})
            why = f": all {sum(skipped.values())} rows were skipped as bad ({_reasons(skipped)})" if skipped else ""
            raise DataError(f"{data}: no rows to verify{why}", "no_rows")
        if sink is not None:
            sink.close()
            os.replace(tmp, out)
    except BaseException:
        if sink is not None:
            sink.close()
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for stats in table.values():
        stats["accuracy"] = stats["passed"] / stats["n"]
    return {
        "verifiers": dict(sorted(table.items())),
        "rows_read": counts.get("rows_read", 0),
        "rows_skipped": counts.get("rows_skipped", {}),
        "problems": problems,
    }


def _reasons(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in skipped.items())


def format_table(summary: dict) -> str:
    """The accuracy table of a `verify_file` summary, one line per verifier plus a total."""
    lines = [f"{'verifier':<14} {'n':>8} {'passed':>8} {'accuracy':>9} {'timeouts':>9} {'errors':>7}"]
    total = {"n": 0, "passed": 0, "timeouts": 0, "errors": 0}
    for name, e in summary["verifiers"].items():
        lines.append(
            f"{name:<14} {e['n']:>8} {e['passed']:>8} {e['accuracy']:>9.4f} {e['timeouts']:>9} {e['errors']:>7}"
        )
        for key in total:
            total[key] += e[key]
    accuracy = total["passed"] / total["n"] if total["n"] else float("nan")
    lines.append(
        f"{'all':<14} {total['n']:>8} {total['passed']:>8} {accuracy:>9.4f} {total['timeouts']:>9} {total['errors']:>7}"
    )
    skipped = summary["rows_skipped"]
    if skipped:
        lines.append(f"skipped bad rows: {sum(skipped.values())} ({_reasons(skipped)})")
    problems = summary.get("problems", [])
    if problems:
        shown = "first " if len(problems) < total["timeouts"] + total["errors"] else ""
        lines.append(f"{shown}timeouts and errors:")
        lines.extend(f"  {p}" for p in problems)
    return "\n".join(lines)


def run(args, overrides) -> int:
    """`tulu-jax verify`: checks the flags (InputError naming the flag), scores --data, prints the table."""
    if overrides:
        raise InputError(f"verify takes no key=value overrides, got {overrides}")
    check_data_path(args.data, "--data")
    if args.out is not None:
        if not args.out:
            raise InputError("--out: empty path; give a file to write or leave --out out")
        check_writable_output(args.out, "--out")
        if os.path.exists(args.out) and os.path.samefile(args.out, args.data):
            raise InputError(f"--out {args.out}: is the --data file; writing would destroy it")
    cpus = os.cpu_count() or 1
    if args.workers is not None and not 1 <= args.workers <= WORKERS_PER_CPU * cpus:
        raise InputError(
            f"--workers {args.workers}: must be between 1 and {WORKERS_PER_CPU * cpus} "
            f"({WORKERS_PER_CPU} per CPU; this machine has {cpus})"
        )
    if not (math.isfinite(args.timeout_s) and args.timeout_s > 0):
        raise InputError(f"--timeout-s {args.timeout_s:g}: must be a finite number of seconds > 0")
    from tulu_jax.rewards.scorer import parse_legacy

    try:
        parse_legacy(args.if_semantics)
    except ValueError as e:
        raise InputError(f"--if-semantics {args.if_semantics}: {e}") from None
    summary = verify_file(
        args.data,
        args.out,
        workers=args.workers,
        timeout_s=args.timeout_s,
        if_semantics=args.if_semantics,
        on_bad_row=args.on_bad_row,
    )
    print(format_table(summary))
    return 0
