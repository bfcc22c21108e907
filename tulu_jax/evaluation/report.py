"""One accuracy table over the stages of a recipe: `tulu-jax eval` folders in, stage x task accuracy out.

    python -m tulu_jax.evaluation.report sft=runs/eval/sft-tiny dpo=runs/eval/dpo-tiny rlvr=runs/eval/rlvr-tiny \\
        --out runs/report/accuracy.json

Prints the table and writes {STAGE: {TASK: accuracy}} (stages in the order given). A folder without a
complete summary.json is a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tulu_jax.evaluation.runner import write_json


def read_accuracies(eval_dir: str, stage: str) -> dict[str, float]:
    """{task: accuracy} from `eval_dir`/summary.json. ValueError naming the stage and file when it is missing,
    unreadable, or a task is incomplete."""
    path = os.path.join(eval_dir, "summary.json")
    try:
        with open(path, encoding="utf-8") as f:
            tasks = json.load(f)["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{stage}={eval_dir}: no readable tulu-jax eval summary at {path} ({e})") from None
    out = {}
    for name, s in tasks.items():
        if not s.get("complete", False):
            raise ValueError(f"{stage}={eval_dir}: task {name} is incomplete; rerun tulu-jax eval")
        out[name] = float(s["accuracy"])
    return out


def format_report(report: dict[str, dict[str, float]]) -> str:
    """Rows = stages, columns = tasks (union, in first-seen order), accuracy to 3 decimals ('-' if absent)."""
    tasks = list(dict.fromkeys(t for accs in report.values() for t in accs))
    lines = [f"{'stage':<8}" + "".join(f"{t:>12}" for t in tasks)]
    for stage, accs in report.items():
        lines.append(f"{stage:<8}" + "".join(f"{accs[t]:>12.3f}" if t in accs else f"{'-':>12}" for t in tasks))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring) -> exit code: 0, or 2 after one `report: error:` line."""
    parser = argparse.ArgumentParser(
        prog="python -m tulu_jax.evaluation.report", description="stage x task accuracy from tulu-jax eval folders"
    )
    parser.add_argument("stages", nargs="+", help="STAGE=EVAL_DIR, in table order")
    parser.add_argument("--out", required=True, help="JSON file to write ({STAGE: {TASK: accuracy}})")
    args = parser.parse_args(argv)
    report: dict[str, dict[str, float]] = {}
    try:
        for spec in args.stages:
            stage, sep, folder = spec.partition("=")
            if not sep or not stage or not folder:
                raise ValueError(f"{spec}: expected STAGE=EVAL_DIR")
            report[stage] = read_accuracies(folder, stage)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, report)
    except (ValueError, OSError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
