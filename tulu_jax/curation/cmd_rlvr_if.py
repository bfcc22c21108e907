"""`tulu-jax data rlvr-if`: instruction-following RLVR prompts from any prompts (Tülu 3 §3.1, §6)."""

from __future__ import annotations

import argparse

from tulu_jax.curation.cli_args import add_on_bad_row_arg

HELP = "append verifiable IF constraints to prompts, with google_ifeval ground truths (RLVR)"
DESCRIPTION = (
    "For every row of --prompts (a 'messages' list, a preference row's 'chosen' or a 'prompt' string), write an "
    "RLVR row: the conversation up to its last user turn (a trailing assistant answer is dropped), that turn "
    "with 1-3 compatible instruction-following constraints appended in words (IFEval's constraint types, kwargs "
    "drawn at random), 'ground_truth' in the google_ifeval format that checks them all, 'dataset' "
    "('google_ifeval') and 'constraints' (the instruction ids); the row's other fields are kept and 'source' "
    "is set to 'rlvr-if' when absent; an existing 'ground_truth'/'dataset' is kept as 'original_ground_truth'/"
    "'original_dataset'. Deterministic given --seed; the output is written whole (atomic), so an existing --out "
    "is replaced only with --overwrite and a killed run leaves none."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `tulu-jax data rlvr-if`."""
    p.add_argument("--prompts", required=True, help="input rows: .jsonl, .parquet or a datasets folder")
    p.add_argument("--out", required=True, help="output: .jsonl, .parquet or a datasets folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the constraint draws (default 0)")
    p.add_argument("--min-constraints", type=int, default=1, help="fewest constraints per prompt (1-3, default 1)")
    p.add_argument("--max-constraints", type=int, default=3, help="most constraints per prompt (1-3, default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_on_bad_row_arg(p, "a row that is not JSON or has no prompt")


def run(args: argparse.Namespace) -> int:
    """Writes the RLVR rows of --prompts to --out (whole, atomically) and prints the summary -> 0. Bad flags, paths
    or rows raise InputError/DataError/FileNotFoundError (exit 2)."""
    from tulu_jax.curation.rlvr_if import rlvr_if_rows
    from tulu_jax.curation.rows import check_output, format_table, iter_rows, write_rows
    from tulu_jax.inputs import InputError, check_data_path

    check_data_path(args.prompts, "--prompts")
    if not 1 <= args.min_constraints <= args.max_constraints <= 3:
        raise InputError(
            f"--min-constraints {args.min_constraints} --max-constraints {args.max_constraints}: "
            "need 1 <= min <= max <= 3"
        )
    check_output(args.out, "--out", overwrite=args.overwrite, sources=[("--prompts", args.prompts)])
    counts: dict = {}
    rows = iter_rows(args.prompts, on_bad_row=args.on_bad_row, counts=counts)
    write_rows(
        args.out,
        rlvr_if_rows(
            rows,
            seed=args.seed,
            min_constraints=args.min_constraints,
            max_constraints=args.max_constraints,
            on_bad_row=args.on_bad_row,
            counts=counts,
        ),
    )
    table = [("rows in", counts["rows_read"]), ("rows out", counts["rows_out"])]
    table += [("answers dropped (trailing assistant turns)", counts["dropped_answers"])]
    table += [("old ground_truth kept as original_ground_truth", counts["kept_ground_truth"])]
    table += [(f"skipped: {reason}", n) for reason, n in sorted(counts["rows_skipped"].items())]
    table += [(f"constraint {cid}", n) for cid, n in sorted(counts["constraints"].items())]
    print(format_table(["rlvr-if", "count"], table, title=f"wrote {args.out}"))
    return 0
