"""`tulu-jax data personas`: persona-driven prompt synthesis over OpenAI-compatible endpoints (Tülu 3 §3.1;
open-instruct `scripts/persona_driven_data_gen/`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

HELP = "synthesise skill prompts (math, grade_math, code, if) from personas with a served model"
DESCRIPTION = (
    "One chat request per persona (request i uses persona i mod the file's size: the first --n personas, "
    "cycling when --n exceeds the file) asks --model for a prompt of --skill (math: a hard problem with at most "
    "two sub-problems; grade_math: an elementary arithmetic word problem; code: a Python task; if: a request to "
    "which 1-3 verifiable constraints are appended, with the google_ifeval ground truth). Rows are appended to "
    "--out as they finish; malformed replies (empty, cut at --max-tokens, refusals, missing the prefix the "
    "template asks for, too short) are retried with another seed --retries times, then recorded in "
    "<out>.skipped.jsonl, as are duplicate prompts and requests the server refuses (HTTP 400/413/422: a "
    "persona or prompt too long for the model; but if the first 8 requests are all refused, or any is refused "
    "for a bad key or model (401/403/404), the command stops with exit 2 quoting the server). Requests the "
    "servers do not answer within --retry-deadline are left undone and no new ones start (exit 1): rerun the "
    "same command to finish. A rerun with other settings (model, skill, seed, sampling, personas) is refused "
    "unless --overwrite. --respond then writes <out stem>.responses.jsonl: "
    "each prompt row with the model's answer appended as an assistant turn."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `tulu-jax data personas` (the request flags come from `cli_args`)."""
    from tulu_jax.curation.cli_args import add_on_bad_row_arg, add_request_args

    p.add_argument(
        "--personas", required=True, help="persona rows {'id', 'persona'} (.jsonl, .parquet, datasets folder)"
    )
    p.add_argument("--skill", required=True, help="math, grade_math, code or if")
    p.add_argument("--endpoint", required=True, help="server URL(s), comma-separated (http://host:port[/v1])")
    p.add_argument("--model", required=True, help="model name the endpoints serve")
    p.add_argument("--n", type=int, required=True, help="number of prompts to ask for")
    p.add_argument("--out", required=True, help="output .jsonl (appended row by row; rerun to resume)")
    p.add_argument("--respond", action="store_true", help="also write <out stem>.responses.jsonl with answers")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens per reply (default 1024)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key (bearer token)")
    add_on_bad_row_arg(p, "a persona row that is not JSON or has no persona or a bad id")
    add_request_args(p, retries_help="new tries of a malformed reply")


def responses_path(out: str) -> str:
    """Where `--respond` writes: `<out without .jsonl>.responses.jsonl`."""
    return out[: -len(".jsonl")] + ".responses.jsonl"


def _check_flags(args) -> None:
    from tulu_jax.curation.cli_args import check_request_args, parse_urls
    from tulu_jax.curation.persona_templates import SKILLS
    from tulu_jax.inputs import InputError, check_data_path, check_writable_output

    check_data_path(args.personas, "--personas")
    if args.skill not in SKILLS:
        raise InputError(f"--skill {args.skill}: must be one of {', '.join(SKILLS)}")
    check_request_args(args)
    parse_urls(args.endpoint, "--endpoint")
    checks = [
        ("--n", args.n, args.n >= 1, ">= 1"),
        ("--max-tokens", args.max_tokens, args.max_tokens >= 1, ">= 1"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
    ]
    for flag, value, ok, need in checks:
        if not ok:
            raise InputError(f"{flag} {value}: must be {need}")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        raise InputError(f"--api-key-env {args.api_key_env}: the environment variable is not set")
    if not args.out.endswith(".jsonl"):
        raise InputError(f"--out {args.out}: must be a .jsonl file (written row by row)")
    outputs = [args.out, responses_path(args.out)] if args.respond else [args.out]
    for path in outputs:
        if os.path.realpath(path) == os.path.realpath(args.personas):
            raise InputError(f"--out {path}: is --personas ({args.personas}); write the output elsewhere")
        check_writable_output(path, "--out")


def _settings_record(args, personas: list[dict[str, str]], part: str) -> dict:
    """What shapes the rows of one output file (`part`: "prompts" or "responses"), kept beside it so a
    rerun with other settings is refused: not --n (a larger --n extends a run), nor the endpoints,
    concurrency or deadlines (where and how fast, not what)."""
    digest = hashlib.sha256(json.dumps(personas, sort_keys=True).encode()).hexdigest()
    return {
        "command": "data personas",
        "part": part,
        "skill": args.skill,
        "model": args.model,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "retries": args.retries,
        "personas_sha256": digest,
    }


def _client(args):
    from tulu_jax.curation.cli_args import parse_urls
    from tulu_jax.inputs import InputError
    from tulu_jax.rollout.chat_client import ChatClient
    from tulu_jax.rollout.http import RolloutServerError

    urls = parse_urls(args.endpoint, "--endpoint")
    try:
        client = ChatClient(
            urls,
            model=args.model,
            api_key_env=args.api_key_env,
            timeout_s=args.request_timeout,
            retry_deadline_s=args.retry_deadline,
        )
        client.check_model()  # every request would be refused otherwise
    except ValueError as e:
        raise InputError(f"--endpoint {args.endpoint}: {e}") from None
    except RolloutServerError as e:
        raise InputError(f"--endpoint {args.endpoint}: {' '.join(str(e).split())}") from None
    return client


def _table(title: str, counts: dict, requested: int):
    from tulu_jax.curation.rows import format_table

    rows = [
        ("requested", requested),
        ("already done (resumed)", counts["resumed"]),
        ("written", counts["written"]),
        ("duplicates (skipped)", counts["duplicates"]),
        ("malformed (skipped)", sum(counts["malformed"].values())),
        ("refused by the server (skipped)", counts["refused"]),
    ]
    rows += [(f"  malformed: {reason}", n) for reason, n in sorted(counts["malformed"].items())]
    rows += [
        ("failed (rerun to retry)", counts["failed"]),
        ("chat requests", counts["requests"]),
        ("requests/s", counts["requests"] / max(counts["seconds"], 1e-9)),
    ]
    return format_table(["personas", "count"], rows, title=title)


def run(args: argparse.Namespace) -> int:
    """Runs the prompt pass (and, with --respond, the response pass) -> 0, or 1 when requests went unanswered before
    the retry deadline (rerun to finish). Bad flags or files raise InputError/DataError/FileNotFoundError (exit 2);
    a run whose first requests are all refused, or refused for every request (401/404), raises InputError quoting
    the server."""
    from tulu_jax.curation.personas import (
        Aborted,
        Settings,
        load_personas,
        plan_jobs,
        synthesize_prompts,
        synthesize_responses,
    )
    from tulu_jax.curation.rows import ResumableJsonl
    from tulu_jax.inputs import InputError
    from tulu_jax.rollout.chat_client import ChatParams

    _check_flags(args)
    read: dict = {}
    personas = load_personas(args.personas, on_bad_row=args.on_bad_row, counts=read)
    client = _client(args)
    settings = Settings(
        ChatParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens),
        retries=args.retries,
        seed=args.seed,
        concurrency=args.concurrency,
        progress=not args.quiet,
    )
    jobs = plan_jobs(personas, args.skill, args.n, args.seed)
    counts: dict = {}
    existing: list[dict] = []
    title = f"{args.out} ({len(personas)} personas in {args.personas}"
    title += "".join(f"; {n} rows skipped: {reason}" for reason, n in sorted(read["rows_skipped"].items())) + ")"
    try:
        with ResumableJsonl(
            args.out,
            key=lambda r: r["id"],
            overwrite=args.overwrite,
            on_row=existing.append,
            settings=_settings_record(args, personas, "prompts"),
        ) as out:
            synthesize_prompts(client, jobs, out, skill=args.skill, settings=settings, counts=counts, existing=existing)
        print(_table(title, counts, len(jobs)))
        failed = counts["failed"]
        if args.respond and not failed:  # responses to a half-done prompt file would need a rerun anyway
            keys = {j.key for j in jobs}
            rows: list[dict] = []
            with ResumableJsonl(args.out, key=lambda r: r["id"], on_row=lambda r: r["id"] in keys and rows.append(r)):
                pass
            resp_counts: dict = {}
            with ResumableJsonl(
                responses_path(args.out),
                key=lambda r: r["id"],
                overwrite=args.overwrite,
                settings=_settings_record(args, personas, "responses"),
            ) as out:
                synthesize_responses(client, rows, out, settings=settings, counts=resp_counts)
            print(_table(f"{responses_path(args.out)} (responses)", resp_counts, len(rows)))
            failed += resp_counts["failed"]
            counts["failures"] += resp_counts["failures"]
    except Aborted as e:
        raise InputError(f"--endpoint {args.endpoint}: {e}") from None
    if failed:
        for line in counts["failures"]:
            print(f"tulu-jax: failed: {line}", file=sys.stderr)
        print(
            f"tulu-jax: {failed} requests got no answer before the retry deadline and were not recorded; "
            "rerun the same command to finish them",
            file=sys.stderr,
        )
        return 1
    return 0
