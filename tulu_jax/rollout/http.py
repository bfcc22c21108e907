"""JSON over HTTP to inference servers, and the retry policy every client here shares: a request that
fails with a connection error, a timeout or a 5xx is tried again on the next server with exponential
back-off until a deadline after its first failure; a 4xx is the caller's mistake and is raised at once."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class RolloutServerError(RuntimeError):
    """A server refused a request (`status`: its HTTP code, 4xx), or stayed unreachable until the retry
    deadline (`status` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Retryable(Exception):
    """Connection refused or reset, a timeout, or a 5xx: worth another try, maybe on another server."""


def request_json(
    url: str,
    body: Any = None,
    *,
    method: str | None = None,
    timeout: float,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """One JSON request -> the decoded answer (None when empty); GET without `body`, else POST. `timeout` in
    seconds. Raises RolloutServerError (with `status`) on a 4xx other than 429, and Retryable when the
    server is unreachable, times out, answers 5xx or 429 (rate limited: hosted APIs say so under load),
    both naming the URL (never the headers, which may hold an API key)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if body is None else "POST"))
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:2000].decode(errors="replace")
        err = f"{url}: HTTP {e.code}: {detail}"
        raise (Retryable(err) if e.code >= 500 or e.code == 429 else RolloutServerError(err, e.code)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out
        raise Retryable(f"{url}: {type(e).__name__}: {getattr(e, 'reason', e)}") from None
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:  # a proxy's HTML error page, a truncated body
        raise Retryable(f"{url}: the answer is not JSON: {raw[:200]!r}") from None


def call_with_retries(
    attempt: Callable[[int], T],
    *,
    start: int,
    num_servers: int,
    retry_deadline_s: float,
    backoff_s: float,
    max_backoff_s: float,
    what: str,
) -> tuple[T, int]:
    """(attempt(server index), attempts taken). Tries server `start % num_servers` first, then the next ones
    in turn after each Retryable, sleeping `backoff_s` doubling up to `max_backoff_s` seconds between tries,
    until `retry_deadline_s` seconds after the first failure; then raises RolloutServerError naming `what`
    and the last error. Any other exception from `attempt` propagates at once."""
    tries, last, deadline = 0, None, None
    while True:
        server = (start + tries) % num_servers
        tries += 1
        try:
            return attempt(server), tries
        except Retryable as e:
            last = e
        now = time.monotonic()
        deadline = now + retry_deadline_s if deadline is None else deadline
        pause = min(backoff_s * 2 ** (tries - 1), max_backoff_s)
        if now + pause > deadline:
            raise RolloutServerError(
                f"{what}: no answer within the {retry_deadline_s:g} s retry deadline ({tries} attempts); "
                f"last error: {last}"
            )
        time.sleep(pause)
