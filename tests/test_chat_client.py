"""ChatClient (OpenAI-compatible chat completions for the data commands) and run_requests: retries over
servers, bad answers, API keys, and one real vLLM server (tests marked vllm)."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from tulu_jax.curation.requests import run_requests
from tulu_jax.rollout.chat_client import ChatClient, ChatParams
from tulu_jax.rollout.http import RolloutServerError


class _Fake(http.server.BaseHTTPRequestHandler):
    """Answers by `plan`: a list of (status, body) consumed per chat request (the last one repeats)."""

    plan: list = []
    seen: list = []
    models = ["m"]

    def do_GET(self):
        self._send(200, {"data": [{"id": m} for m in self.models]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, dict(self.headers), body))
        status, answer = self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]
        self._send(status, answer)

    def _send(self, status, answer):
        raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def _ok(text, finish="stop"):
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}]}


@pytest.fixture
def fake():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Fake.plan, _Fake.seen, _Fake.models = [_ok("hi")], [], ["m"]
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _client(urls, **kw):
    return ChatClient(urls, **{"model": "m", "retry_deadline_s": 2.0, "backoff_s": 0.01, "max_backoff_s": 0.05, **kw})


def test_request_body_and_reply(fake):
    c = _client([fake + "/v1"], api_key="sk-test")
    reply = c.chat([{"role": "user", "content": "2+2?", "extra": 1}], ChatParams(0.5, 0.9, 17, seed=3))
    assert (reply.text, reply.finish_reason, reply.model, reply.server, reply.attempts) == ("hi", "stop", "m", fake, 1)
    path, headers, body = _Fake.seen[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test"
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "2+2?"}],
        "temperature": 0.5,
        "top_p": 0.9,
        "max_tokens": 17,
        "seed": 3,
    }


@pytest.mark.parametrize(
    "bad",
    [(500, {"error": "boom"}), (200, b"<html>proxy error</html>"), (200, {"choices": []}), _ok("x", "abort")],
    ids=["5xx", "not-json", "no-choices", "aborted"],
)
def test_bad_answers_are_retried_then_succeed(fake, bad):
    _Fake.plan = [bad, bad, _ok("fine")]
    reply = _client([fake]).chat([{"role": "user", "content": "q"}], ChatParams())
    assert reply.text == "fine" and reply.attempts == 3


def test_declined_answers_are_refusals_about_this_request(fake):
    from tulu_jax.rollout.chat_client import ChatRefused

    for answer in (
        _ok("partial", "content_filter"),
        (200, {"choices": [{"message": {"content": None, "refusal": "I can't help"}, "finish_reason": "stop"}]}),
    ):
        _Fake.plan, _Fake.seen = [answer], []
        with pytest.raises(ChatRefused, match="declined") as refused:
            _client([fake]).chat([{"role": "user", "content": "q"}], ChatParams())
        assert refused.value.about_this_request and len(_Fake.seen) == 1  # not retried
    _Fake.plan = [(401, {"error": "bad key"})]
    with pytest.raises(ChatRefused) as refused:
        _client([fake]).chat([{"role": "user", "content": "q"}], ChatParams())
    assert refused.value.status == 401 and not refused.value.about_this_request


def test_4xx_is_raised_at_once_and_5xx_until_the_deadline(fake):
    _Fake.plan = [(400, {"error": "prompt too long"})]
    with pytest.raises(RolloutServerError, match="HTTP 400: .*prompt too long") as refused:
        _client([fake]).chat([{"role": "user", "content": "q"}], ChatParams())
    assert len(_Fake.seen) == 1 and refused.value.status == 400
    _Fake.plan = [(429, {"error": "rate limited"}), _ok("after the limit")]  # 429: back off and retry
    assert _client([fake]).chat([{"role": "user", "content": "q"}], ChatParams()).text == "after the limit"
    _Fake.plan = [(503, {"error": "overloaded"})]
    start = time.monotonic()
    with pytest.raises(RolloutServerError, match=r"chat request 5: no answer within the 0.3 s retry deadline.*503"):
        _client([fake], retry_deadline_s=0.3).chat([{"role": "user", "content": "q"}], ChatParams(), index=5)
    assert time.monotonic() - start < 2.0


def test_requests_rotate_over_servers_and_skip_a_dead_one(fake):
    dead = "http://127.0.0.1:9"  # discard port: connection refused
    c = _client([dead, fake])
    reply = c.chat([{"role": "user", "content": "q"}], ChatParams(), index=0)  # starts on the dead one
    assert reply.server == fake and reply.attempts == 2
    assert c.chat([{"role": "user", "content": "q"}], ChatParams(), index=1).attempts == 1


def test_model_lookup_and_check(fake, monkeypatch):
    _Fake.models = ["served-a", "served-b"]
    assert ChatClient([fake]).model == "served-a"
    with pytest.raises(RolloutServerError, match=r"does not serve model 'zzz'; it serves \['served-a', 'served-b'\]"):
        ChatClient([fake], model="zzz").check_model()
    ChatClient([fake], model="served-b").check_model()
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        ChatClient([fake], api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(ValueError, match="at least one"):
        ChatClient([" "])
    with pytest.raises(ValueError, match="temperature"):
        ChatParams(temperature=-1)


def test_run_requests_bounds_concurrency_and_reports_errors():
    lock, running, peak = threading.Lock(), [0], [0]

    def call(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        if i % 5 == 0:
            raise RuntimeError(f"bad {i}")
        return i * i

    stats = {}
    out = list(run_requests(range(40), call, max_in_flight=4, stats=stats))
    assert sorted(i for i, _, _ in out) == list(range(40))
    assert all(r == i * i and e is None for i, r, e in out if i % 5)
    assert all(r is None and str(e) == f"bad {i}" for i, r, e in out if i % 5 == 0)
    assert peak[0] <= 4
    assert stats["requests"] == 40 and stats["failed"] == 8 and stats["requests_per_s"] > 0


def test_run_requests_stops_starting_new_items_after_a_fatal_error():
    def call(i):
        time.sleep(0.005)
        if i == 3:
            raise RolloutServerError("server gone")
        return i

    stats = {}
    out = list(run_requests(range(100), call, max_in_flight=2, stats=stats, stop_when=lambda e: "gone" in str(e)))
    assert [i for i, _, e in out if e is not None] == [3]
    assert len(out) <= 6 and stats["stopped"] is True  # 3 plus what was in flight or drawn before it failed


def test_run_requests_draws_items_lazily():
    drawn = []

    def items():
        for i in range(1000):
            drawn.append(i)
            yield i

    gen = run_requests(items(), lambda i: i, max_in_flight=3)
    next(gen)
    gen.close()
    assert len(drawn) <= 4


@pytest.mark.vllm
def test_chat_against_a_real_vllm_server(vllm_server):
    c = ChatClient([vllm_server.url])
    c.check_model()
    replies = [
        c.chat([{"role": "user", "content": "Say hi."}], ChatParams(temperature=0.0, max_tokens=8), index=i)
        for i in range(2)
    ]
    assert replies[0].text == replies[1].text  # greedy
    assert all(r.finish_reason in ("stop", "length") and r.attempts == 1 for r in replies)
    sampled = c.chat([{"role": "user", "content": "Say hi."}], ChatParams(temperature=1.0, max_tokens=8, seed=1))
    again = c.chat([{"role": "user", "content": "Say hi."}], ChatParams(temperature=1.0, max_tokens=8, seed=1))
    assert sampled.text == again.text  # a seeded request is reproducible
