#!/usr/bin/env python
"""Every benchmark of the project in one command, each in a child process, then ONE combined table.

    python scripts/bench_all.py [--quick] [--only a,b] [--skip a,b] [--out BENCHMARKS.json]
                                [--vllm auto|on|off] [--timeout-s S]

Benchmarks (name: script, what it measures):
  train     bench_train.py --task sft   our SFT step against transformers + PyTorch, % of the matmul peak
  dpo       bench_train.py --task dpo   the same for the DPO step (dpo_norm, cached reference)
  generate  bench_generate.py           the local sampler against transformers `generate`; with vLLM, a real
                                        server's throughput and weight-push time
  verify    bench_verify.py             verifications/s of the Scorer pool per verifier
  rlvr      bench_rlvr.py               RLVR step time by phase (local sampler, tiny model)
  gpu       bench_gpu.py                SFT/DPO MFU, decode and RLVR phases on a ~1.2B model: only where
                                        `nvidia-smi -L` lists a GPU (else a "skipped" row)
  push      bench_push.py               weight-push seconds per GB: only if scripts/bench_push.py exists
  decontam  bench_decontam.py           `tulu-jax data decontaminate` prompts/s and recall, 1M synthetic rows

Each child runs with its own `--json PATH` (its own table still prints, streamed here as it runs), and its
JSON is read back into rows of (benchmark, case, metric, value, unit). `--quick` gives every benchmark its
smallest sizes and step counts: a smoke run of a few minutes whose figures only show that the pipeline works.
vLLM (bench_generate --vllm): `auto` (default) turns it on when the vLLM interpreter exists
($TULU_JAX_VLLM_PYTHON or .venv-vllm/bin/python, as `tulu_jax.rollout.server` finds it) and --quick is off.

A benchmark that fails (non-zero exit, time-out, no JSON) becomes a row whose metric is "error" and whose
value is its last error line; the others still run, and the exit code is 1 at the end.

JSON read back, for scripts that want to join (bench_push.py and later ones): either a list of row dicts, or
a dict holding such a list under "rows" (other top-level keys are ignored), or a dict of metrics (read as one
row). In a row, "case" (else "row", else the row's string fields) names the case; every other int or float
field is a metric; its unit comes from the row's "units" dict ({"metric": "unit"}) when given, else from the
field name's suffix (`UNIT_SUFFIXES`), else it is blank. So bench_push.py can write
    {"rows": [{"case": "tiny 3.7M", "gb": 0.015, "push_s": 0.13, "s_per_gb": 8.7}]}
`--out` writes {"machine": ..., "argv": ..., "benchmarks": {name: {"command", "rc", "wall_s", "result"}},
"rows": [...]}, "result" being the child's JSON as it wrote it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from machine import describe_machine  # scripts/machine.py, next to this script (sys.path[0])

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
# Units of generic metrics from their names, the longest matching suffix first.
UNIT_SUFFIXES = (
    ("s_per_gb", "s/GB"),
    ("tokens_per_s", "tok/s"),
    ("tok_s", "tok/s"),
    ("gflop_s", "GFLOP/s"),
    ("per_s", "1/s"),
    ("_gb", "GB"),
    ("_mb", "MB"),
    ("_s", "s"),
)


@dataclasses.dataclass(frozen=True)
class Bench:
    """One benchmark: its script and arguments (full and --quick), how to name a row's case, which fields to
    report as (field, unit, scale) (None: every numeric field, units from their names), and environment
    defaults for its process."""

    name: str
    script: str
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    case: tuple[str, ...] = ("case", "row")
    metrics: tuple[tuple[str, str, float], ...] | None = None
    env: tuple[tuple[str, str], ...] = ()


TRAIN_METRICS = (
    ("jax_tok_s", "tok/s", 1),
    ("torch_tok_s", "tok/s", 1),
    ("jax_over_torch", "x", 1),
    ("jax_gflop_s", "GFLOP/s", 1),
    ("pct_jax_peak", "% of jax fp32 matmul peak", 1),
    ("pct_torch_peak", "% of torch matmul peak", 1),
    ("torch_pct_torch_peak", "% of torch matmul peak (torch step)", 1),
)
TRAIN_QUICK = ("--sizes", "bench-15m", "--dtype", "float32", "--seq-len", "128", "--steps", "1", "--warmup", "0")
TRAIN_QUICK += ("--rounds", "1", "--peak-n", "512", "--peak-reps", "1")
RLVR_PHASES = ("generate", "scoring", "forward", "update", "push", "wait_rollout", "step")

BENCHES = (
    Bench("train", "bench_train.py", ("--task", "sft"), ("--task", "sft", "--batch", "2", *TRAIN_QUICK),
          ("size", "dtype"), TRAIN_METRICS),
    Bench("dpo", "bench_train.py", ("--task", "dpo"), ("--task", "dpo", "--pairs", "1", *TRAIN_QUICK),
          ("size", "dtype"), (("jax_pairs_s", "pairs/s", 1), ("torch_pairs_s", "pairs/s", 1), *TRAIN_METRICS)),
    Bench("generate", "bench_generate.py", (),
          ("--batches", "1,4", "--prompt-len", "16", "--new-tokens", "16", "--reps", "1"),
          ("engine", "batch", "what"),
          (("tokens_per_s", "tok/s", 1), ("seconds", "s", 1), ("server_start_s", "s", 1), ("push_s", "s", 1))),
    Bench("verify", "bench_verify.py", (), ("--gsm8k", "200", "--math", "20", "--ifeval", "200", "--reps", "1"),
          ("verifier", "items"), (("per_s", "verifications/s", 1), ("per_s_per_worker", "verifications/s", 1))),
    Bench("rlvr", "bench_rlvr.py", (), ("--models", "tiny", "--steps", "2", "--batch-size", "8", "--max-tokens", "8"),
          ("backend", "model", "async_steps"),
          tuple((p, "s", 1) for p in RLVR_PHASES) + (("gen_tok_s", "tok/s", 1), ("tok_s", "tok/s", 1))),
    Bench("gpu", "bench_gpu.py", (),
          ("--steps", "2", "--warmup", "0", "--seq-len", "512", "--batch", "2", "--pairs", "1", "--decode-batches",
           "1,8", "--new-tokens", "32", "--rlvr-prompts", "8", "--rlvr-new-tokens", "32"),
          ("row",),
          (("tokens_per_s", "tok/s", 1), ("mfu", "% MFU", 100), ("step_s", "s", 1), ("decode_s", "s", 1),
           ("seconds", "s", 1)),
          env=(("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),)),  # as bench_gpu.sh: its rows build models in turn
    Bench("push", "bench_push.py"),
    Bench("decontam", "bench_decontam.py", (), ("--quick",)),
)  # fmt: skip
NAMES = tuple(b.name for b in BENCHES)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallest sizes and steps of each benchmark (smoke run)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(NAMES)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--out", metavar="JSON", default=None, help="also write the machine, raw results and rows here")
    ap.add_argument(
        "--vllm",
        choices=("auto", "on", "off"),
        default="auto",
        help="run bench_generate --vllm (a real vLLM server): auto = when .venv-vllm exists, not with --quick",
    )
    ap.add_argument("--timeout-s", type=float, default=3 * 3600, help="per benchmark (default 3 hours)")
    args = ap.parse_args(argv)
    for flag in ("only", "skip"):
        names = [n for n in getattr(args, flag).split(",") if n]
        for n in names:
            if n not in NAMES:
                ap.error(f"--{flag}: {n!r} is not one of {', '.join(NAMES)}")
        setattr(args, flag, names)
    if args.timeout_s <= 0:
        ap.error("--timeout-s must be > 0")
    return args


# --- reading a benchmark's JSON ---------------------------------------------------------------------------


def json_rows(doc) -> list[dict]:
    """The row dicts of a child's JSON: a list of dicts, a dict's "rows" list, or a dict of metrics (one row).
    ValueError for anything else."""
    if isinstance(doc, dict) and "rows" in doc:
        doc = doc["rows"]
    elif isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise ValueError("expected a list of row dicts, {'rows': [...]} or a dict of metrics")
    return doc


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def case_name(row: dict, fields: tuple[str, ...]) -> str:
    """The row's case: its `fields` that it has (numbers as field=value); with none of them, its string
    fields; "-" when it has neither."""
    present = [f for f in fields if row.get(f) not in (None, "")]
    if not present:
        present = [k for k, v in row.items() if isinstance(v, str) and k != "error"]
    parts = [f"{f}={row[f]}" if _is_number(row[f]) else str(row[f]) for f in present]
    return " ".join(parts) or "-"


def guess_unit(field: str) -> str:
    """The unit `UNIT_SUFFIXES` gives a metric's name ("" when none fits)."""
    return next((unit for suffix, unit in UNIT_SUFFIXES if field.endswith(suffix)), "")


def table_rows(bench: Bench, doc) -> list[dict]:
    """(benchmark, case, metric, value, unit) rows of one benchmark's JSON `doc`; a row of the child that
    reports an "error" gives an error row."""
    out = []
    for row in json_rows(doc):
        case = case_name(row, bench.case)
        if "error" in row:
            out.append(dict(benchmark=bench.name, case=case, metric="error", value=str(row["error"]), unit=""))
            continue
        if bench.metrics is None:
            units = row.get("units") if isinstance(row.get("units"), dict) else {}
            specs = [
                (k, units.get(k, guess_unit(k)), 1) for k, v in row.items() if _is_number(v) and k not in bench.case
            ]
        else:
            specs = [s for s in bench.metrics if _is_number(row.get(s[0]))]
        for field, unit, scale in specs:
            out.append(dict(benchmark=bench.name, case=case, metric=field, value=row[field] * scale, unit=unit))
    return out


# --- running ----------------------------------------------------------------------------------------------


def vllm_python_exists() -> bool:
    """Whether the vLLM interpreter `tulu_jax.rollout.server` would use exists ($TULU_JAX_VLLM_PYTHON, else
    .venv-vllm/bin/python), checked without importing tulu_jax."""
    path = os.environ.get("TULU_JAX_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    return os.access(path, os.X_OK)


def gpu_names() -> list[str]:
    """The GPUs `nvidia-smi -L` lists (none without the tool or a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split(":", 1)[1].split("(")[0].strip() for line in out.stdout.splitlines() if line.startswith("GPU")]


def skip_reason(bench: Bench, args) -> str | None:
    """Why `bench` cannot run here (None: it can)."""
    path = SCRIPTS / bench.script
    if not path.exists():
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        return f"{shown} does not exist"
    if bench.name == "gpu" and not gpu_names():
        return "no GPU (nvidia-smi -L lists none)"
    return None


def command(bench: Bench, args, json_path: str) -> list[str]:
    """The child's command line: this interpreter, the script, its full or --quick arguments, --json."""
    argv = list(bench.quick if args.quick else bench.args)
    if bench.name == "generate" and (
        args.vllm == "on" or (args.vllm == "auto" and not args.quick and vllm_python_exists())
    ):
        argv.append("--vllm")
    return [sys.executable, str(SCRIPTS / bench.script), *argv, "--json", json_path]


def _echo(stream, tail: deque) -> None:
    """Copies a child's output to ours as it comes, keeping the last lines for an error message."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line)


def last_error_line(lines) -> str:
    """The last line that names an error (a traceback's last line, `... error: ...`), else the last line."""
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "FAILED" in line:
            return line[:200]
    return lines[-1][:200] if lines else "(no output)"


def run_bench(bench: Bench, args, env: dict) -> tuple[dict, list[dict]]:
    """Runs one benchmark, streaming its output -> (its record for --out, its table rows)."""
    with tempfile.TemporaryDirectory(prefix=f"bench_{bench.name}_") as tmp:
        json_path = os.path.join(tmp, "result.json")
        cmd = command(bench, args, json_path)
        print(f"\n## {bench.name}: {' '.join(cmd[1:])}", flush=True)
        tail: deque[str] = deque(maxlen=40)
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**dict(bench.env), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        pump = threading.Thread(target=_echo, args=(proc.stdout, tail), daemon=True)
        pump.start()
        try:
            rc = proc.wait(timeout=args.timeout_s)
            error = None if rc == 0 else f"exit code {rc}: {last_error_line(tail)}"
        except subprocess.TimeoutExpired:
            proc.kill()
            rc, error = proc.wait(), f"timed out after {args.timeout_s:g} s"
        pump.join(timeout=10)
        wall = time.perf_counter() - start
        doc = None
        if os.path.exists(json_path):
            with open(json_path) as f:
                doc = json.load(f)
    rows = []
    if doc is not None:
        try:
            rows = table_rows(bench, doc)
        except ValueError as e:
            error = error or f"its --json output: {e}"
    elif error is None:
        error = "it wrote no --json output"
    if error is not None:
        rows.append(dict(benchmark=bench.name, case="-", metric="error", value=error, unit=""))
    record = dict(command=cmd[1:], rc=rc, wall_s=wall, result=doc)
    return record, rows


def format_value(v) -> str:
    """A table cell: numbers to about 3-4 significant digits (thousands with separators), text as it is."""
    if not _is_number(v):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def format_table(rows: list[dict]) -> str:
    """The combined Markdown table: benchmark | case | metric | value | unit."""
    lines = ["| benchmark | case | metric | value | unit |", "|---|---|---|---:|---|"]
    for r in rows:
        value = format_value(r["value"]).replace("|", "/")
        lines.append(f"| {r['benchmark']} | {r['case']} | {r['metric']} | {value} | {r['unit']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the chosen benchmarks in turn, prints the combined table, writes --out; 1 if any failed."""
    args = parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    machine = describe_machine(gpus=gpu_names())
    print("# bench_all: " + ", ".join(f"{k} {v}" for k, v in machine.items() if v), flush=True)
    records, rows, failed = {}, [], False
    start = time.perf_counter()
    for bench in BENCHES:
        if (args.only and bench.name not in args.only) or bench.name in args.skip:
            continue
        reason = skip_reason(bench, args)
        if reason:
            print(f"\n## {bench.name}: skipped ({reason})", flush=True)
            rows.append(dict(benchmark=bench.name, case="-", metric="skipped", value=reason, unit=""))
            continue
        records[bench.name], bench_rows = run_bench(bench, args, env)
        rows += bench_rows
        failed |= any(r["metric"] == "error" for r in bench_rows)
    print(f"\n# all benchmarks{' (--quick)' if args.quick else ''}: {time.perf_counter() - start:.0f} s\n")
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                dict(machine=machine, argv=sys.argv, quick=args.quick, benchmarks=records, rows=rows), f, indent=1
            )
        print(f"\nwrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
