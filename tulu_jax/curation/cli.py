"""`tulu-jax data ...`: one subcommand per curation step. Each lives in its own module with `HELP`,
`DESCRIPTION`, `add_arguments(parser)` and `run(args) -> exit code`; heavy imports wait for `run`, so
`--help` stays fast."""

from __future__ import annotations

import argparse
import importlib

# subcommand -> module
SUBCOMMANDS: dict[str, str] = {
    "mix": "tulu_jax.curation.cmd_mix",
    "decontaminate": "tulu_jax.curation.cmd_decontaminate",
    "personas": "tulu_jax.curation.cmd_personas",
    "preferences": "tulu_jax.curation.cmd_preferences",
    "rlvr-if": "tulu_jax.curation.cmd_rlvr_if",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Adds `data` and its subcommands to the top-level `tulu-jax` subparsers."""
    data = sub.add_parser(
        "data",
        help="curate data: mix, decontaminate, personas, preferences, rlvr-if",
        description="Data curation for the Tülu 3 recipe. Every command reads JSONL, Parquet or "
        "datasets.save_to_disk folders, keeps each row's fields (adding a few), prints a summary table and, "
        "run again with the same arguments after a kill, finishes without losing or repeating rows.",
    )
    dsub = data.add_subparsers(dest="data_command", required=True)
    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = dsub.add_parser(name, help=mod.HELP, description=mod.DESCRIPTION)
        mod.add_arguments(p)
        p.set_defaults(fn=lambda args, overrides, mod=mod: _run(mod, args, overrides))


def _run(mod, args, overrides) -> int:
    from tulu_jax.inputs import InputError

    if overrides:
        raise InputError(f"data {args.data_command} takes no key=value overrides, got {overrides}")
    return mod.run(args)
