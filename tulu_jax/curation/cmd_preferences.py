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

# Prompts whose requests to one model (or the judge) may all be refused before the run stops: a refusal of
# every request is a setting the server rejects (structured outputs on a hosted API, max_tokens beyond its
# context), not a property of the prompts. Counted in prompts, not requests, since one long prompt makes
# up to 4 judge requests per completion, all refused.
REFUSAL_PROBE = 8


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


@dataclasses.dataclass
class _Outcome:
    """What one prompt produced: its output row or the reason it has none, plus request counts.
    `refused_by` maps each target (pool model name, or "judge") that refused a request of this prompt to
    the server's message."""

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
    refused_by: dict = dataclasses.field(default_factory=dict)


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


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _AllRefused(Exception):
    """Every request of the first REFUSAL_PROBE prompts to `target` (a pool model name, or "judge") was refused
    (or, at the end of a run, every request to it was): a setting the server rejects, not the prompts."""

    def __init__(self, target: str, message: str):
        super().__init__(f"{target}: {message}")
        self.target, self.message = target, message


class _Refusals:
    """Counts, per target (a pool model name or "judge"), requests answered and the prompts whose requests
    were refused as about that request (ChatRefused.about_this_request), and trips once `probe` prompts
    were refused by a target that has answered nothing yet: from then on every request of the run raises
    _AllRefused. Thread-safe."""

    def __init__(self, probe: int = REFUSAL_PROBE):
        self.probe, self.answered, self.refused, self.first = probe, {}, {}, {}  # refused: target -> prompt keys
        self.tripped: _AllRefused | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raises _AllRefused once the run is to stop."""
        if self.tripped is not None:
            raise self.tripped

    def ok(self, target: str) -> None:
        with self._lock:
            self.answered[target] = self.answered.get(target, 0) + 1

    def refuse(self, target: str, key: str, error: Exception) -> str:
        """Counts a refusal of a request of prompt `key` -> the server's message (one line)."""
        message = _one_line(error)
        with self._lock:
            self.refused.setdefault(target, set()).add(key)
            self.first.setdefault(target, message)
            if self.tripped is None and not self.answered.get(target) and len(self.refused[target]) >= self.probe:
                self.tripped = _AllRefused(target, self.first[target])
        return message

    def never_answered(self) -> _AllRefused | None:
        """At the end of a run: a target every request to which was refused, else None."""
        for target, keys in self.refused.items():
            if keys and not self.answered.get(target):
                return _AllRefused(target, self.first[target])
        return None


def _refused(error: Exception) -> bool:
    from tulu_jax.rollout.chat_client import ChatRefused

    return isinstance(error, ChatRefused) and error.about_this_request


class _Annotator:
    """The requests of one prompt: completions from its models, four judge ratings per completion, the pair.
    HTTP calls go to a shared pool of `concurrency` threads, so requests of many prompts overlap."""

    def __init__(self, args, pool, clients, judge, http, refusals: _Refusals):
        from tulu_jax.curation.judge import RATINGS

        self.args, self.pool, self.clients, self.judge, self.http = args, pool, clients, judge, http
        self.refusals = refusals
        self.guided = {"structured_outputs": {"choice": list(RATINGS)}} if args.judge_guided else None
        self._index = itertools.count()  # spreads requests over each client's servers
        self._lock = threading.Lock()

    def _next_index(self) -> int:
        with self._lock:
            return next(self._index)

    def _ask(self, key: str, target: str, client, messages, params, extra_body=None):
        """One chat request -> (reply text, None), or (None, the server's message) when it was refused."""
        self.refusals.check()
        try:
            reply = client.chat(messages, params, index=self._next_index(), extra_body=extra_body)
        except Exception as e:
            if _refused(e):  # the same request would be refused again
                return None, self.refusals.refuse(target, key, e)
            raise
        self.refusals.ok(target)
        return reply.text, None

    def _complete(self, key: str, name: str, conversation: list[dict]) -> tuple[str | None, str | None]:
        """(the completion's text, None), or (None, the server's message) when the request was refused."""
        from tulu_jax.curation.cli_args import request_seed
        from tulu_jax.rollout.chat_client import ChatParams

        s = self.pool.by_name(name).sampling
        params = ChatParams(s.temperature, s.top_p, s.max_tokens, request_seed(self.args.seed, key, name, "complete"))
        return self._ask(key, name, self.clients[name], conversation, params)

    def _rate(self, key: str, model: str, aspect: str, request: str, text: str) -> tuple[int | None, int, str | None]:
        """(rating or None after every retry, requests made, the server's message if it refused the request)."""
        from tulu_jax.curation.cli_args import request_seed
        from tulu_jax.curation.judge import judge_messages, parse_rating
        from tulu_jax.rollout.chat_client import ChatParams

        a = self.args
        messages = judge_messages(aspect, request, text, style=a.judge_prompt)
        for attempt in range(a.retries + 1):
            # A greedy retry would repeat the unparseable answer: retries sample.
            temperature = a.judge_temperature if attempt == 0 else max(a.judge_temperature, 1.0)
            seed = request_seed(a.seed, key, model, aspect, "judge", attempt)
            params = ChatParams(temperature, 1.0, a.judge_max_tokens, seed)
            answer, refusal = self._ask(key, "judge", self.judge, messages, params, self.guided)
            if refusal is not None:
                return None, attempt + 1, refusal
            rating = parse_rating(answer)
            if rating is not None:
                return rating, attempt + 1, None
        return None, a.retries + 1, None

    def _gather(self, futures):
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()  # a failed prompt's requests not yet started

    def __call__(self, item) -> _Outcome:
        from tulu_jax.curation.judge import ASPECTS, render_conversation
        from tulu_jax.curation.preferences import Judged, annotation_mix, binarize, pair_row, prompt_rng

        key, row, conversation = item
        a, out = self.args, _Outcome(key)
        policy, names = annotation_mix(self.pool, key, on_policy_share=a.on_policy_share, seed=a.seed)
        answers = self._gather([self.http.submit(self._complete, key, n, conversation) for n in names])
        for name, (_, refusal) in zip(names, answers, strict=True):
            if refusal is not None:
                out.refused += 1
                out.refused_by.setdefault(name, refusal)
        names = [n for n, (t, _) in zip(names, answers, strict=True) if t is not None]
        texts = [t for t, _ in answers if t is not None]
        out.completions = len(texts)
        jobs = [(k, aspect) for k, t in enumerate(texts) if t.strip() for aspect in ASPECTS]
        out.empty = sum(not t.strip() for t in texts)  # an empty reply is no answer to compare (DPO refuses it)
        request = render_conversation(conversation)
        rated = self._gather([self.http.submit(self._rate, key, names[k], asp, request, texts[k]) for k, asp in jobs])
        ratings = [dict.fromkeys(ASPECTS) for _ in texts]
        for (k, aspect), (rating, requests, refusal) in zip(jobs, rated, strict=True):
            ratings[k][aspect] = rating
            out.judge_requests += requests
            out.unparseable += requests - (rating is not None) - (refusal is not None)
            out.unrated_aspects += rating is None
            if refusal is not None:
                out.refused += 1
                out.refused_by.setdefault("judge", refusal)
        judged = [Judged(n, t, r) for n, t, r in zip(names, texts, ratings, strict=True)]
        result = binarize(judged, prompt_rng(a.seed, key, "binarize"))
        if result.reason is not None:
            out.reason = result.reason
            out.detail = {"policy": policy, "ratings": [{"model": j.model, "ratings": j.ratings} for j in judged]}
        else:
            out.row = pair_row(row, conversation, judged, result, policy=policy)
        return out


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


def _all_refused_error(error: _AllRefused, args, pool, recorded: bool) -> str:
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
    refusals = _Refusals()
    http = ThreadPoolExecutor(args.concurrency, thread_name_prefix="prefs-http")
    settings = _settings(args, pool, clients, judge)
    try:
        with ResumableJsonl(args.out, key=lambda r: str(r["id"]), overwrite=args.overwrite, settings=settings) as sink:
            resumed = sum(key in sink.done for key in keys)
            todo = (item for item in _read_prompts(args.prompts, args.on_bad_row) if item[0] not in sink.done)
            annotate = _Annotator(args, pool, clients, judge, http, refusals)
            results = run_requests(
                todo,
                annotate,
                max_in_flight=args.concurrency,
                desc="prompts",
                total=len(keys) - resumed,
                stats=stats,
                stop_when=lambda e: isinstance(e, (RolloutServerError, _AllRefused)),
                progress=not args.quiet,
            )
            for (key, _, _), outcome, error in results:
                if error is not None:
                    if isinstance(error, _AllRefused):
                        aborted = aborted or error
                        continue
                    if not isinstance(error, RolloutServerError):
                        raise error
                    failed += 1
                    first_error = first_error or f"prompt {key}: {_one_line(error)}"
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
