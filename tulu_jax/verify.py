"""`tulu-jax verify`: scores a JSONL of responses with the RLVR verifiers and prints accuracy per verifier.

Input rows use the field names of Tülu's RLVR data (open-instruct `ground_truth_utils.py`, Tülu 3 §6):
`response` (the model output; the text after its last `<|assistant|>\\n` is checked), `ground_truth` and
`dataset` (`gsm8k`, `math`/`MATH`, `ifeval`, `google_ifeval`; case-insensitive). `ground_truth` must be a
string: IF constraints are the JSON text Tülu's datasets store there, not a decoded object, so the
verifier sees exactly what the dataset holds. Each row of `--out` is the input row, in input order, plus
`score` (1.0/0.0), `verifier` (canonical dataset name) and `verify_status` (ok, timeout or error).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from tulu_jax.inputs import InputError, check_data_path, check_writable_output

BATCH_ROWS = 4096  # rows scored per Scorer call (and per --out flush)
FIELDS = ("response", "ground_truth", "dataset")


def add_arguments(p) -> None:
    """The `verify` subcommand's flags, on the argparse parser `p`."""
    p.add_argument("--data", required=True, help="JSONL (or Parquet) of rows {response, ground_truth, dataset}")
    p.add_argument("--out", help="JSONL: every input row, in order, plus score, verifier and verify_status")
    p.add_argument("--workers", type=int, default=None, help="verifier processes (default: one per CPU)")
    p.add_argument("--timeout-s", type=float, default=10.0, help="hard deadline per response, seconds")
    p.add_argument(
        "--if-semantics",
        default="head",
        help="IF constraint semantics: head (open-instruct HEAD), 2024, or 2024:f1,f2 (2024 for those functions)",
    )
    p.add_argument("--on-bad-row", choices=("error", "skip"), default="error")


def parse_row(row: Any, where: str):
    """The VerifyItem of one input row. Raises DataError naming `where` (file and line) and the field:
    not an object, a missing or non-string field, an unknown dataset (the message lists the known ones)."""
    from tulu_jax.data.chat import DataError
    from tulu_jax.rewards.registry import UnknownDataset, canonical_dataset
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
    return row, VerifyItem(dataset, row["response"], row["ground_truth"])


def _batches(rows: Iterator, size: int) -> Iterator[list]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _scored_line(row: Mapping, verdict) -> str:
    scored = {**row, "score": verdict.score, "verifier": verdict.verifier, "verify_status": verdict.status}
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
    (reason -> count)}. Raises DataError for a bad row unless on_bad_row="skip"."""
    from tqdm import tqdm

    from tulu_jax.data.sources import iter_valid_rows
    from tulu_jax.rewards.scorer import Scorer

    counts: dict[str, Any] = {}
    table: dict[str, dict[str, Any]] = {}
    rows = iter_valid_rows([data], on_bad_row, counts, parse_row)
    # A lone surrogate (valid in JSON escapes) cannot be UTF-8: it is written back as the same \\uXXXX escape.
    sink = open(out, "w", encoding="utf-8", errors="backslashreplace") if out else None  # noqa: SIM115
    try:
        with Scorer(workers, timeout_s, if_semantics) as scorer, tqdm(unit="row", disable=None) as bar:
            for batch in _batches(rows, BATCH_ROWS):
                verdicts = scorer.score([item for _, item in batch])
                for v in verdicts:
                    entry = table.setdefault(v.verifier, {"n": 0, "passed": 0, "timeouts": 0, "errors": 0})
                    entry["n"] += 1
                    entry["passed"] += v.score == 1.0
                    entry["timeouts"] += v.status == "timeout"
                    entry["errors"] += v.status == "error"
                if sink is not None:
                    sink.write("".join(_scored_line(row, v) for (row, _), v in zip(batch, verdicts, strict=True)))
                    sink.flush()
                bar.update(len(batch))
    finally:
        if sink is not None:
            sink.close()
    for entry in table.values():
        entry["accuracy"] = entry["passed"] / entry["n"]
    return {
        "verifiers": dict(sorted(table.items())),
        "rows_read": counts.get("rows_read", 0),
        "rows_skipped": counts.get("rows_skipped", {}),
    }


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
        lines.append(
            f"skipped bad rows: {sum(skipped.values())} ({', '.join(f'{k}: {v}' for k, v in skipped.items())})"
        )
    return "\n".join(lines)


def run(args, overrides) -> int:
    """`tulu-jax verify`: checks the flags (InputError naming the flag), scores --data, prints the table."""
    if overrides:
        raise InputError(f"verify takes no key=value overrides, got {overrides}")
    check_data_path(args.data, "--data")
    if args.out is not None:
        check_writable_output(args.out, "--out")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers {args.workers}: must be >= 1")
    if not args.timeout_s > 0:
        raise InputError(f"--timeout-s {args.timeout_s}: must be > 0")
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
