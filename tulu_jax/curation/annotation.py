"""The requests behind one preference pair (Tülu 3 §5.2; open-instruct `scripts/synth_pref/`): completions
from the prompt's pool models, four judge ratings per completion with retries of unparseable ones, and the
binarized pair; plus the bookkeeping of refused requests that stops a run whose settings a server rejects.
`tulu_jax.curation.cmd_preferences` drives it over a prompt file."""

from __future__ import annotations

import dataclasses
import itertools
import threading

# Prompts whose requests to one model (or the judge) may all be refused before the run stops: a refusal of
# every request is a setting the server rejects (structured outputs on a hosted API, max_tokens beyond its
# context), not a property of the prompts. Counted in prompts, not requests, since one long prompt makes
# up to 4 judge requests per completion, all refused.
REFUSAL_PROBE = 8


@dataclasses.dataclass
class Outcome:
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


def one_line(text: str, limit: int = 300) -> str:
    """`text` (any object, str() taken) on one line, whitespace runs collapsed, cut to `limit` characters with
    "...": for server messages in summaries and errors."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AllRefused(Exception):
    """Every request of the first REFUSAL_PROBE prompts to `target` (a pool model name, or "judge") was refused
    (or, at the end of a run, every request to it was): a setting the server rejects, not the prompts."""

    def __init__(self, target: str, message: str):
        super().__init__(f"{target}: {message}")
        self.target, self.message = target, message


class Refusals:
    """Counts, per target (a pool model name or "judge"), requests answered and the prompts whose requests
    were refused as about that request (ChatRefused.about_this_request), and trips once `probe` prompts
    were refused by a target that has answered nothing yet: from then on every request of the run raises
    AllRefused. Thread-safe."""

    def __init__(self, probe: int = REFUSAL_PROBE):
        self.probe, self.answered, self.refused, self.first = probe, {}, {}, {}  # refused: target -> prompt keys
        self.tripped: AllRefused | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raises AllRefused once the run is to stop."""
        if self.tripped is not None:
            raise self.tripped

    def ok(self, target: str) -> None:
        """Counts a request to `target` that was answered (such a target never trips the probe)."""
        with self._lock:
            self.answered[target] = self.answered.get(target, 0) + 1

    def refuse(self, target: str, key: str, error: Exception) -> str:
        """Counts a refusal of a request of prompt `key` -> the server's message (one line)."""
        message = one_line(error)
        with self._lock:
            self.refused.setdefault(target, set()).add(key)
            self.first.setdefault(target, message)
            if self.tripped is None and not self.answered.get(target) and len(self.refused[target]) >= self.probe:
                self.tripped = AllRefused(target, self.first[target])
        return message

    def never_answered(self) -> AllRefused | None:
        """At the end of a run: a target every request to which was refused, else None."""
        for target, keys in self.refused.items():
            if keys and not self.answered.get(target):
                return AllRefused(target, self.first[target])
        return None


def is_refusal(error: Exception) -> bool:
    """True when `error` is a ChatRefused about this one request (400/413/422 or a declined answer): the same
    request would be refused again, so it is counted, not retried."""
    from tulu_jax.rollout.chat_client import ChatRefused

    return isinstance(error, ChatRefused) and error.about_this_request


class Annotator:
    """The requests of one prompt: completions from its models, four judge ratings per completion, the pair.
    Called with (key, row, conversation) -> Outcome. `args` holds the run's judge and sampling flags
    (`seed`, `retries`, `on_policy_share`, `judge_guided`, `judge_prompt`, `judge_temperature`,
    `judge_max_tokens`: the `tulu-jax data preferences` namespace); `clients` maps pool model names to
    ChatClients; `http` is a thread pool shared by every prompt, so requests of many prompts overlap.
    Raises what ChatClient raises except refusals about one request, which `refusals` counts (and
    AllRefused once it has tripped)."""

    def __init__(self, args, pool, clients, judge, http, refusals: Refusals):
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
            if is_refusal(e):  # the same request would be refused again
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

    def __call__(self, item) -> Outcome:
        from tulu_jax.curation.judge import ASPECTS, render_conversation
        from tulu_jax.curation.preferences import Judged, annotation_mix, binarize, pair_row, prompt_rng

        key, row, conversation = item
        a, out = self.args, Outcome(key)
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
