"""`tulu-jax data mix`: build an SFT, preference or prompt mixture from a YAML config (see
`tulu_jax.curation.mixing` and configs/data/tiny_mix.yaml)."""

from __future__ import annotations

import argparse

from tulu_jax.curation.cli_args import add_on_bad_row_arg

HELP = "mix SFT / preference / prompt sources with exact and near-duplicate removal"
DESCRIPTION = (
    "Builds a mixture from the sources of a YAML config (kind: sft|preference|prompt, seed, sources with path "
    "and count or ratio, dedup: exact/near/threshold/num_perm/shingle_size). Rows keep their fields and gain "
    "a `source` tag when they have none. Duplicates by normalised user turns (NFKC, case-folded, whitespace "
    "collapsed) are removed, earlier sources winning; near duplicates by MinHash + LSH over shingles of words "
    "and punctuation. Same config -> byte-identical JSONL or Parquet output, written atomically; a JSON summary "
    "goes to OUT.summary.json. --overwrite replaces a file, or a folder only when it is an earlier "
    "save_to_disk output. "
    "Example: tulu-jax data mix --config configs/data/tiny_mix.yaml --out /tmp/mix.jsonl"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `tulu-jax data mix`."""
    p.add_argument("--config", help="mix config YAML, e.g. configs/data/tiny_mix.yaml (required)")
    p.add_argument("--out", help="output: *.jsonl, *.parquet, or a datasets.save_to_disk folder (required)")
    add_on_bad_row_arg(p, "a row that is not JSON or not valid for the kind")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type and default")


def config_help() -> str:
    """Every key of a mix config, one line each (`sources[i].KEY` for the keys of each source)."""
    from tulu_jax.configlib import config_help as keys_help
    from tulu_jax.curation.mixing import MixConfig, SourceConfig

    return keys_help(MixConfig) + "\n" + keys_help(SourceConfig, "sources[i]")


def _check_out(args, cfg) -> None:
    import os

    from tulu_jax.curation.mixing import HUB_PREFIX, resolve_path, summary_path
    from tulu_jax.curation.rows import check_output, remove_stale_partials
    from tulu_jax.inputs import InputError

    out = args.out
    sources = [
        (f"sources[{i}].path", resolve_path(s.path))
        for i, s in enumerate(cfg.sources)
        if not s.path.startswith(HUB_PREFIX)
    ]
    check_output(out, "--out", overwrite=args.overwrite, sources=sources)
    summary = summary_path(out)
    if os.path.isdir(summary):
        raise InputError(f"--out {out}: its summary {summary} is a directory; move it or pick another --out")
    remove_stale_partials(summary)


def _write_summary(path: str, summary: dict) -> None:
    """Writes the JSON summary atomically (temporary name, then rename)."""
    import json
    import os

    from tulu_jax.curation.rows import partial_path

    tmp = partial_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    """Builds the mix -> exit code 0; errors are raised for the CLI to print (ConfigError, InputError,
    DataError: exit 2). Warnings (a source that gives no rows) go to stderr and the summary."""
    import sys

    from tulu_jax.curation.mixing import iter_mix, load_mix_config, mix_summary, plan_mix, summary_path
    from tulu_jax.curation.rows import format_table, write_rows
    from tulu_jax.data.chat import DataError
    from tulu_jax.inputs import InputError, check_readable_file

    if args.help_config:
        print(config_help())
        return 0
    for flag, value in (("--config", args.config), ("--out", args.out)):
        if not value:
            raise InputError(f"{flag}: required")
    check_readable_file(args.config, "--config")
    cfg = load_mix_config(args.config)
    _check_out(args, cfg)
    plans = plan_mix(cfg, args.config, on_bad_row=args.on_bad_row)
    expected = sum(p.rows_out for p in plans)
    summary = mix_summary(cfg, args.config, args.out, plans)
    for warning in summary["warnings"]:
        print(f"tulu-jax: warning: {warning}", file=sys.stderr)

    def check_and_summarise(n: int) -> None:
        # before the output is renamed into place: a wrong count leaves no output, and an output always
        # has its summary (a kill in between leaves a summary without output, which a rerun replaces)
        if n != expected:  # iter_mix raises first when a source shrank; this catches one that grew
            raise DataError(
                f"--out {args.out}: wrote {n} rows, planned {expected}: a source changed while mixing", "changed"
            )
        _write_summary(summary_path(args.out), summary)

    write_rows(args.out, iter_mix(plans), before_replace=check_and_summarise)
    header = ["source", "rows in", "bad rows", "exact dups", "near dups", "after dedup", "rows out"]
    keys = ("rows_in", "bad_rows", "exact_duplicates", "near_duplicates", "rows_after_dedup", "rows_out")
    rows = [[s["name"], *(s[k] for k in keys)] for s in summary["sources"]]
    rows.append(["total", *(summary["totals"][k] for k in keys)])
    title = f"{cfg.kind} mix -> {args.out} (summary: {summary_path(args.out)})"
    print(format_table(header, rows, title=title), file=sys.stdout)
    return 0
