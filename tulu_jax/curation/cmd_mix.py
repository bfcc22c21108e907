"""`tulu-jax data mix`: build an SFT, preference or prompt mixture from a YAML config (see
`tulu_jax.curation.mixing` and configs/data/tiny_mix.yaml)."""

from __future__ import annotations

import argparse

HELP = "mix SFT / preference / prompt sources with exact and near-duplicate removal"
DESCRIPTION = (
    "Builds a mixture from the sources of a YAML config (kind: sft|preference|prompt, seed, sources with path "
    "and count or ratio, dedup: exact/near/threshold/num_perm/shingle_size). Rows keep their fields and gain "
    "a `source` tag when they have none. Duplicates by normalised user turns (NFKC, case-folded, whitespace "
    "collapsed) are removed, earlier sources winning; near duplicates by MinHash + LSH over word shingles. "
    "Same config -> byte-identical output, written atomically; a JSON summary goes to OUT.summary.json. "
    "Example: tulu-jax data mix --config configs/data/tiny_mix.yaml --out /tmp/mix.jsonl"
)

# Names that look like a file but are not a format write_rows can produce (it would make a folder).
_NOT_OUTPUT = (".json", ".csv", ".tsv", ".txt", ".gz", ".arrow", ".yaml", ".yml")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `tulu-jax data mix`."""
    p.add_argument("--config", help="mix config YAML, e.g. configs/data/tiny_mix.yaml (required)")
    p.add_argument("--out", help="output: *.jsonl, *.parquet, or a datasets.save_to_disk folder (required)")
    p.add_argument(
        "--on-bad-row",
        choices=("error", "skip"),
        default="error",
        help="error: stop at the first invalid row, naming file, line and field; skip: count it and go on",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type and default")


def config_help() -> str:
    """Every key of a mix config, one line each (`sources[i].KEY` for the keys of each source)."""
    from tulu_jax.configlib import config_help as keys_help
    from tulu_jax.curation.mixing import MixConfig, SourceConfig

    return keys_help(MixConfig) + "\n" + keys_help(SourceConfig, "sources[i]")


def _check_out(args, cfg) -> None:
    import os

    from tulu_jax.curation.mixing import HUB_PREFIX, resolve_path
    from tulu_jax.inputs import InputError, check_writable_output

    out = args.out
    if out.endswith(_NOT_OUTPUT):
        raise InputError(f"--out {out}: name it *.jsonl, *.parquet, or a folder (datasets.save_to_disk)")
    if os.path.exists(out) and not args.overwrite:
        raise InputError(f"--out {out}: exists; pass --overwrite to replace it")
    for i, s in enumerate(cfg.sources):
        if not s.path.startswith(HUB_PREFIX) and os.path.abspath(resolve_path(s.path)) == os.path.abspath(out):
            raise InputError(f"--out {out}: is sources[{i}].path; write the mix elsewhere")
    if out.endswith((".jsonl", ".parquet")):
        check_writable_output(out, "--out")
    elif os.path.isfile(out):
        raise InputError(f"--out {out}: is a file; a name without .jsonl/.parquet is a save_to_disk folder")


def run(args: argparse.Namespace) -> int:
    """Builds the mix -> exit code 0; errors are raised for the CLI to print (ConfigError, InputError,
    DataError: exit 2)."""
    import json
    import os
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
    n = write_rows(args.out, iter_mix(plans))
    if n != expected:  # iter_mix raises first when a source shrank; this catches one that grew
        raise DataError(
            f"--out {args.out}: wrote {n} rows, planned {expected}: a source changed while mixing", "changed"
        )
    summary = mix_summary(cfg, args.config, args.out, plans)
    tmp = summary_path(args.out) + f".partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, summary_path(args.out))
    header = ["source", "rows in", "bad rows", "exact dups", "near dups", "after dedup", "rows out"]
    keys = ("rows_in", "bad_rows", "exact_duplicates", "near_duplicates", "rows_after_dedup", "rows_out")
    rows = [[s["name"], *(s[k] for k in keys)] for s in summary["sources"]]
    rows.append(["total", *(summary["totals"][k] for k in keys)])
    title = f"{cfg.kind} mix -> {args.out} (summary: {summary_path(args.out)})"
    print(format_table(header, rows, title=title), file=sys.stdout)
    return 0
