"""`tulu-jax data preferences`: preference pairs from a pool of models, rated by an LLM judge (Tülu 3 §5.2;
open-instruct `scripts/synth_pref/` generate_responses.py, create_annotation_mix.py, parse_preferences.py;
the four-aspect rating of UltraFeedback, Cui et al. 2023). See `tulu_jax.curation.preferences` for the mix
and the binarization, `tulu_jax.curation.judge` for the judge prompts and the rating parser."""

from __future__ import annotations

import argparse
import dataclasses
import os

from tulu_jax.curation.annotation import AllRefused, Annotator, Refusals, one_line

HELP = "preference pairs: completions from a model pool, rated 1-5 by an LLM judge, best vs. strictly worse"
DESCRIPTION = (
    "For every prompt (a conversation up to its last user turn), completions from several models of a pool "
    "(off-policy: --pool's off_policy_models distinct models; on-policy, for a --on-policy-share of the "
    "prompts: the on-policy model and one other), each rated 1-5 by the judge on helpfulness, instruction "
    "following, honesty and truthfulness in four requests; chosen = the best mean rating, rejected = a "
    "completion with a strictly lower mean. Unparseable ratings are retried (--retries), then the completion "
    "is left out; prompts without a pair are recorded in OUT.skipped.jsonl. A request a server refuses "
    "(HTTP 400/413/422: too long for its context) leaves that completion or rating out, and a prompt left "
    "without a pair by refusals is recorded as `refused`; when the first requests to a model or the judge are "
    "all refused (a flag the server does not support), the run stops with exit code 2. Resumable: rerun the "
    "same command after a kill or a failure. Example: tulu-jax data preferences --prompts prompts.jsonl "
    "--pool configs/data/pool.yaml --judge http://localhost:8001 --out prefs.jsonl"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `tulu-jax data preferences`."""
    from tulu_jax.curation.cli_args import add_on_bad_row_arg, add_request_args

    p.add_argument("--prompts", required=True, help="prompt rows (messages or prompt): .jsonl, .parquet or a folder")
    p.add_argument("--pool", required=True, help="model pool YAML, e.g. configs/data/pool.yaml")
    p.add_argument("--judge", required=True, help="judge server URL(s), comma-separated (OpenAI-compatible)")
    p.add_argument("--judge-model", default=None, help="the judge's served model id (default: the server's only one)")
    p.add_argument("--judge-api-key-env", default=None, help="environment variable holding the judge's API key")
    p.add_argument("--out", required=True, help="output *.jsonl (pairs); OUT.skipped.jsonl gets prompts without one")
    p.add_argument("--on-policy-share", type=float, default=0.5, help="share of prompts answered on-policy [0, 1]")
    add_on_bad_row_arg(p, "a prompt row without a usable conversation or id")
    add_request_args(p, retries_help="new judge requests after an unparseable rating")
    p.add_argument(
        "--judge-guided",
        action="store_true",
        help="constrain the judge's answer to 1..5 (vLLM's structured_outputs choice; hosted APIs refuse it)",
    )
    p.add_argument(
        "--judge-prompt",
        choices=("full", "brief"),
        default="full",
        help="full: every grade described; brief: a short prompt for judges with a small context",
    )
    p.add_argument("--judge-max-tokens", type=int, default=256, help="tokens of each judge answer")
    p.add_argument(
        "--judge-temperature",
        type=float,
        default=0.0,
        help="judge temperature of the first request (retries sample at >= 1.0 with a new seed)",
    )


def _check_args(args) -> list[str]:
    """Checks the flags and the --out path before any server is contacted -> the judge URLs."""
    from tulu_jax.curation.cli_args import check_request_args, parse_urls
    from tulu_jax.inputs import InputError, check_data_path, check_writable_output

    check_data_path(args.prompts, "--prompts")
    check_request_args(args)
    if not args.out.endswith(".jsonl"):
        raise InputError(f"--out {args.out}: pairs are written row by row as JSONL: name it *.jsonl")
    for flag, path in (("--prompts", args.prompts), ("--pool", args.pool)):
        if os.path.realpath(args.out) == os.path.realpath(path):
            raise InputError(f"--out {args.out}: is {flag}; write the pairs elsewhere")
    check_writable_output(args.out, "--out")
    checks = [
        ("--on-policy-share", args.on_policy_share, 0 <= args.on_policy_share <= 1, "must be in [0, 1]"),
        ("--judge-max-tokens", args.judge_max_tokens, args.judge_max_tokens >= 1, "must be >= 1"),
        ("--judge-temperature", args.judge_temperature, args.judge_temperature >= 0, "must be >= 0"),
    ]
    for flag, value, ok, what in checks:
        if not ok:
            raise InputError(f"{flag} {value}: {what}")
    return parse_urls(args.judge, "--judge")


def _read_prompts(path: str, on_bad_row: str = "error", counts: dict | None = None):
    """Yields (key, row with its id, prompt conversation) for every row of `path`; a row without an `id`
    gets "<file stem>-<0-based position>". A row without a usable conversation (`prompt_messages`), with a
    bad or repeated id raises DataError under on_bad_row "error", or is counted in
    `counts["rows_skipped"][reason]` under "skip"."""
    from tulu_jax.curation.preferences import prompt_messages
    from tulu_jax.curation.rows import iter_rows
    from tulu_jax.data.chat import DataError

    counts = {} if counts is None else counts
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    seen: dict[str, str] = {}
    for n, (where, row) in enumerate(iter_rows(path, on_bad_row=on_bad_row, counts=counts)):
        try:
            conversation = prompt_messages(row, where)
            if row.get("id") is None:
                row = {"id": f"{stem}-{n}", **row}
            elif not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
                raise DataError(f"{where}: field 'id' must be a string or an integer, got {row['id']!r:.60}", "bad_id")
            key = str(row["id"])
            if key in seen:
                raise DataError(f"{where}: id {key!r} repeats {seen[key]} (resuming needs unique ids)", "duplicate_id")
        except DataError as e:
            if on_bad_row == "error":
                raise
            skipped = counts.setdefault("rows_skipped", {})
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        seen[key] = where
        yield key, row, conversation


def _clients(args, pool, pool_path: str, judge_urls: list[str]):
    """{model name: ChatClient} for the pool models this run may draw, and the judge's client, each checked
    to serve its model. InputError naming the pool key or flag otherwise."""
    from tulu_jax.curation.cli_args import parse_urls
    from tulu_jax.inputs import InputError
    from tulu_jax.rollout.chat_client import ChatClient
    from tulu_jax.rollout.http import RolloutServerError

    timing = dict(timeout_s=args.request_timeout, retry_deadline_s=args.retry_deadline)
    clients = {}
    for i, m in enumerate(pool.models):
        if m.on_policy and args.on_policy_share == 0:
            continue  # never drawn
        try:
            urls = parse_urls(",".join(m.urls), f"{pool_path}: models[{i}].urls")
            client = ChatClient(urls, model=m.model, api_key_env=m.api_key_env, **timing)
            client.check_model()
        except ValueError as e:  # the API key variable is not set
            if isinstance(e, InputError):
                raise
            raise InputError(f"{pool_path}: models[{i}].api_key_env: {e}") from None
        except RolloutServerError as e:
            raise InputError(f"{pool_path}: models[{i}] ({m.name}): {e}") from None
        clients[m.name] = client
    try:
        judge = ChatClient(judge_urls, model=args.judge_model, api_key_env=args.judge_api_key_env, **timing)
        judge.check_model()
    except (ValueError, RolloutServerError) as e:
        raise InputError(f"--judge {args.judge}: {e}") from None
    return clients, judge


# Where a model is served and how to authenticate do not shape the rows (the served model id, compared
# instead, does): a server restarted on another port, or a new key, resumes the same output.
_NOT_SETTINGS = ("urls", "api_key_env")


def _settings(args, pool, clients, judge) -> dict:
    """What shapes the rows of --out: a resumed run must use the same (ResumableJsonl refuses otherwise).
    The pool (sampling, mix), the served model ids, the judge's model, prompt, sampling, guidance and
    retries, the on-policy share and the seed."""
    models = [{k: v for k, v in dataclasses.asdict(m).items() if k not in _NOT_SETTINGS} for m in pool.models]
    return {
        "pool": {"off_policy_models": pool.off_policy_models, "models": models},
        "served_models": {name: c.model for name, c in clients.items()},
        "judge": {
            "model": judge.model,
            "guided": args.judge_guided,
            "prompt": args.judge_prompt,
            "temperature": args.judge_temperature,
            "max_tokens": args.judge_max_tokens,
        },
        "on_policy_share": args.on_policy_share,
        "seed": args.seed,
        "retries": args.retries,
    }


def _all_refused_error(error: AllRefused, args, pool, recorded: bool) -> str:
    """The one-line reason a run stopped because every request to one target was refused."""
    if error.target == "judge":
        what = f"--judge {args.judge} (model {args.judge_model or 'served'})"
        hint = "check --judge-guided (hosted APIs refuse structured outputs), --judge-max-tokens and --judge-model"
    else:
        i = next(k for k, m in enumerate(pool.models) if m.name == error.target)
        m = pool.models[i]
        what = f"{args.pool}: models[{i}] ({m.name}, model {m.model or 'served'})"
        hint = f"check models[{i}].sampling.max_tokens against the server's context, and its model"
    rerun = (
        "add --overwrite if the fix changes a setting, since rows were written" if recorded else "nothing was written"
    )
    return (
        f"{what}: the server refused every request it got ({error.message}); {hint}. The prompts this cost "
        f"were not recorded: fix it and rerun ({rerun})"
    )


def run(args: argparse.Namespace) -> int:
    """Writes the pairs -> exit code 0, or 1 when some prompts failed because a server stayed down (rerun to
    finish them). Bad flags, files or pool keys raise InputError, ConfigError, DataError or FileNotFoundError
    for the CLI to print (exit 2); so does a model or judge that refused every request (InputError, after the
    summary)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tulu_jax.curation.preferences import load_pool
    from tulu_jax.curation.requests import run_requests
    from tulu_jax.curation.rows import ResumableJsonl, format_table
    from tulu_jax.inputs import InputError, check_readable_file
    from tulu_jax.rollout.http import RolloutServerError

    judge_urls = _check_args(args)
    check_readable_file(args.pool, "--pool")
    pool = load_pool(args.pool)
    if args.on_policy_share > 0 and pool.on_policy_model is None:
        raise InputError(
            f"--on-policy-share {args.on_policy_share}: {args.pool} has no model with on_policy: true; "
            "add one or pass --on-policy-share 0"
        )
    row_counts: dict = {}
    # every row checked before any request
    keys = [key for key, _, _ in _read_prompts(args.prompts, args.on_bad_row, row_counts)]
    clients, judge = _clients(args, pool, args.pool, judge_urls)
    n_off = len(pool.off_policy_names)
    few_models = n_off < pool.off_policy_models and args.on_policy_share < 1
    if few_models:
        print(
            f"tulu-jax: note: {args.pool} has {n_off} off-policy models, fewer than off_policy_models "
            f"{pool.off_policy_models}: off-policy prompts get {n_off} completions",
            file=sys.stderr,
        )

    counts = dict.fromkeys(("completions", "empty", "judge_requests", "unparseable", "unrated_aspects", "refused"), 0)
    reasons: dict[str, int] = {}
    policies = {"on": 0, "off": 0}
    failed, first_error, stats, held, aborted, not_started = 0, None, {}, [], None, 0
    refusals = Refusals()
    http = ThreadPoolExecutor(args.concurrency, thread_name_prefix="prefs-http")
    settings = _settings(args, pool, clients, judge)
    try:
        with ResumableJsonl(args.out, key=lambda r: str(r["id"]), overwrite=args.overwrite, settings=settings) as sink:
            resumed = sum(key in sink.done for key in keys)
            todo = (item for item in _read_prompts(args.prompts, args.on_bad_row) if item[0] not in sink.done)
            annotate = Annotator(args, pool, clients, judge, http, refusals)
            results = run_requests(
                todo,
                annotate,
                max_in_flight=args.concurrency,
                desc="prompts",
                total=len(keys) - resumed,
                stats=stats,
                stop_when=lambda e: isinstance(e, (RolloutServerError, AllRefused)),
                progress=not args.quiet,
            )
            for (key, _, _), outcome, error in results:
                if error is not None:
                    if isinstance(error, AllRefused):
                        aborted = aborted or error
                        continue
                    if not isinstance(error, RolloutServerError):
                        raise error
                    failed += 1
                    first_error = first_error or f"prompt {key}: {one_line(error)}"
                    continue
                for name in counts:
                    counts[name] += getattr(outcome, name)
                if outcome.row is not None:
                    sink.append(outcome.row)
                    policies[outcome.row["policy"]] += 1
                elif outcome.refused_by:
                    held.append(outcome)  # recorded at the end, once the refusals are known to be per prompt
                else:
                    sink.skip(key, outcome.reason, **outcome.detail)
                    reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
            # prompts a stop left unstarted failed too: a rerun does them
            not_started = len(keys) - resumed - stats.get("requests", 0)
            failed += not_started
            aborted = aborted or refusals.tripped or refusals.never_answered()
            if aborted is None:  # every refusing server answered other requests: these prompts are the cause
                for o in held:
                    sink.skip(o.key, "refused", server_error=next(iter(o.refused_by.values())), **o.detail)
                reasons["refused"] = len(held)
        if aborted is not None and resumed == sink.written == sink.skipped == 0:
            # nothing was recorded under these settings: the fixed rerun may change them
            if os.path.exists(sink.settings_path):
                os.remove(sink.settings_path)
    finally:
        http.shutdown(wait=False, cancel_futures=True)

    seconds = stats.get("seconds", 0.0)
    requests = counts["completions"] + counts["judge_requests"]
    rows = [
        ("prompts", len(keys)),
        *((f"  bad rows skipped: {r}", n) for r, n in sorted(row_counts.get("rows_skipped", {}).items())),
        ("done before (resumed)", resumed),
        ("pairs written", sum(policies.values())),
        ("  on-policy", policies["on"]),
        ("  off-policy", policies["off"]),
        ("skipped: too few rated", reasons.get("too_few_rated", 0)),
        ("skipped: no strictly lower", reasons.get("no_strictly_lower", 0)),
        ("skipped: refused", reasons.get("refused", 0)),
        ("failed (server error)", failed),
        ("  not started (run stopped)", not_started),
        ("left for a rerun (refused)", len(held) if aborted else 0),
        ("completions", counts["completions"]),
        ("  empty (not judged)", counts["empty"]),
        ("judge requests", counts["judge_requests"]),
        ("unparseable ratings", counts["unparseable"]),
        ("aspects left unrated", counts["unrated_aspects"]),
        ("requests refused", counts["refused"]),
        ("requests/s", requests / seconds if seconds > 0 else 0.0),
    ]
    if few_models:
        rows.append((f"off-policy models (off_policy_models {pool.off_policy_models})", n_off))
    print(format_table(["", "count"], rows, title=f"data preferences -> {args.out}"))
    if aborted is not None:
        recorded = resumed + sum(policies.values()) + sum(reasons.values()) > 0
        raise InputError(_all_refused_error(aborted, args, pool, recorded))
    if failed:
        print(
            f"tulu-jax: {failed} prompts failed and were not recorded (first: {first_error}); "
            "rerun the same command to finish them",
            file=sys.stderr,
        )
        return 1
    return 0
