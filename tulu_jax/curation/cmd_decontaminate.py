"""`tulu-jax data decontaminate`: drop training rows whose user turns contain evaluation instances (8-gram
coverage above 0.5, Tülu 3 §3; open-instruct `decontamination/search.py`), with a removed-rows file and a
Markdown report. See `tulu_jax.curation.decontaminate`."""

from __future__ import annotations

import argparse

from tulu_jax.curation.cli_args import add_on_bad_row_arg

HELP = "remove training rows that contain evaluation instances (n-gram overlap)"
DESCRIPTION = (
    "Removes every training row (its user turns) against which some evaluation instance scores above "
    "--threshold: the fraction of the instance's tokens covered by those of its n-grams (n = --ngram) that "
    "occur in the row (Tülu 3: 8-grams, 0.5); no n-gram spans two user turns. Tokens are NFKC + casefolded "
    "words and single punctuation marks. An instance shorter than n tokens has no n-gram: by default it is "
    "skipped, as in open-instruct, and listed in the report; --short-instances whole removes every row that "
    "contains it whole instead (a 1-token instance such as 'Hi' then removes every row with 'hi'). Writes "
    "the kept rows unchanged and in order to --out (.jsonl, .parquet or a datasets folder), the removed "
    "ones with their best match to OUT.removed.jsonl, and a Markdown report (default OUT.report.md); all "
    "three are written under temporary names and renamed into place, --out last, so a killed run leaves "
    "nothing and an existing --out has both companions. An existing --out is refused without --overwrite. "
    "Evaluation rows give their text in the first of prompt, question, problem, messages (user turns), or "
    "in --eval-field."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's flags."""
    p.add_argument("--data", nargs="+", required=True, metavar="TRAIN", help="training files or folders")
    p.add_argument("--eval", nargs="+", required=True, metavar="EVAL", help="evaluation files or folders")
    p.add_argument("--out", required=True, metavar="CLEAN", help="kept rows: .jsonl, .parquet or a folder")
    p.add_argument("--ngram", type=int, default=8, metavar="N", help="n-gram length in tokens (default 8)")
    p.add_argument(
        "--threshold", type=float, default=0.5, help="remove a row when an instance scores above this (default 0.5)"
    )
    p.add_argument(
        "--short-instances",
        choices=("skip", "whole"),
        default="skip",
        help="evaluation instances shorter than --ngram tokens: skip them (default, as open-instruct) or remove "
        "every row that contains one whole",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its removed file and report)")
    p.add_argument("--report", default=None, metavar="REPORT.md", help="Markdown report (default OUT.report.md)")
    p.add_argument("--eval-field", default=None, metavar="FIELD", help="text field of every evaluation row")
    p.add_argument("--workers", type=int, default=None, metavar="K", help="scanning processes (default: CPUs)")
    add_on_bad_row_arg(p, "a training row that is not JSON or has no user turn (a bad evaluation row always stops)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs the command; returns 0. Bad inputs raise InputError/DataError/FileNotFoundError (exit 2)."""
    from tulu_jax.curation.decontam_report import summary_text
    from tulu_jax.curation.decontaminate import (
        check_outputs,
        check_settings,
        companion_path,
        decontaminate,
        load_eval_sets,
    )
    from tulu_jax.inputs import check_data_path

    # Every flag, input and output path is checked before anything is read.
    check_settings(args.ngram, args.threshold, args.workers, args.short_instances)
    for flag, paths in (("--data", args.data), ("--eval", args.eval)):
        for path in paths:
            check_data_path(path, flag)
    removed = companion_path(args.out, ".removed.jsonl")
    report = args.report or companion_path(args.out, ".report.md")
    sources = [("--data", p) for p in args.data] + [("--eval", p) for p in args.eval]
    check_outputs(args.out, removed, report, sources, overwrite=args.overwrite)
    sets = load_eval_sets(args.eval, args.eval_field)
    summary = decontaminate(
        args.data,
        sets,
        args.out,
        n=args.ngram,
        threshold=args.threshold,
        short_instances=args.short_instances,
        workers=args.workers,
        on_bad_row=args.on_bad_row,
        removed_path=removed,
        report_path=report,
        progress=not args.quiet,
    )
    print(summary_text(summary))
    return 0
