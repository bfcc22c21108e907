"""Persona-driven prompt synthesis (Tülu 3 §3.1; open-instruct `scripts/persona_driven_data_gen/`; PersonaHub,
Chan et al. 2024): one chat request per persona asks a model for a prompt of one skill, and an optional second
pass asks for each prompt's response.

Resumable and parallel: rows are appended to a `ResumableJsonl` as requests finish (many in flight across
the endpoints through `run_requests`), so a killed run, rerun, does only what is missing. Per request:
- a reply that `persona_templates.extract_prompt` rejects (empty, cut at max_tokens, a refusal, no prefix,
  too short) is asked again with another seed, up to `retries` more times, then recorded as skipped with its
  reason; nothing is ever made up in its place;
- a prompt whose normalised text (`normalize.normalize_text`) an earlier row already has is recorded as a duplicate;
- a request the server refuses as such (HTTP 400/413/422: a persona or prompt longer than the model's
  context; a content filter) is recorded as skipped (`refused`, with the server's message): asking again
  gets the same answer. But when no row was written yet and the first `PROBE` requests are all refused,
  the settings are at fault (max tokens beyond the context, a bad model option): `Aborted` is raised
  quoting the server, and nothing is recorded. A refusal that concerns every request (401/403/404: a bad
  key, an unknown model) raises `Aborted` at once;
- a request the servers do not answer before the retry deadline is *failed*: not recorded, so a rerun
  tries it again; after the first such failure no new request starts (the servers are down), and the
  requests never started count as failed too.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tulu_jax.curation.cli_args import request_seed
from tulu_jax.curation.if_constraints import Constraint, make_if_prompt, sample_constraints
from tulu_jax.curation.normalize import normalize_text
from tulu_jax.curation.persona_templates import SKILLS, check_response, extract_prompt, render_template
from tulu_jax.curation.requests import run_requests
from tulu_jax.curation.rows import ResumableJsonl, iter_rows
from tulu_jax.data.chat import DataError
from tulu_jax.rollout.chat_client import ChatClient, ChatParams, ChatRefused
from tulu_jax.rollout.http import RolloutServerError

PROBE = 8  # refusals in a row, before any row is written, that abort the run
FAILURE_LINES = 3  # error lines kept for the report


class Aborted(Exception):
    """The servers refuse every request (a bad key, an unknown model, settings beyond the model's limits):
    the message quotes the server. Nothing more is worth asking; the CLI exits 2."""


def _persona_row(where: str, row: dict, index: int) -> dict[str, str]:
    persona = row.get("persona")
    if not isinstance(persona, str) or not persona.strip():
        raise DataError(f"{where}: field 'persona' must be a non-empty string", "bad_persona")
    pid = row.get("id", index)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or (isinstance(pid, str) and not pid.strip()):
        raise DataError(f"{where}: field 'id' must be a non-empty string or an integer, got {pid!r}", "bad_id")
    return {"id": str(pid), "persona": persona.strip()}


def load_personas(path: str, *, on_bad_row: str = "error", counts: dict | None = None) -> list[dict[str, str]]:
    """[{"id", "persona"}] from a persona file (JSONL, Parquet or datasets folder; rows {"persona": str} with an
    optional "id" (a string or an integer), which defaults to the row's 0-based position; ids are compared
    as strings, so 3 and "3" are the same id, and a default id may not equal another row's explicit one).
    A bad row (not JSON, no non-empty string persona, a bad or repeated id) raises DataError naming the
    file and line under on_bad_row="error", or is counted in `counts["rows_skipped"][reason]` under "skip".
    Raises FileNotFoundError, or DataError for no personas at all."""
    counts = {} if counts is None else counts
    personas, ids = [], set()
    for index, (where, row) in enumerate(iter_rows(path, on_bad_row=on_bad_row, counts=counts)):
        try:
            p = _persona_row(where, row, index)
            if p["id"] in ids:
                raise DataError(f"{where}: persona id {p['id']!r} repeats an earlier row's", "duplicate_id")
        except DataError as e:
            if on_bad_row == "error":
                raise
            counts["rows_skipped"][e.reason] = counts["rows_skipped"].get(e.reason, 0) + 1
            continue
        ids.add(p["id"])
        personas.append(p)
    if not personas:
        raise DataError(f"{path}: no personas", "empty")
    return personas


@dataclasses.dataclass(frozen=True)
class Job:
    """One persona request: `key` (the output row's id, "<skill>-<index>"), its `index` in the request
    sequence, the persona, and for the "if" skill the constraints to attach."""

    key: str
    index: int
    persona_id: str
    persona: str
    constraints: tuple[Constraint, ...] = ()


def plan_jobs(personas: Sequence[dict[str, str]], skill: str, n: int, seed: int) -> list[Job]:
    """The `n` requests: request i uses persona i mod len(personas), i.e. the first n personas, cycling over
    the file again when n exceeds it (a persona's repeats differ by their request seeds, and for "if" by
    their constraints). For "if", request i draws 1-3 constraints with a generator seeded by (seed, i).
    Raises ValueError for an unknown skill or n < 1."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    jobs = []
    for i in range(n):
        p = personas[i % len(personas)]
        constraints = tuple(sample_constraints(random.Random(f"personas-if:{seed}:{i}"))) if skill == "if" else ()
        jobs.append(Job(f"{skill}-{i}", i, p["id"], p["persona"], constraints))
    return jobs


class _Calls:
    """A thread-safe count of chat calls (malformed retries included)."""

    def __init__(self):
        self.n, self._lock = 0, threading.Lock()

    def add(self) -> None:
        """Counts one chat call."""
        with self._lock:
            self.n += 1


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every request of a run shares: sampling `params` (its seed is replaced per attempt), `retries`
    (extra attempts after a malformed reply), the run's `seed` (request seeds are
    `cli_args.request_seed(seed, key, attempt)`), `concurrency` (requests in flight) and `progress` (show
    a progress bar)."""

    params: ChatParams
    retries: int = 2
    seed: int = 0
    concurrency: int = 32
    progress: bool = True


def _ask(client: ChatClient, messages: list[dict], key: str, index: int, settings: Settings, calls: _Calls, check):
    """Up to 1 + retries chat calls until `check(reply) -> (value, reason)` gives a value -> (value, reply,
    attempts, seed, reasons). RolloutServerError (the servers gave up, or refused: ChatRefused) propagates."""
    reasons = []
    for attempt in range(settings.retries + 1):
        seed = request_seed(settings.seed, key, attempt)
        reply = client.chat(messages, dataclasses.replace(settings.params, seed=seed), index=index)
        calls.add()
        value, reason = check(reply)
        if reason is None:
            return value, reply, attempt + 1, seed, reasons
        reasons.append(reason)
    return None, reply, settings.retries + 1, seed, reasons


def _prompt_row(job: Job, skill: str, prompt: str, reply, attempts: int, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {"id": job.key, "persona_id": job.persona_id, "persona": job.persona, "skill": skill}
    if skill == "if":
        made = make_if_prompt(prompt, job.constraints)
        row["messages"] = [{"role": "user", "content": made["prompt"]}]
        row.update(request=prompt, ground_truth=made["ground_truth"], dataset=made["dataset"])
        row["constraints"] = made["constraints"]
    else:
        row["messages"] = [{"role": "user", "content": prompt}]
    row.update(source=f"personas-{skill}", model=reply.model, endpoint=reply.server, seed=seed, attempts=attempts)
    return row


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _row_dedup_key(row: dict) -> str:
    """What two prompts must differ in: the model's request text, `normalize_text`-ed."""
    return normalize_text(row.get("request") or row["messages"][0]["content"])


def _new_counts(counts: dict[str, Any]) -> dict[str, Any]:
    for k in ("resumed", "written", "duplicates", "refused", "failed"):
        counts.setdefault(k, 0)
    counts.setdefault("malformed", Counter())
    counts.setdefault("failures", [])
    return counts


@dataclasses.dataclass(frozen=True)
class _Pass:
    """How one pass turns an item into chat messages and checks the reply: `key(item)` (its output key),
    `messages(item)`, `check(reply) -> (value, reason)`, `accept(item, value, reply, attempts, seed)`
    (writes the row or records it as a duplicate); request seeds hash `seed_prefix + key`."""

    key: Callable[[Any], str]
    messages: Callable[[Any], list[dict]]
    check: Callable[[Any], tuple[Any, str | None]]
    accept: Callable[..., None]
    desc: str
    seed_prefix: str = ""


def _stops_the_run(error: BaseException) -> bool:
    """Errors after which no new request is worth starting: servers down past the retry deadline, or a
    refusal of every request (401/404). A refusal of one request (400/413/422) is not one."""
    if isinstance(error, ChatRefused):
        return not error.about_this_request
    return isinstance(error, RolloutServerError)


def _run_pass(client, todo: list, spec: _Pass, out: ResumableJsonl, settings: Settings, counts: dict) -> None:
    """Runs one pass's requests concurrently: malformed replies and per-request refusals recorded as
    skipped, good ones handed to `spec.accept`, failures counted (not recorded; the first FAILURE_LINES
    kept in `counts["failures"]`), and once the servers are down (`_stops_the_run`) no new request is
    started and the rest count as failed. Raises Aborted (see the module docstring) for a refusal of every
    request, or when `out` has no row yet and the first PROBE answers are all refusals. Adds `requests`
    and `seconds` to `counts`."""
    calls, stats = _Calls(), {}
    fresh = not out.done  # nothing the servers answered is recorded yet: these settings are unproven
    probe: list[tuple[str, ChatRefused]] = []  # refusals held back until an answer shows they are per-request

    def call(item):
        index, entry = item
        return _ask(
            client, spec.messages(entry), spec.seed_prefix + spec.key(entry), index, settings, calls, spec.check
        )

    def refuse(key: str, error: ChatRefused) -> None:
        counts["refused"] += 1
        out.skip(key, "refused", status=error.status, message=_one_line(error)[:500])

    def flush_probe() -> None:
        for key, error in probe:
            refuse(key, error)
        probe.clear()

    try:
        results = run_requests(
            todo,
            call,
            max_in_flight=settings.concurrency,
            desc=spec.desc,
            total=len(todo),
            stats=stats,
            stop_when=_stops_the_run,
            progress=settings.progress,
        )
        for (_, entry), result, error in results:
            key = spec.key(entry)
            if isinstance(error, ChatRefused) and not error.about_this_request:
                raise Aborted(f"the server refuses every request: {_one_line(error)}")
            if isinstance(error, ChatRefused):
                if not fresh:
                    refuse(key, error)
                    continue
                probe.append((key, error))
                if len(probe) == min(PROBE, len(todo)):
                    raise Aborted(
                        f"the first {len(probe)} requests were all refused (check --model, --max-tokens and "
                        f"the server's limits): {_one_line(probe[0][1])}"
                    )
                continue
            if error is not None:
                counts["failed"] += 1
                _note_failure(counts, f"{key}: {_one_line(error)}")
                continue
            if fresh:  # an answer: the settings are not what the server refuses
                fresh = False
                flush_probe()
            value, reply, attempts, seed, reasons = result
            if value is None:
                counts["malformed"][reasons[-1]] += 1
                out.skip(key, "malformed", reasons=reasons, last_reply=reply.text[:500])
                continue
            spec.accept(entry, value, reply, attempts, seed)
    finally:
        counts["requests"] = counts.get("requests", 0) + calls.n
        counts["seconds"] = counts.get("seconds", 0.0) + stats.get("seconds", 0.0)
    if probe:  # refusals no answer vouched for (the servers went down): not recorded, a rerun asks again
        counts["failed"] += len(probe)
        _note_failure(counts, f"{probe[0][0]}: {_one_line(probe[0][1])}")
    not_started = len(todo) - stats.get("requests", len(todo))
    if not_started:
        counts["failed"] += not_started
        _note_failure(counts, f"{not_started} requests not started: the servers stopped answering")


def _note_failure(counts: dict, line: str) -> None:
    if len(counts["failures"]) < FAILURE_LINES:
        counts["failures"].append(line)


def synthesize_prompts(
    client: ChatClient,
    jobs: Iterable[Job],
    out: ResumableJsonl,
    *,
    skill: str,
    settings: Settings,
    counts: dict,
    existing: Iterable[dict] = (),
) -> None:
    """Asks for a prompt for every job whose key `out` has not done yet and appends each row as it finishes
    (see the module docstring for malformed replies, duplicates and failures). Rows: `id`, `persona_id`,
    `persona`, `skill`, `messages` (one user turn), `source` ("personas-<skill>"), `model`, `endpoint`,
    `seed`, `attempts`; for "if" also `request` (the model's text), `ground_truth` (google_ifeval JSON),
    `dataset` and `constraints`. `counts` receives resumed/written/duplicates/refused/failed, `malformed` (a
    Counter of final reasons), `failures` (the first error lines), `requests` (chat calls) and `seconds`. `existing`:
    the rows already in `out` (a resumed run), whose prompts new ones must not duplicate."""
    _new_counts(counts)
    jobs = list(jobs)
    todo = [(j.index, j) for j in jobs if j.key not in out.done]
    counts["resumed"] += len(jobs) - len(todo)
    seen = {_row_dedup_key(r): r["id"] for r in existing}

    def messages(job: Job) -> list[dict]:
        rules = [c.instruction() for c in job.constraints]
        return [{"role": "user", "content": render_template(skill, job.persona, rules)}]

    def accept(job: Job, prompt: str, reply, attempts: int, seed: int) -> None:
        row = _prompt_row(job, skill, prompt, reply, attempts, seed)
        key = _row_dedup_key(row)
        if key in seen:  # results arrive on this one thread: no lock needed
            counts["duplicates"] += 1
            out.skip(job.key, "duplicate", of=seen[key], prompt=row["messages"][0]["content"][:500])
            return
        seen[key] = job.key
        out.append(row)
        counts["written"] += 1

    check = lambda r: extract_prompt(skill, r.text, r.finish_reason)  # noqa: E731
    _run_pass(client, todo, _Pass(lambda j: j.key, messages, check, accept, f"personas {skill}"), out, settings, counts)


def synthesize_responses(
    client: ChatClient, rows: Sequence[dict], out: ResumableJsonl, *, settings: Settings, counts: dict
) -> None:
    """The `--respond` pass: for every prompt row whose `id` `out` has not done yet, asks for a response to
    its messages and appends the row with the assistant turn added to `messages` and `response_model`,
    `response_endpoint`, `response_seed`, `response_attempts`. A response `check_response` rejects (empty,
    cut at max_tokens) is asked again like a malformed prompt, then recorded as skipped; a failed request is
    not recorded. `counts` as in `synthesize_prompts`."""
    _new_counts(counts)
    todo = [(i, r) for i, r in enumerate(rows) if str(r["id"]) not in out.done]
    counts["resumed"] += len(rows) - len(todo)

    def accept(row: dict, text: str, reply, attempts: int, seed: int) -> None:
        answer = {"role": "assistant", "content": text}
        out.append(
            {
                **row,
                "messages": [*row["messages"], answer],
                "response_model": reply.model,
                "response_endpoint": reply.server,
                "response_seed": seed,
                "response_attempts": attempts,
            }
        )
        counts["written"] += 1

    spec = _Pass(
        key=lambda r: str(r["id"]),
        messages=lambda r: r["messages"],
        check=lambda r: (r.text.strip(), check_response(r.text, r.finish_reason)),
        accept=accept,
        desc="responses",
        seed_prefix="response:",  # not the seed its prompt was written with
    )
    _run_pass(client, todo, spec, out, settings, counts)
