"""`ChatClient`: chat completions from any OpenAI-compatible endpoint (vLLM's `/v1/chat/completions`, a
hosted API), for the data commands that need text from a model: persona-driven prompts and responses,
preference completions, judge ratings (Tülu 3 §3.1, §5.2). Requests rotate over the servers and are retried
with the rollout client's policy (`tulu_jax.rollout.http.call_with_retries`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tulu_jax.rollout.http import Retryable, RolloutServerError, call_with_retries, request_json


class ChatRefused(RolloutServerError):
    """A server refused one chat request: `status` is the HTTP code of a 4xx, or None when a 200 answer
    declined it (finish_reason "content_filter", or an OpenAI-style `refusal` instead of content).
    `about_this_request` tells the two kinds apart: 400, 413, 422 and declined answers concern this request
    (a prompt longer than the model's context, filtered content), and asking again gets the same answer;
    401, 403, 404... concern every request (a bad key, an unknown model)."""

    @property
    def about_this_request(self) -> bool:
        return self.status in (None, 400, 413, 422)


@dataclasses.dataclass(frozen=True)
class ChatParams:
    """Sampling settings of one chat request: `temperature` (0: greedy), `top_p`, `max_tokens` (new tokens),
    `seed` (None: the server draws one). The reference's persona generation uses temperature 0.7 and 1024
    tokens (open-instruct `scripts/persona_driven_data_gen/`)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(
                f"bad chat params: temperature {self.temperature} (>= 0), top_p {self.top_p} (in (0, 1]), "
                f"max_tokens {self.max_tokens} (>= 1)"
            )


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """One answer: its `text`, `finish_reason` ("stop", or "length" when cut at max_tokens), the `model`
    and `server` URL that wrote it, and how many `attempts` it took."""

    text: str
    finish_reason: str
    model: str
    server: str
    attempts: int


class ChatClient:
    """Chat completions over one or more OpenAI-compatible servers that all serve `model` (None: the one
    model the first server lists at `/v1/models`). `api_key` (or the environment variable named by
    `api_key_env`) is sent as a bearer token. Times in seconds: `timeout_s` per request, `retry_deadline_s`
    how long a failing request keeps being retried (back-off from `backoff_s`, doubling, capped at
    `max_backoff_s`). Thread-safe: the data commands call `chat` from a pool of threads."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 600.0,
        retry_deadline_s: float = 300.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
    ):
        urls = [u.rstrip("/") for u in urls if u.strip()]
        if not urls:
            raise ValueError("ChatClient needs at least one server URL")
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"the environment variable {api_key_env} (the API key) is not set")
        # Accept "http://host:port" and "http://host:port/v1" alike.
        self.urls = [u[: -len("/v1")] if u.endswith("/v1") else u for u in urls]
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s, self.retry_deadline_s = timeout_s, retry_deadline_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._model = model

    @property
    def model(self) -> str:
        """The model name sent with each request (looked up on the first server when not given)."""
        if self._model is None:
            self._model = self.served_models()[0]
        return self._model

    def served_models(self) -> list[str]:
        """The model ids the first server lists at `/v1/models` (retried like a request). Raises
        RolloutServerError when it lists none or cannot be reached."""

        def attempt(k: int):
            return request_json(self.urls[k] + "/v1/models", timeout=self.timeout_s, headers=self._headers)

        answer, _ = self._retry(attempt, 0, f"{self.urls[0]}/v1/models")
        ids = [m.get("id") for m in (answer or {}).get("data", []) if isinstance(m, dict)]
        if not ids:
            raise RolloutServerError(f"{self.urls[0]}/v1/models lists no model")
        return ids

    def check_model(self) -> None:
        """Raises RolloutServerError naming the server and the models it serves when `model` is not among
        them (every request would be refused), or when a server cannot be reached before the deadline."""
        for k, url in enumerate(self.urls):
            answer, _ = self._retry(
                lambda _k, url=url: request_json(url + "/v1/models", timeout=self.timeout_s, headers=self._headers),
                k,
                f"{url}/v1/models",
            )
            ids = [m.get("id") for m in (answer or {}).get("data", []) if isinstance(m, dict)]
            if self.model not in ids:
                raise RolloutServerError(f"{url} does not serve model {self.model!r}; it serves {ids}")

    def chat(
        self,
        messages: Sequence[dict],
        params: ChatParams,
        *,
        index: int = 0,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatReply:
        """One chat completion of `messages` ([{"role", "content"}, ...]). `index` picks the first server
        (index mod the number of servers), so consecutive requests spread over the servers. `extra_body`
        adds server-specific fields to the request, e.g. vLLM's `{"structured_outputs": {"choice": [...]}}`
        (it may not override the fields set here: ValueError). Raises
        RolloutServerError on a 4xx (a bad request: the prompt is too long, the model unknown) or when no
        server answers before the retry deadline; an answer without a message is retried like a 5xx. A 4xx
        raises ChatRefused (a RolloutServerError) carrying the status code."""
        body = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        clash = sorted(set(extra_body or {}) & set(body))
        if clash:
            raise ValueError(f"extra_body may not set {clash}: use messages/ChatParams")
        body.update(extra_body or {})

        def attempt(k: int) -> ChatReply:
            url = self.urls[k]
            try:
                answer = request_json(url + "/v1/chat/completions", body, timeout=self.timeout_s, headers=self._headers)
            except RolloutServerError as e:  # request_json raises these for a 4xx only
                raise ChatRefused(str(e), e.status or 400) from None
            try:
                choice = answer["choices"][0]
                text, finish = choice["message"]["content"], choice.get("finish_reason") or "stop"
            except (KeyError, IndexError, TypeError):
                raise Retryable(f"{url}: an answer without choices[0].message.content: {str(answer)[:200]}") from None
            refusal = choice["message"].get("refusal") if isinstance(choice["message"], dict) else None
            if finish == "content_filter" or (text is None and refusal):
                raise ChatRefused(f"{url}: the model declined: {refusal or finish}"[:500], None)
            if not isinstance(text, str):
                raise Retryable(f"{url}: choices[0].message.content is not text: {text!r:.100}")
            if finish not in ("stop", "length"):  # aborted inside the engine
                raise Retryable(f"{url}: finished with {finish!r}")
            return ChatReply(text, finish, self.model, url, 0)

        reply, attempts = self._retry(attempt, index, f"chat request {index}")
        return dataclasses.replace(reply, attempts=attempts)

    def _retry(self, attempt, start: int, what: str):
        return call_with_retries(
            attempt,
            start=start,
            num_servers=len(self.urls),
            retry_deadline_s=self.retry_deadline_s,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
            what=what,
        )
