"""`tulu-jax data personas`: persona-driven prompt synthesis over OpenAI-compatible endpoints (Tülu 3 §3.1;
open-instruct `scripts/persona_driven_data_gen/`)."""

from __future__ import annotations

import argparse
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
    "<out>.skipped.jsonl, as are duplicate prompts. Requests the servers do not answer within --retry-deadline "
    "are left undone (exit 1): rerun the same command to finish. --respond then writes <out stem>.responses.jsonl: "
    "each prompt row with the model's answer appended as an assistant turn."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    p.add_argument("--retries", type=int, default=2, help="new tries of a malformed reply (default 2)")
    p.add_argument("--retry-deadline", type=float, default=300.0, help="seconds a failing request is retried (300)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request (default 600)")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key (bearer token)")
    p.add_argument("--seed", type=int, default=0, help="seed of request seeds and IF constraints (default 0)")
    p.add_argument("--overwrite", action="store_true", help="start --out (and its side files) afresh")


def responses_path(out: str) -> str:
    """Where `--respond` writes: `<out without .jsonl>.responses.jsonl`."""
    return out[: -len(".jsonl")] + ".responses.jsonl"


def _check_flags(args) -> None:
    from tulu_jax.curation.persona_templates import SKILLS
    from tulu_jax.inputs import InputError, check_data_path

    check_data_path(args.personas, "--personas")
    if args.skill not in SKILLS:
        raise InputError(f"--skill {args.skill}: must be one of {', '.join(SKILLS)}")
    checks = [
        ("--n", args.n, args.n >= 1, ">= 1"),
        ("--concurrency", args.concurrency, args.concurrency >= 1, ">= 1"),
        ("--retries", args.retries, args.retries >= 0, ">= 0"),
        ("--max-tokens", args.max_tokens, args.max_tokens >= 1, ">= 1"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--retry-deadline", args.retry_deadline, args.retry_deadline > 0, "> 0"),
        ("--timeout", args.timeout, args.timeout > 0, "> 0"),
    ]
    for flag, value, ok, need in checks:
        if not ok:
            raise InputError(f"{flag} {value}: must be {need}")
    if args.api_key_env and not os.environ.get(args.api_key_env):
        raise InputError(f"--api-key-env {args.api_key_env}: the environment variable is not set")
    if not args.out.endswith(".jsonl"):
        raise InputError(f"--out {args.out}: must be a .jsonl file (written row by row)")


def _client(args):
    from tulu_jax.inputs import InputError
    from tulu_jax.rollout.chat_client import ChatClient
    from tulu_jax.rollout.http import RolloutServerError

    urls = [u.strip() for u in args.endpoint.split(",") if u.strip()]
    try:
        client = ChatClient(
            urls,
            model=args.model,
            api_key_env=args.api_key_env,
            timeout_s=args.timeout,
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
    ]
    rows += [(f"  malformed: {reason}", n) for reason, n in sorted(counts["malformed"].items())]
    rows += [
        ("failed (rerun to retry)", counts["failed"]),
        ("chat requests", counts["requests"]),
        ("requests/s", counts["requests"] / max(counts["seconds"], 1e-9)),
    ]
    return format_table(["personas", "count"], rows, title=title)


def run(args: argparse.Namespace) -> int:
    from tulu_jax.curation.personas import Settings, load_personas, plan_jobs, synthesize_prompts, synthesize_responses
    from tulu_jax.curation.rows import ResumableJsonl
    from tulu_jax.rollout.chat_client import ChatParams

    _check_flags(args)
    personas = load_personas(args.personas)
    client = _client(args)
    settings = Settings(
        ChatParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens),
        retries=args.retries,
        seed=args.seed,
        concurrency=args.concurrency,
    )
    jobs = plan_jobs(personas, args.skill, args.n, args.seed)
    counts: dict = {}
    existing: list[dict] = []
    with ResumableJsonl(args.out, key=lambda r: r["id"], overwrite=args.overwrite, on_row=existing.append) as out:
        synthesize_prompts(client, jobs, out, skill=args.skill, settings=settings, counts=counts, existing=existing)
    print(_table(f"{args.out} ({len(personas)} personas in {args.personas})", counts, len(jobs)))
    failed = counts["failed"]
    if args.respond:
        keys = {j.key for j in jobs}
        rows: list[dict] = []
        with ResumableJsonl(args.out, key=lambda r: r["id"], on_row=lambda r: r["id"] in keys and rows.append(r)):
            pass
        resp_counts: dict = {}
        with ResumableJsonl(responses_path(args.out), key=lambda r: r["id"], overwrite=args.overwrite) as out:
            synthesize_responses(client, rows, out, settings=settings, counts=resp_counts)
        print(_table(f"{responses_path(args.out)} (responses)", resp_counts, len(rows)))
        failed += resp_counts["failed"]
        counts["failures"] += resp_counts["failures"]
    if failed:
        print(f"tulu-jax: first failure: {counts['failures'][0]}", file=sys.stderr)
        print(
            f"tulu-jax: {failed} requests got no answer before the retry deadline and were not recorded; "
            "rerun the same command to finish them",
            file=sys.stderr,
        )
        return 1
    return 0
