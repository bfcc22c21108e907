"""`tulu-jax data preferences`: preference pairs from a pool of models, rated by an LLM judge (Tülu 3 §5.2;
open-instruct `scripts/synth_pref/` generate_responses.py, create_annotation_mix.py, parse_preferences.py;
the four-aspect rating of UltraFeedback, Cui et al. 2023). See `tulu_jax.curation.preferences` for the mix
and the binarization, `tulu_jax.curation.judge` for the judge prompts and the rating parser."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import threading

HELP = "preference pairs: completions from a model pool, rated 1-5 by an LLM judge, best vs. strictly worse"
DESCRIPTION = (
    "For every prompt, completions from several models of a pool (off-policy: --pool's off_policy_models "
    "distinct models; on-policy, for a --on-policy-share of the prompts: the on-policy model and one other), "
    "each rated 1-5 by the judge on helpfulness, instruction following, honesty and truthfulness in four "
    "requests; chosen = the best mean rating, rejected = a completion with a strictly lower mean. Unparseable "
    "ratings are retried (--retries), then the completion is left out; prompts without a pair are recorded in "
    "OUT.skipped.jsonl. A request a server refuses as too long (HTTP 400) leaves that completion or rating out. "
    "Resumable: rerun the same command after a kill or a failure. Example: "
    "tulu-jax data preferences --prompts prompts.jsonl --pool configs/data/pool.yaml "
    "--judge http://localhost:8001 --out prefs.jsonl"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `tulu-jax data preferences`."""
    p.add_argument("--prompts", required=True, help="prompt rows (messages or prompt): .jsonl, .parquet or a folder")
    p.add_argument("--pool", required=True, help="model pool YAML, e.g. configs/data/pool.yaml")
    p.add_argument("--judge", required=True, help="judge server URL(s), comma-separated (OpenAI-compatible)")
    p.add_argument("--judge-model", default=None, help="the judge's served model id (default: the server's only one)")
    p.add_argument("--judge-api-key-env", default=None, help="environment variable holding the judge's API key")
    p.add_argument("--out", required=True, help="output *.jsonl (pairs); OUT.skipped.jsonl gets prompts without one")
    p.add_argument("--on-policy-share", type=float, default=0.5, help="share of prompts answered on-policy [0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the mix, the sampling and the pair draw")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--retries", type=int, default=2, help="new judge requests after an unparseable rating")
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
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument(
        "--retry-deadline",
        type=float,
        default=300.0,
        help="seconds a failing request (server down, 5xx) keeps being retried before its prompt fails",
    )
    p.add_argument("--overwrite", action="store_true", help="start --out afresh instead of resuming it")


@dataclasses.dataclass
class _Outcome:
    """What one prompt produced: its output row or the reason it has none, plus request counts."""

    key: str
    row: dict | None = None
    reason: str | None = None
    detail: dict = dataclasses.field(default_factory=dict)
    completions: int = 0
    empty: int = 0
    judge_requests: int = 0
    unparseable: int = 0
    unrated_aspects: int = 0
    refused: int = 0


def _check_args(args) -> None:
    from tulu_jax.inputs import InputError, check_data_path, check_writable_output

    check_data_path(args.prompts, "--prompts")
    if not args.out.endswith(".jsonl"):
        raise InputError(f"--out {args.out}: pairs are written row by row as JSONL: name it *.jsonl")
    if os.path.abspath(args.out) == os.path.abspath(args.prompts):
        raise InputError(f"--out {args.out}: is --prompts; write the pairs elsewhere")
    check_writable_output(args.out, "--out")
    checks = [
        ("--on-policy-share", args.on_policy_share, 0 <= args.on_policy_share <= 1, "must be in [0, 1]"),
        ("--concurrency", args.concurrency, args.concurrency >= 1, "must be >= 1"),
        ("--retries", args.retries, args.retries >= 0, "must be >= 0"),
        ("--judge-max-tokens", args.judge_max_tokens, args.judge_max_tokens >= 1, "must be >= 1"),
        ("--judge-temperature", args.judge_temperature, args.judge_temperature >= 0, "must be >= 0"),
        ("--request-timeout", args.request_timeout, args.request_timeout > 0, "must be > 0"),
        ("--retry-deadline", args.retry_deadline, args.retry_deadline >= 0, "must be >= 0"),
    ]
    urls = [u.strip() for u in args.judge.split(",") if u.strip()]
    if not urls or any(not u.startswith(("http://", "https://")) for u in urls):
        raise InputError(f"--judge {args.judge}: expected http(s):// URL(s), comma-separated")
    for flag, value, ok, what in checks:
        if not ok:
            raise InputError(f"{flag} {value}: {what}")


def _read_prompts(path: str):
    """Yields (key, row with its id, prompt text) for every row of `path`; a row without an `id` gets
    "<file stem>-<0-based position>". Raises DataError for a row without a usable prompt or a repeated id."""
    from tulu_jax.curation.rows import iter_rows, user_text
    from tulu_jax.data.chat import DataError

    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    seen: dict[str, str] = {}
    for n, (where, row) in enumerate(iter_rows(path)):
        prompt = user_text(row, where)
        if row.get("id") is None:
            row = {"id": f"{stem}-{n}", **row}
        elif not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise DataError(f"{where}: field 'id' must be a string or an integer, got {row['id']!r:.60}", "bad_id")
        key = str(row["id"])
        if key in seen:
            raise DataError(f"{where}: id {key!r} repeats {seen[key]} (resuming needs unique ids)", "duplicate_id")
        seen[key] = where
        yield key, row, prompt


def _clients(args, pool, pool_path: str):
    """{model name: ChatClient} for the pool models this run may draw, and the judge's client, each checked
    to serve its model. InputError naming the pool key or flag otherwise."""
    from tulu_jax.inputs import InputError
    from tulu_jax.rollout.chat_client import ChatClient
    from tulu_jax.rollout.http import RolloutServerError

    timing = dict(timeout_s=args.request_timeout, retry_deadline_s=args.retry_deadline)
    clients = {}
    for i, m in enumerate(pool.models):
        if m.on_policy and args.on_policy_share == 0:
            continue  # never drawn
        try:
            client = ChatClient(m.urls, model=m.model, api_key_env=m.api_key_env, **timing)
            client.check_model()
        except ValueError as e:  # the API key variable is not set
            raise InputError(f"{pool_path}: models[{i}].api_key_env: {e}") from None
        except RolloutServerError as e:
            raise InputError(f"{pool_path}: models[{i}] ({m.name}): {e}") from None
        clients[m.name] = client
    urls = [u.strip() for u in args.judge.split(",") if u.strip()]
    try:
        judge = ChatClient(urls, model=args.judge_model, api_key_env=args.judge_api_key_env, **timing)
        judge.check_model()
    except (ValueError, RolloutServerError) as e:
        raise InputError(f"--judge {args.judge}: {e}") from None
    return clients, judge


def _refused(error: Exception) -> bool:
    from tulu_jax.rollout.chat_client import ChatRefused

    return isinstance(error, ChatRefused) and error.about_this_request


class _Annotator:
    """The requests of one prompt: completions from its models, four judge ratings per completion, the pair.
    HTTP calls go to a shared pool of `concurrency` threads, so requests of many prompts overlap."""

    def __init__(self, args, pool, clients, judge, http):
        from tulu_jax.curation.judge import RATINGS

        self.args, self.pool, self.clients, self.judge, self.http = args, pool, clients, judge, http
        self.guided = {"structured_outputs": {"choice": list(RATINGS)}} if args.judge_guided else None
        self._index = itertools.count()  # spreads requests over each client's servers
        self._lock = threading.Lock()

    def _next_index(self) -> int:
        with self._lock:
            return next(self._index)

    def _complete(self, key: str, name: str, prompt: str) -> str | None:
        """The completion's text; None when the server refused the request (400: too long for it)."""
        from tulu_jax.curation.preferences import request_seed
        from tulu_jax.rollout.chat_client import ChatParams

        s = self.pool.by_name(name).sampling
        params = ChatParams(s.temperature, s.top_p, s.max_tokens, request_seed(self.args.seed, key, name, "complete"))
        try:
            reply = self.clients[name].chat([{"role": "user", "content": prompt}], params, index=self._next_index())
        except Exception as e:
            if _refused(e):
                return None
            raise
        return reply.text

    def _rate(self, key: str, model: str, aspect: str, prompt: str, text: str) -> tuple[int | None, int, bool]:
        """(rating or None after every retry, requests made, whether the judge refused the request)."""
        from tulu_jax.curation.judge import judge_messages, parse_rating
        from tulu_jax.curation.preferences import request_seed
        from tulu_jax.rollout.chat_client import ChatParams

        a = self.args
        messages = judge_messages(aspect, prompt, text, style=a.judge_prompt)
        for attempt in range(a.retries + 1):
            # A greedy retry would repeat the unparseable answer: retries sample.
            temperature = a.judge_temperature if attempt == 0 else max(a.judge_temperature, 1.0)
            seed = request_seed(a.seed, key, model, aspect, "judge", attempt)
            params = ChatParams(temperature, 1.0, a.judge_max_tokens, seed)
            try:
                reply = self.judge.chat(messages, params, index=self._next_index(), extra_body=self.guided)
            except Exception as e:
                if _refused(e):  # the same request would be refused again
                    return None, attempt + 1, True
                raise
            rating = parse_rating(reply.text)
            if rating is not None:
                return rating, attempt + 1, False
        return None, a.retries + 1, False

    def _gather(self, futures):
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()  # a failed prompt's requests not yet started

    def __call__(self, item) -> _Outcome:
        from tulu_jax.curation.judge import ASPECTS
        from tulu_jax.curation.preferences import Judged, annotation_mix, binarize, pair_row, prompt_rng

        key, row, prompt = item
        a, out = self.args, _Outcome(key)
        policy, names = annotation_mix(self.pool, key, on_policy_share=a.on_policy_share, seed=a.seed)
        answers = self._gather([self.http.submit(self._complete, key, n, prompt) for n in names])
        out.refused = sum(t is None for t in answers)
        names = [n for n, t in zip(names, answers, strict=True) if t is not None]
        texts = [t for t in answers if t is not None]
        out.completions = len(texts)
        jobs = [(k, aspect) for k, t in enumerate(texts) if t.strip() for aspect in ASPECTS]
        out.empty = sum(not t.strip() for t in texts)  # an empty reply is no answer to compare (DPO refuses it)
        rated = self._gather([self.http.submit(self._rate, key, names[k], asp, prompt, texts[k]) for k, asp in jobs])
        ratings = [dict.fromkeys(ASPECTS) for _ in texts]
        for (k, aspect), (rating, requests, refused) in zip(jobs, rated, strict=True):
            ratings[k][aspect] = rating
            out.judge_requests += requests
            out.unparseable += requests - (rating is not None) - refused
            out.unrated_aspects += rating is None
            out.refused += refused
        judged = [Judged(n, t, r) for n, t, r in zip(names, texts, ratings, strict=True)]
        result = binarize(judged, prompt_rng(a.seed, key, "binarize"))
        if result.reason is not None:
            out.reason = result.reason
            out.detail = {"policy": policy, "ratings": [{"model": j.model, "ratings": j.ratings} for j in judged]}
        else:
            out.row = pair_row(row, prompt, judged, result, policy=policy)
        return out


def run(args: argparse.Namespace) -> int:
    """Writes the pairs -> exit code 0, or 1 when some prompts failed because a server stayed down (rerun to
    finish them). Bad flags, files or pool keys raise InputError, ConfigError, DataError or FileNotFoundError
    for the CLI to print (exit 2)."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tulu_jax.curation.preferences import load_pool
    from tulu_jax.curation.requests import run_requests
    from tulu_jax.curation.rows import ResumableJsonl, format_table
    from tulu_jax.inputs import InputError, check_readable_file
    from tulu_jax.rollout.http import RolloutServerError

    _check_args(args)
    check_readable_file(args.pool, "--pool")
    pool = load_pool(args.pool)
    if args.on_policy_share > 0 and pool.on_policy_model is None:
        raise InputError(
            f"--on-policy-share {args.on_policy_share}: {args.pool} has no model with on_policy: true; "
            "add one or pass --on-policy-share 0"
        )
    keys = [key for key, _, _ in _read_prompts(args.prompts)]  # every row checked before any request
    clients, judge = _clients(args, pool, args.pool)

    counts = dict.fromkeys(("completions", "empty", "judge_requests", "unparseable", "unrated_aspects", "refused"), 0)
    reasons: dict[str, int] = {}
    policies = {"on": 0, "off": 0}
    failed, first_error, stats = 0, None, {}
    http = ThreadPoolExecutor(args.concurrency, thread_name_prefix="prefs-http")
    try:
        with ResumableJsonl(args.out, key=lambda r: str(r["id"]), overwrite=args.overwrite) as sink:
            resumed = sum(key in sink.done for key in keys)
            todo = (item for item in _read_prompts(args.prompts) if item[0] not in sink.done)
            annotate = _Annotator(args, pool, clients, judge, http)
            results = run_requests(
                todo, annotate, max_in_flight=args.concurrency, desc="prompts", total=len(keys) - resumed, stats=stats
            )
            for (key, _, _), outcome, error in results:
                if error is not None:
                    if not isinstance(error, RolloutServerError):
                        raise error
                    failed += 1
                    first_error = first_error or f"prompt {key}: {error}"
                    continue
                for name in counts:
                    counts[name] += getattr(outcome, name)
                if outcome.row is not None:
                    sink.append(outcome.row)
                    policies[outcome.row["policy"]] += 1
                else:
                    sink.skip(key, outcome.reason, **outcome.detail)
                    reasons[outcome.reason] = reasons.get(outcome.reason, 0) + 1
    finally:
        http.shutdown(wait=False, cancel_futures=True)

    seconds = stats.get("seconds", 0.0)
    requests = counts["completions"] + counts["judge_requests"]
    rows = [
        ("prompts", len(keys)),
        ("done before (resumed)", resumed),
        ("pairs written", sum(policies.values())),
        ("  on-policy", policies["on"]),
        ("  off-policy", policies["off"]),
        ("skipped: too few rated", reasons.get("too_few_rated", 0)),
        ("skipped: no strictly lower", reasons.get("no_strictly_lower", 0)),
        ("failed (server error)", failed),
        ("completions", counts["completions"]),
        ("  empty (not judged)", counts["empty"]),
        ("judge requests", counts["judge_requests"]),
        ("unparseable ratings", counts["unparseable"]),
        ("aspects left unrated", counts["unrated_aspects"]),
        ("requests refused (too long)", counts["refused"]),
        ("requests/s", requests / seconds if seconds > 0 else 0.0),
    ]
    print(format_table(["", "count"], rows, title=f"data preferences -> {args.out}"))
    if failed:
        print(
            f"tulu-jax: {failed} prompts failed and were not recorded (first: {first_error}); "
            "rerun the same command to finish them",
            file=sys.stderr,
        )
        return 1
    return 0
