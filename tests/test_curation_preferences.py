"""`tulu-jax data preferences` (Tülu 3 §5.2): the judge prompts and rating parser, the pool config, the
annotation mix, the binarization (pure), and the command end to end against the tiny vLLM server (marked
`vllm`): a guided judge, a judge that answers garbage, a killed run, a server that answers 500."""

from __future__ import annotations

import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from tulu_jax.cli import main
from tulu_jax.configlib import ConfigError
from tulu_jax.curation.judge import ASPECTS, STYLES, judge_messages, parse_rating, render_conversation
from tulu_jax.curation.preferences import (
    Judged,
    PoolConfig,
    annotation_mix,
    binarize,
    load_pool,
    pair_row,
    prompt_messages,
    prompt_rng,
)
from tulu_jax.data.chat import DataError
from tulu_jax.data.preference import iter_preference_pairs, parse_preference_row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------- judge


@pytest.mark.parametrize(
    "text, rating",
    [
        ("Rating: 4", 4),
        ("Rating: 4\nRationale: clear and correct, better than 2 of the others.", 4),
        ("**Rating**: 5/5", 5),
        ("**Rating:** 2", 2),
        ("## Rating\n3\n\n## Rationale\n...", 3),
        ("rating = 1", 1),
        ("Rating - 3 out of 5", 3),
        ("I would give it a rating of 2.", 2),
        ("The rating is 5.", 5),
        ("Rating: 4\n...\nFinal rating: 4", 4),  # repeated, agreeing
        ("4", 4),
        (" **4** ", 4),
        ("4.", 4),
        ("4/5", 4),
        ("garbage", None),
        ("", None),
        ("Rating: N/A", None),
        ("Rating: 7", None),  # out of range
        ("Rating: 0", None),
        ("6", None),
        ("Rating: 4.5", None),  # not a grade of the scale
        ("Rating: 8/10", None),  # another scale: not converted
        ("Rating: 3\nRating: 4", None),  # labelled ratings disagree
        ("between 3 and 4", None),  # several unlabelled numbers
        ("It is a 4 because it has 3 errors", None),
        ("Rationale: fine.", None),  # "Rationale" is no rating label
        # "rating" only as a word
        ("The answer is good at generating 2 paragraphs.", None),
        ("Operating 5 stars", None),
        ("Rating: 4. It lists 3 causes.", 4),  # the number after the sentence ends is another clause
        # a range, an alternative or a second candidate in the labelled clause: the judge has not settled
        ("Rating: 3-4", None),
        ("Rating: 3 – 4", None),
        ("Rating: 3 or 4", None),
        ("Rating: 3 to 4", None),
        ("Rating: 3+", None),
        ("Rating: 3 + 1", None),
        ("Rating: 2 (could be 3)", None),
        ("**Rating:** 4, maybe 5", None),
    ],
)
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


@pytest.mark.parametrize("style", STYLES)
def test_judge_messages_one_aspect_per_request(style):
    prompt, completion = "Name a prime number above 10.", "13 is prime.\n</answer> tricky"
    seen = set()
    for aspect in ASPECTS:
        msgs = judge_messages(aspect, prompt, completion, style=style)
        assert [m["role"] for m in msgs] == ["system", "user"]
        user = msgs[1]["content"]
        assert prompt in user and completion in user  # verbatim
        assert "Rating: N" in user and "1" in user and "5" in user
        # names its own aspect, and no other aspect
        title = aspect.replace("_", " ")
        assert title in user.lower()
        assert not any(o.replace("_", " ") in user.lower() for o in ASPECTS if o != aspect)
        seen.add(user)
        if style == "full":  # every grade of the scale described, one per line
            for g in "12345":
                assert f"\n{g} - " in user
    assert len(seen) == len(ASPECTS)


def test_judge_messages_errors():
    with pytest.raises(ValueError, match="unknown aspect 'style'"):
        judge_messages("style", "p", "c")
    with pytest.raises(ValueError, match="unknown judge prompt style 'long'"):
        judge_messages("honesty", "p", "c", style="long")


# ---------------------------------------------------------------------------------------------- pool config


def _pool_dict(n_off=5, on=True, k=4):
    models = [{"name": f"m{i}", "urls": [f"http://host{i}:8000"], "model": f"org/m{i}"} for i in range(n_off)]
    if on:
        models.insert(2, {"name": "policy", "urls": "http://p:8000,http://q:8000", "on_policy": True})
    return {"off_policy_models": k, "models": models}


def _write_yaml(tmp_path, data, name="pool.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_pool_config_loads(tmp_path):
    pool = load_pool(_write_yaml(tmp_path, _pool_dict()))
    assert pool.on_policy_model == "policy"
    assert pool.by_name("policy").urls == ("http://p:8000", "http://q:8000")  # a comma string is a list too
    assert pool.off_policy_names == [f"m{i}" for i in range(5)]
    s = pool.by_name("m0").sampling
    assert (s.temperature, s.top_p) == (1.0, 1.0)  # the reference's sampling
    for shipped in ("pool.yaml", "tiny_pool.yaml"):
        assert load_pool(os.path.join(REPO, "configs", "data", shipped)).on_policy_model is not None


def _edit(data, fn):
    fn(data)
    return data


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["models"][0].__setitem__("on_policy", True), r"models\[2\]\.on_policy: only one model"),
        (
            lambda d: d["models"][3].__setitem__("name", "m0"),
            r"models\[3\]\.name: 'm0' is also the name of",
        ),
        (lambda d: d["models"][1].pop("urls"), r"missing required key 'models\[1\]\.urls'"),
        (lambda d: d["models"][1].__setitem__("urls", ["host:8000"]), r"models\[1\]\.urls: .*http\(s\)://"),
        (lambda d: d["models"][0].__setitem__("sampling", {"temperature": -1}), r"models\[0\]\.sampling\.temperature"),
        (lambda d: d["models"][0].__setitem__("sampling", {"top_p": 0}), r"models\[0\]\.sampling\.top_p"),
        (lambda d: d["models"][0].__setitem__("sampling", {"max_tokens": 0}), r"models\[0\]\.sampling\.max_tokens"),
        (lambda d: d["models"][4].__setitem__("temprature", 1), r"unknown key 'models\[4\]\.temprature'"),
        (lambda d: d.__setitem__("off_policy_models", 1), r"off_policy_models: must be >= 2"),
        (lambda d: d.__setitem__("models", d["models"][1:3]), r"models: needs at least two models besides"),
        (lambda d: d["models"][0].__setitem__("on_policy", "yes"), r"models\[0\]\.on_policy: expected bool"),
    ],
)
def test_pool_config_errors_name_file_and_key(tmp_path, edit, message):
    path = _write_yaml(tmp_path, _edit(_pool_dict(), edit))
    with pytest.raises(ConfigError, match=message) as e:
        load_pool(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_pool_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--pool .*nope.yaml: no such file"):
        load_pool(str(tmp_path / "nope.yaml"))
    path = _write_yaml(tmp_path, "models: [\n", "broken.yaml")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML|{path}: cannot parse"):
        load_pool(path)


# ---------------------------------------------------------------------------------------------- annotation mix


def _pool(**kw) -> PoolConfig:
    from tulu_jax.configlib import from_dict

    return from_dict(PoolConfig, _pool_dict(**kw))


def test_off_policy_draws_distinct_models_without_the_policy():
    pool = _pool()
    counts = dict.fromkeys(pool.off_policy_names, 0)
    n = 400
    for i in range(n):
        policy, names = annotation_mix(pool, f"p{i}", on_policy_share=0.0, seed=3)
        assert policy == "off" and len(names) == 4 == len(set(names)) and "policy" not in names
        for name in names:
            counts[name] += 1
    # each of the 5 models is in a prompt's 4 with probability 4/5: binomial, 5 sigma
    sigma = math.sqrt(n * 0.8 * 0.2)
    assert all(abs(c - 0.8 * n) < 5 * sigma for c in counts.values()), counts
    # fewer models than off_policy_models: all of them
    small = _pool(n_off=3)
    assert sorted(annotation_mix(small, "x", on_policy_share=0.0, seed=0)[1]) == ["m0", "m1", "m2"]


def test_on_policy_pairs_hold_the_policy_once():
    pool = _pool()
    first = []
    for i in range(300):
        policy, names = annotation_mix(pool, f"p{i}", on_policy_share=1.0, seed=0)
        assert policy == "on" and len(names) == 2 and names.count("policy") == 1
        assert names[1 - names.index("policy")] in pool.off_policy_names
        first.append(names[0] == "policy")
    # in random order: the policy comes first about half the time (binomial, 5 sigma)
    assert abs(sum(first) - 150) < 5 * math.sqrt(300 * 0.25)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 1.0])
def test_on_policy_share_and_determinism(share):
    pool = _pool()
    n = 2000
    mixes = [annotation_mix(pool, f"id-{i}", on_policy_share=share, seed=7) for i in range(n)]
    on = sum(p == "on" for p, _ in mixes)
    assert abs(on / n - share) <= 5 * math.sqrt(share * (1 - share) / n) + 1e-12
    # the same prompt id and seed -> the same choice, in any order (a resumed run redoes it identically)
    again = [annotation_mix(pool, f"id-{i}", on_policy_share=share, seed=7) for i in reversed(range(n))]
    assert mixes == again[::-1]
    if 0 < share < 1:
        other_seed = [annotation_mix(pool, f"id-{i}", on_policy_share=share, seed=8) for i in range(n)]
        assert other_seed != mixes


def test_mix_errors():
    with pytest.raises(ValueError, match="on_policy_share must be in"):
        annotation_mix(_pool(), "x", on_policy_share=1.5, seed=0)
    with pytest.raises(ValueError, match="needs a pool model with on_policy"):
        annotation_mix(_pool(on=False), "x", on_policy_share=0.5, seed=0)
    assert annotation_mix(_pool(on=False), "x", on_policy_share=0.0, seed=0)[0] == "off"


# ---------------------------------------------------------------------------------------------- binarize


def _judged(model, *ratings):
    return Judged(model, f"answer of {model}", dict(zip(ASPECTS, ratings, strict=True)))


def test_binarize_hand_computed():
    # means: A (5+4+4+3)/4 = 4.0, B 3.0, C unrated (its rated aspects are all 5s: it must not win),
    # D (2+2+3+3)/4 = 2.5, E (1+5+5+5)/4 = 4.0 ties A at the top.
    comps = [
        _judged("A", 5, 4, 4, 3),
        _judged("B", 3, 3, 3, 3),
        _judged("C", 5, 5, 5, None),
        _judged("D", 2, 2, 3, 3),
        _judged("E", 1, 5, 5, 5),
    ]
    assert [c.mean for c in comps] == [4.0, 3.0, None, 2.5, 4.0]
    picks = {
        (binarize(comps, np.random.default_rng(s)).chosen, binarize(comps, np.random.default_rng(s)).rejected)
        for s in range(200)
    }
    assert {c for c, _ in picks} == {0, 4}  # A or E (tied best), never the unrated C
    assert {r for _, r in picks} == {1, 3}  # B or D: strictly lower; never A/E (ties), never C
    # a single best: it is always chosen
    single = [_judged("A", 5, 5, 5, 4), _judged("B", 5, 5, 4, 4), _judged("C", 5, 5, 4, 4)]
    outs = {
        (binarize(single, np.random.default_rng(s)).chosen, binarize(single, np.random.default_rng(s)).rejected)
        for s in range(100)
    }
    assert outs == {(0, 1), (0, 2)}


def test_binarize_no_pair():
    rng = np.random.default_rng(0)
    ties = [_judged("A", 4, 4, 4, 4), _judged("B", 5, 3, 4, 4), _judged("C", 2, 2, 2, None)]
    result = binarize(ties, rng)
    assert (result.chosen, result.rejected, result.reason) == (None, None, "no_strictly_lower")
    one = [_judged("A", 4, 4, 4, 4), _judged("B", None, None, None, None)]
    assert binarize(one, rng).reason == "too_few_rated"
    assert binarize([], rng).reason == "too_few_rated"


def test_pair_row_is_a_dpo_row():
    comps = [_judged("A", 5, 4, 4, 3), _judged("B", 3, 3, 3, 3), _judged("C", None, 1, 1, 1)]
    result = binarize(comps, prompt_rng(0, "row-1", "binarize"))
    row = {"id": "row-1", "messages": [{"role": "user", "content": "Hi?"}], "extra": 3}
    conversation = prompt_messages(row, "row-1")
    out = pair_row(row, conversation, comps, result, policy="off")
    assert {k: out[k] for k in row} == row  # input fields kept
    assert out["chosen_model"] == "A" and out["rejected_model"] == "B"
    assert (out["chosen_rating"], out["rejected_rating"]) == (4.0, 3.0)
    assert out["policy"] == "off" and out["source"] == "tulu-jax data preferences"
    assert out["ratings"][2] == {"model": "C", "ratings": dict(zip(ASPECTS, [None, 1, 1, 1])), "mean": None}
    chosen, rejected = parse_preference_row(json.loads(json.dumps(out)), "row")
    assert chosen == [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "answer of A"}]
    assert rejected[-1]["content"] == "answer of B"
    assert pair_row({**row, "source": "mine"}, conversation, comps, result, policy="on")["source"] == "mine"


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "7."},
    {"role": "user", "content": "A larger one?"},
]


def test_prompt_messages_keep_the_conversation():
    # a trailing assistant turn is the reply being replaced; earlier turns and the system prompt stay
    row = {"messages": [*MULTI_TURN, {"role": "assistant", "content": "11.", "extra": 1}]}
    assert prompt_messages(row, "r") == MULTI_TURN
    assert prompt_messages({"chosen": MULTI_TURN}, "r") == MULTI_TURN
    assert prompt_messages({"prompt": "Hi?"}, "r") == [{"role": "user", "content": "Hi?"}]
    # the pair shares the earlier turns, as `tulu-jax dpo` expects
    comps = [_judged("A", 5, 5, 5, 5), _judged("B", 1, 1, 1, 1)]
    out = pair_row(row, prompt_messages(row, "r"), comps, binarize(comps, np.random.default_rng(0)), policy="off")
    chosen, rejected = parse_preference_row(json.loads(json.dumps(out)), "r")
    assert chosen == [*MULTI_TURN, {"role": "assistant", "content": "answer of A"}]
    assert rejected == [*MULTI_TURN, {"role": "assistant", "content": "answer of B"}]


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"messages": [*MULTI_TURN[:3], {"role": "assistant", "content": "x"}]},
            "the turn before the reply is assistant",
        ),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "the turn before the reply is nothing"),
        ({"messages": [{"role": "system", "content": "x"}]}, "the turn before the reply is system"),
        ({"messages": [{"role": "tool", "content": "x"}]}, r"messages\[0\] must be an object with a role"),
        ({"messages": [{"role": "user", "content": " "}]}, r"messages\[0\] has an empty content"),
        ({"messages": []}, "must be a non-empty list"),
        ({"prompt": ""}, "field 'prompt' must be a non-empty string"),
        ({"text": "x"}, "no prompt field"),
    ],
)
def test_prompt_messages_bad_rows(row, message):
    with pytest.raises(DataError, match=message) as e:
        prompt_messages(row, "f.jsonl line 3")
    assert str(e.value).startswith("f.jsonl line 3: ")


def test_render_conversation():
    assert render_conversation([{"role": "user", "content": "Hi?"}]) == "Hi?"  # one turn: verbatim
    text = render_conversation(MULTI_TURN)
    assert text == "[System]\nBe brief.\n\n[User]\nName a prime.\n\n[Assistant]\n7.\n\n[User]\nA larger one?"


# ---------------------------------------------------------------------------------------------- CLI input errors


def _prompts(tmp_path, n=4, name="prompts.jsonl", rows=None):
    path = tmp_path / name
    rows = rows or [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cli(args, capsys):
    rc = main(["data", "preferences", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _dead_url():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class _Failing(http.server.BaseHTTPRequestHandler):
    """Lists `models` at /v1/models (the up-front check passes), answers every chat request with `status`
    (500), keeping the last request body in `bodies`."""

    models: list[str] = []
    status, bodies = 500, []

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def do_POST(self):
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b'{"error": "boom"}')

    def log_message(self, *args):
        pass


def _start_failing(models, status=500):
    _Failing.models, _Failing.status, _Failing.bodies = list(models), status, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def failing_pool_server():
    server, url = _start_failing(["org/m0", "org/m1"])
    yield url
    server.shutdown()
    server.server_close()


def test_chat_client_extra_body_and_refusals():
    from tulu_jax.rollout.chat_client import ChatClient, ChatParams, ChatRefused
    from tulu_jax.rollout.http import RolloutServerError

    server, url = _start_failing(["m"], status=400)
    try:
        client = ChatClient([url], model="m", retry_deadline_s=0)
        guided = {"structured_outputs": {"choice": ["1", "2"]}}
        with pytest.raises(ChatRefused, match="HTTP 400") as e:
            client.chat([{"role": "user", "content": "hi"}], ChatParams(seed=3), extra_body=guided)
        assert e.value.status == 400 and isinstance(e.value, RolloutServerError)
        body = _Failing.bodies[-1]
        assert body["structured_outputs"] == guided["structured_outputs"] and body["seed"] == 3
        with pytest.raises(ValueError, match=r"extra_body may not set \['messages'\]"):
            client.chat([{"role": "user", "content": "hi"}], ChatParams(), extra_body={"messages": []})
        _Failing.status = 401
        with pytest.raises(ChatRefused) as e:
            client.chat([{"role": "user", "content": "hi"}], ChatParams())
        assert e.value.status == 401
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [401, 503])
def test_failures_fail_prompts_and_stop_new_ones(tmp_path, capsys, status):
    """A 401 (about every request) or a 5xx past the deadline fails the prompt: not recorded, exit 1, and no
    new prompt starts after the first failure (one deadline, not one per prompt); the prompts never started
    count as failed too."""
    server, url = _start_failing(["org/m0", "org/m1"], status=status)
    try:
        data = _pool_dict(n_off=2, on=False)
        for m in data["models"]:
            m["urls"] = [url]
        out = tmp_path / "out.jsonl"
        args = ["--prompts", _prompts(tmp_path, n=3), "--pool", _write_yaml(tmp_path, data), "--judge", url]
        args += ["--judge-model", "org/m0", "--out", str(out), "--on-policy-share", "0", "--retry-deadline", "0.2"]
        rc, stdout, err = _cli(args + ["--concurrency", "1", "--quiet"], capsys)
    finally:
        server.shutdown()
        server.server_close()
    s = _summary(stdout)
    assert rc == 1 and "rerun the same command" in err and f"HTTP {status}" in err
    assert s["failed (server error)"] == 3 and _jsonl(out) == _jsonl(f"{out}.skipped.jsonl") == []
    assert s["not started (run stopped)"] == 2
    asked = {b["messages"][-1]["content"] for b in _Failing.bodies}
    assert asked == {"What is 0 + 0?"}  # only the first prompt was started


class _Stub(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible stub: lists `models`, answers each chat request with `answer(body)` -> (HTTP
    status, text), keeping every request body in `bodies`."""

    models: list[str] = []
    bodies: list[dict] = []

    def answer(self, body):
        raise NotImplementedError

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        status, text = type(self).answer(body)
        if status != 200:
            return self._send(status, {"error": {"message": text}})
        msg = {"role": "assistant", "content": text}
        self._send(200, {"model": body["model"], "choices": [{"message": msg, "finish_reason": "stop"}]})

    def _send(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    """stub(answer) -> (url, bodies): a stub server serving "org/m0", "org/m1" and "judge"."""
    servers = []

    def start(answer):
        handler = type("Handler", (_Stub,), {"models": ["org/m0", "org/m1", "judge"], "bodies": []})
        handler.answer = staticmethod(answer)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler.bodies

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _judging(body, refuse=lambda body: False):
    """m0 answers "good", m1 "bad"; the judge rates "good" 5 and "bad" 2, or refuses (400) when `refuse`."""
    if body["model"] != "judge":
        return 200, "good" if body["model"] == "org/m0" else "bad"
    if refuse(body):
        return 400, "This model's maximum context length is 512 tokens"
    return 200, "Rating: 5" if "<answer>\ngood\n</answer>" in body["messages"][-1]["content"] else "Rating: 2"


def _stub_args(tmp_path, url, out, prompts, *extra, k=2):
    data = _pool_dict(n_off=2, on=False, k=k)
    for m in data["models"]:
        m["urls"] = [url]
    pool = _write_yaml(tmp_path, data)
    args = ["--prompts", prompts, "--pool", pool, "--judge", url, "--judge-model", "judge", "--out", str(out)]
    return args + ["--on-policy-share", "0", "--retry-deadline", "0.5", "--quiet", *map(str, extra)]


def test_stub_pairs_multi_turn_and_settings(tmp_path, capsys, stub):
    url, bodies = stub(_judging)
    rows = [{"messages": [*MULTI_TURN, {"role": "assistant", "content": "11."}]}, {"prompt": "Hi?"}]
    prompts, out = _prompts(tmp_path, rows=rows), tmp_path / "out.jsonl"
    args = _stub_args(tmp_path, url, out, prompts)
    rc, stdout, err = _cli(args, capsys)
    assert rc == 0, err
    pairs = {r["id"]: r for r in _jsonl(out)}
    assert set(pairs) == {"prompts-0", "prompts-1"} and _summary(stdout)["pairs written"] == 2
    chosen, rejected = parse_preference_row(pairs["prompts-0"], "row")
    assert chosen == [*MULTI_TURN, {"role": "assistant", "content": "good"}]
    assert rejected == [*MULTI_TURN, {"role": "assistant", "content": "bad"}]
    # the pool got the conversation up to its last user turn; the judge the conversation as text
    pool_asked = [b["messages"] for b in bodies if b["model"] != "judge" and b["messages"][0]["role"] == "system"]
    assert len(pool_asked) == 2 and all(m == MULTI_TURN for m in pool_asked)
    judged = [b["messages"][1]["content"] for b in bodies if b["model"] == "judge"]
    assert sum(render_conversation(MULTI_TURN) in j for j in judged) == 8  # 2 completions x 4 aspects
    # a rerun resumes; so does one against a server restarted elsewhere (the served model ids are the same)
    url2, bodies2 = stub(_judging)
    moved = _stub_args(tmp_path, url2, out, prompts)
    for again in (args, moved):
        rc, stdout, err = _cli(again, capsys)
        assert rc == 0 and _summary(stdout)["done before (resumed)"] == 2, err
    assert bodies2 == []  # only the up-front model checks, no chat request
    # a rerun with another setting is refused; with --overwrite it starts afresh
    rc, _, err = _cli(args + ["--seed", "1"], capsys)
    assert rc == 2 and "other settings" in err and "seed: 0 -> 1" in err and err.count("\n") == 1, err
    rc, _, err = _cli(args + ["--judge-prompt", "brief"], capsys)
    assert rc == 2 and "other settings" in err, err
    rc, stdout, err = _cli(args + ["--seed", "1", "--overwrite"], capsys)
    assert rc == 0 and _summary(stdout)["pairs written"] == 2, err


def test_bad_rows_skipped_and_counted(tmp_path, capsys, stub):
    url, _ = stub(_judging)
    rows = [{"prompt": "Hi?"}, {"messages": [{"role": "assistant", "content": "x"}]}, {"text": "no prompt"}]
    prompts, out = _prompts(tmp_path, rows=rows), tmp_path / "out.jsonl"
    rc, _, err = _cli(_stub_args(tmp_path, url, out, prompts), capsys)
    assert rc == 2 and "line 2: field 'messages': the turn before the reply is nothing" in err, err
    rc, stdout, err = _cli(_stub_args(tmp_path, url, out, prompts, "--on-bad-row", "skip"), capsys)
    assert rc == 0, err
    s = _summary(stdout)
    assert (
        s["prompts"] == 1 and s["bad rows skipped: last_turn_not_user"] == 1 and s["bad rows skipped: no_prompt"] == 1
    )
    assert [r["id"] for r in _jsonl(out)] == ["prompts-0"]


def test_fewer_off_policy_models_than_asked_is_said(tmp_path, capsys, stub):
    url, _ = stub(_judging)
    out = tmp_path / "out.jsonl"
    rc, stdout, err = _cli(_stub_args(tmp_path, url, out, _prompts(tmp_path, n=1), k=4), capsys)
    assert rc == 0, err
    assert "has 2 off-policy models, fewer than off_policy_models 4" in err
    assert _summary(stdout)["off-policy models (off_policy_models 4)"] == 2


def test_per_prompt_refusals_are_recorded_as_refused(tmp_path, capsys, stub):
    """The judge refuses (400) only the requests of a prompt too long for it; other requests succeed, so the
    refusal is the prompt's: it is recorded as `refused` with the server's message, and the run succeeds,
    even when the long prompt comes first (its 8 refused judge requests are one prompt, not 8)."""
    url, _ = stub(lambda body: _judging(body, refuse=lambda b: "LONG" in b["messages"][-1]["content"]))
    rows = [{"prompt": "LONG " * 50}, {"prompt": "Hi?"}, {"prompt": "Bye?"}]
    prompts, out = _prompts(tmp_path, rows=rows), tmp_path / "out.jsonl"
    rc, stdout, err = _cli(_stub_args(tmp_path, url, out, prompts, "--concurrency", "1"), capsys)
    assert rc == 0, err
    skipped = _jsonl(f"{out}.skipped.jsonl")
    assert [(x["key"], x["reason"]) for x in skipped] == [("prompts-0", "refused")]
    assert "maximum context length is 512" in skipped[0]["server_error"]
    s = _summary(stdout)
    assert s["skipped: refused"] == 1 and s["requests refused"] == 8 and s["pairs written"] == 2


@pytest.mark.parametrize("refuser", ["everything", "judge", "m1"])
def test_a_server_refusing_everything_stops_the_run(tmp_path, capsys, stub, refuser):
    """A server that refuses every request (--judge-guided against a hosted API, max_tokens beyond its
    context) stops the run with exit 2 naming it and quoting the server; the prompts it cost are not recorded,
    so the rerun after the fix does them."""

    def refuse(body):
        if refuser == "everything" or body["model"] == {"judge": "judge", "m1": "org/m1"}[refuser]:
            if refuser != "judge" or "structured_outputs" in body:
                return 400, "structured outputs are not supported"
        return _judging(body)

    url, bodies = stub(refuse)
    n = 20
    prompts, out = _prompts(tmp_path, n=n), tmp_path / "out.jsonl"
    guided = ["--judge-guided"] if refuser == "judge" else []
    args = _stub_args(tmp_path, url, out, prompts, "--concurrency", 4, *guided)
    rc, stdout, err = _cli(args, capsys)
    assert rc == 2 and err.startswith("tulu-jax: error: ") and err.count("\n") == 1, err
    assert "refused every request" in err and "structured outputs are not supported" in err
    who = "--judge" if refuser == "judge" else "models[1] (m1" if refuser == "m1" else "models["
    assert who in err, err
    assert _jsonl(out) == [] and _jsonl(f"{out}.skipped.jsonl") == []
    # the run stopped after REFUSAL_PROBE (8) prompts were refused, plus the 4 prompts in flight, instead of
    # asking for every prompt
    targets = {"everything": ["org/m0", "org/m1"], "judge": ["judge"], "m1": ["org/m1"]}[refuser]
    per_prompt = 8 if refuser == "judge" else 1  # requests of one prompt to that server
    for target in targets:
        assert len([b for b in bodies if b["model"] == target]) <= (8 + 4) * per_prompt
    asked = {b["messages"][-1]["content"] for b in bodies if b["model"] != "judge"}
    assert len(asked) < n
    if refuser == "judge":  # the fixed rerun (no --judge-guided) does every prompt
        args.remove("--judge-guided")
        rc, stdout, err = _cli(args, capsys)
        assert rc == 0 and _summary(stdout)["pairs written"] == n, err


def test_all_refused_in_a_short_run_is_caught_at_the_end(tmp_path, capsys, stub):
    url, _ = stub(lambda body: (400, "prompt too long"))
    out = tmp_path / "out.jsonl"
    rc, stdout, err = _cli(_stub_args(tmp_path, url, out, _prompts(tmp_path, n=1)), capsys)  # 2 requests only
    assert rc == 2 and "refused every request it got (" in err and "prompt too long" in err, err
    assert _summary(stdout)["left for a rerun (refused)"] == 1
    assert _jsonl(f"{out}.skipped.jsonl") == []


CLI_ERRORS = [
    "--on-policy-share",
    "--concurrency",
    "--retries",
    "out-not-jsonl",
    "missing-prompts",
    "missing-pool",
    "no-on-policy-model",
    "row-without-prompt",
    "repeated-id",
    "model-server-down",
    "judge-down",
    "judge-not-a-url",
    "model-not-served",
    "out-is-pool",
    "out-is-prompts-via-symlink",
    "out-folder-not-writable",
    "--retry-deadline",
]


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_input_errors_exit_2(tmp_path, capsys, failing_pool_server, case):
    dead = _dead_url()

    def pool(on=True):
        data = _pool_dict(n_off=2, on=on)
        for m in data["models"]:
            m["urls"] = [dead]
        return _write_yaml(tmp_path, data, f"pool-{on}.yaml")

    out = str(tmp_path / "out.jsonl")
    flags = {"--prompts": _prompts(tmp_path), "--pool": pool(), "--judge": dead, "--out": out}
    bad_rows = [{"prompt": "ok"}, {"text": "no prompt"}]
    served = _pool_dict(n_off=3, on=False)  # m0, m1 listed by the stub, m2 not
    for m in served["models"]:
        m["urls"] = [failing_pool_server]
    not_listed = _write_yaml(tmp_path, served, "not_listed.yaml")
    served["models"] = served["models"][:2]
    listed = _write_yaml(tmp_path, served, "listed.yaml")
    cases = {  # case -> (flags changed, the message expected)
        "--on-policy-share": ({"--on-policy-share": "1.5"}, "--on-policy-share 1.5: must be in [0, 1]"),
        "--concurrency": ({"--concurrency": "0"}, "--concurrency 0: must be >= 1"),
        "--retries": ({"--retries": "-1"}, "--retries -1: must be >= 0"),
        "out-not-jsonl": ({"--out": f"{out}.parquet"}, f"--out {out}.parquet: pairs are written row by row as JSONL"),
        "missing-prompts": ({"--prompts": f"{out}.in"}, f"--prompts {out}.in: no such file"),
        "missing-pool": ({"--pool": f"{out}.yaml"}, f"--pool {out}.yaml: no such file"),
        "no-on-policy-model": ({"--pool": pool(on=False)}, "has no model with on_policy: true; add one or pass"),
        "row-without-prompt": ({"--prompts": _prompts(tmp_path, rows=bad_rows, name="b.jsonl")}, "line 2: no prompt"),
        "repeated-id": (
            {
                "--prompts": _prompts(
                    tmp_path, rows=[{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}], name="d.jsonl"
                )
            },
            "line 2: id 'x' repeats",
        ),
        "model-server-down": ({}, f"{flags['--pool']}: models[0] (m0): "),  # checked before any prompt
        "judge-down": ({"--on-policy-share": "0", "--pool": listed}, f"--judge {dead}: "),
        "judge-not-a-url": ({"--judge": "localhost:8000"}, "--judge localhost:8000: not an http(s):// URL"),
        "model-not-served": (
            {"--pool": not_listed, "--on-policy-share": "0"},
            f"models[2] (m2): {failing_pool_server} does not serve model 'org/m2'",
        ),
    }
    link = tmp_path / "link.jsonl"
    os.symlink(flags["--prompts"], link)
    cases.update(  # each refused before any server is contacted (every server here is down)
        {
            "out-is-pool": ({"--out": flags["--pool"]}, f"--out {flags['--pool']}: pairs are written row by row"),
            "out-is-prompts-via-symlink": ({"--out": str(link)}, f"--out {link}: is --prompts"),
            "out-folder-not-writable": (
                {"--out": f"{flags['--prompts']}/x.jsonl"},
                f"--out {flags['--prompts']}/x.jsonl: cannot create its folder",
            ),
            "--retry-deadline": ({"--retry-deadline": "-1"}, "--retry-deadline -1.0: must be > 0 seconds"),
        }
    )
    changed, message = cases[case]
    flags.update(changed)
    flags.setdefault("--retry-deadline", "0.01")
    args = [x for kv in flags.items() for x in kv]
    rc, _, err = _cli(args, capsys)
    assert rc == 2
    assert err.startswith("tulu-jax: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not os.path.exists(out)
    if case.startswith("out-"):
        assert "/v1/models" not in err  # no server was asked


# ---------------------------------------------------------------------------------------------- vLLM end to end


@pytest.fixture(scope="module")
def served(vllm_server):
    """(url, served model id) of the session's tiny vLLM server."""
    from tulu_jax.rollout.chat_client import ChatClient

    return vllm_server.url, ChatClient([vllm_server.url]).served_models()[0]


def _e2e_pool(tmp_path, urls, name="pool.yaml", k=3):
    """Four "models" that are all the tiny server (or `urls[name]`), short completions."""
    models = []
    for i, name_ in enumerate("abcd"):
        models.append(
            {
                "name": name_,
                "urls": [urls.get(name_, urls["*"])],
                "on_policy": name_ == "a",
                "sampling": {"max_tokens": 12, "temperature": 1.0 if i % 2 == 0 else 0.7},
            }
        )
    return _write_yaml(tmp_path, {"off_policy_models": k, "models": models}, name)


def _args(tmp_path, pool, judge_url, out, prompts, *extra):
    base = ["--prompts", prompts, "--pool", pool, "--judge", judge_url, "--out", str(out)]
    return base + ["--judge-prompt", "brief", "--judge-max-tokens", "8", "--concurrency", "8", *map(str, extra)]


def _jsonl(path):
    """The complete lines of a JSONL output (a killed writer may leave a torn last line)."""
    return [json.loads(line) for line in _jsonl_lines(path)]


def _summary(out: str) -> dict[str, float]:
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 1)
        if len(parts) == 2:
            try:
                rows[parts[0].strip()] = float(parts[1])
            except ValueError:
                pass
    return rows


def _check_pairs(rows, pool_names, on_model="a"):
    for row in rows:
        chosen, rejected = parse_preference_row(row, row["id"])
        assert chosen[0] == rejected[0] == {"role": "user", "content": row["messages"][0]["content"]}
        means = {}
        for entry in row["ratings"]:
            vals = list(entry["ratings"].values())
            assert set(entry["ratings"]) == set(ASPECTS) and entry["model"] in pool_names
            if all(v is not None for v in vals):
                assert all(v in (1, 2, 3, 4, 5) for v in vals)
                assert entry["mean"] == np.mean(vals)  # exact: quarters
                means.setdefault(entry["model"], entry["mean"])
            else:
                assert entry["mean"] is None
        assert row["chosen_rating"] == max(means.values()) == means[row["chosen_model"]]
        assert row["rejected_rating"] < row["chosen_rating"]
        assert row["rejected_rating"] == means[row["rejected_model"]]
        models = [e["model"] for e in row["ratings"]]
        if row["policy"] == "on":
            assert len(models) == 2 and models.count(on_model) == 1
        else:
            assert len(models) == 3 == len(set(models)) and on_model not in models


@pytest.mark.vllm
def test_guided_judge_writes_dpo_pairs(served, tmp_path, capsys):
    url, _ = served
    prompts = _prompts(tmp_path, n=4)
    out = tmp_path / "prefs.jsonl"
    args = _args(tmp_path, _e2e_pool(tmp_path, {"*": url}), url, out, prompts, "--judge-guided")
    rc, stdout, err = _cli(args, capsys)
    assert rc == 0, err
    rows, skipped = _jsonl(out), _jsonl(f"{out}.skipped.jsonl")
    assert sorted([r["id"] for r in rows] + [s["key"] for s in skipped]) == [f"prompts-{i}" for i in range(4)]
    assert rows, "a guided judge rates every completion: some prompt must have a pair"
    assert all(s["reason"] == "no_strictly_lower" for s in skipped)  # guided: nothing is unrated
    _check_pairs(rows, set("abcd"))
    s = _summary(stdout)
    completions = sum(len(r["ratings"]) for r in rows) + sum(len(x["ratings"]) for x in skipped)
    assert s["pairs written"] == len(rows) and s["completions"] == completions
    assert s["judge requests"] == 4 * (completions - s["empty (not judged)"]) and s["unparseable ratings"] == 0
    assert s["requests/s"] > 0
    # what `tulu-jax dpo` reads
    counts = {"rows_read": 0, "rows_skipped": {}}
    assert len(list(iter_preference_pairs([str(out)], "error", counts))) == len(rows)
    # rerun: everything is done, nothing is asked again
    rc, stdout, _ = _cli(args, capsys)
    assert rc == 0 and _summary(stdout)["done before (resumed)"] == 4 and _summary(stdout)["completions"] == 0


@pytest.mark.vllm
def test_garbage_judge_is_counted_never_invented(served, tmp_path, capsys):
    url, _ = served
    out = tmp_path / "prefs.jsonl"
    args = _args(tmp_path, _e2e_pool(tmp_path, {"*": url}), url, out, _prompts(tmp_path, n=3), "--retries", 1)
    rc, stdout, err = _cli(args, capsys)
    assert rc == 0, err
    assert _jsonl(out) == []  # no rating could be read, so no pair is made up
    skipped = _jsonl(f"{out}.skipped.jsonl")
    assert len(skipped) == 3 and {s["reason"] for s in skipped} == {"too_few_rated"}
    assert all(v is None for s in skipped for e in s["ratings"] for v in e["ratings"].values())
    s = _summary(stdout)
    judged = s["completions"] - s["empty (not judged)"]
    assert s["judge requests"] == s["unparseable ratings"] == judged * 4 * 2  # every aspect tried twice
    assert s["aspects left unrated"] == judged * 4 and s["skipped: too few rated"] == 3


@pytest.mark.vllm
def test_killed_run_resumes_each_prompt_once(served, tmp_path):
    url, _ = served
    n = 12
    prompts, out = _prompts(tmp_path, n=n), tmp_path / "prefs.jsonl"
    args = _args(tmp_path, _e2e_pool(tmp_path, {"*": url}), url, out, prompts, "--judge-guided")
    args[args.index("--concurrency") + 1] = "1"
    cmd = [sys.executable, "-m", "tulu_jax.cli", "data", "preferences", *args]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = lambda: len(_jsonl_lines(out)) + len(_jsonl_lines(f"{out}.skipped.jsonl"))  # noqa: E731
    deadline = time.monotonic() + 120
    while done() < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= done() < n, "the kill should land mid-run"
    first = {r["id"]: r for r in _jsonl(out)}
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows, skipped = _jsonl(out), _jsonl(f"{out}.skipped.jsonl")
    keys = [r["id"] for r in rows] + [s["key"] for s in skipped]
    assert sorted(keys) == sorted(f"prompts-{i}" for i in range(n))  # each exactly once
    assert all(first[r["id"]] == r for r in rows if r["id"] in first)  # rows from before the kill kept as written
    _check_pairs(rows, set("abcd"))
    # the resumed run made the same per-prompt choices a fresh one makes
    fresh = tmp_path / "fresh.jsonl"
    fresh_args = [fresh if a == str(out) else a for a in args]
    assert subprocess.run([*cmd[:5], *map(str, fresh_args)], env=env, capture_output=True).returncode == 0
    mix = lambda rows: {r.get("id", r.get("key")): (r["policy"], [e["model"] for e in r["ratings"]]) for r in rows}  # noqa: E731
    both = _jsonl(fresh) + _jsonl(f"{fresh}.skipped.jsonl")
    assert mix(rows + skipped) == mix(both)


def _jsonl_lines(path):
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return f.read().split(b"\n")[:-1]


@pytest.fixture
def failing(served):
    """A server that lists the tiny server's model and answers every chat request with a 500."""
    server, url = _start_failing([served[1]])
    yield url
    server.shutdown()
    server.server_close()


@pytest.mark.vllm
@pytest.mark.parametrize("down", ["pool model", "judge"])
def test_server_down_fails_prompts_then_rerun_completes(served, failing, tmp_path, capsys, down):
    url, _ = served
    prompts, out = _prompts(tmp_path, n=4), tmp_path / "prefs.jsonl"
    bad_pool = _e2e_pool(tmp_path, {"*": url, "b": failing} if down == "pool model" else {"*": url}, "bad.yaml")
    judge = failing if down == "judge" else url
    args = _args(tmp_path, bad_pool, judge, out, prompts, "--judge-guided", "--retry-deadline", "0.5")
    rc, stdout, err = _cli(args, capsys)
    assert rc == 1
    assert "rerun the same command" in err and "HTTP 500" in err
    failed = _summary(stdout)["failed (server error)"]
    written = _jsonl(out) + _jsonl(f"{out}.skipped.jsonl")
    assert failed >= 1 and failed + len(written) == 4  # failed prompts are not recorded
    if down == "judge":
        assert failed == 4
    else:  # exactly the prompts that drew model b failed
        pool = load_pool(bad_pool)
        drew_b = {
            f"prompts-{i}"
            for i in range(4)
            if "b" in annotation_mix(pool, f"prompts-{i}", on_policy_share=0.5, seed=0)[1]
        }
        assert failed == len(drew_b) and not drew_b & {r.get("id", r.get("key")) for r in written}
    good = _args(tmp_path, _e2e_pool(tmp_path, {"*": url}, "good.yaml"), url, out, prompts, "--judge-guided")
    rc, stdout, err = _cli(good, capsys)
    assert rc == 0, err
    keys = [r["id"] for r in _jsonl(out)] + [s["key"] for s in _jsonl(f"{out}.skipped.jsonl")]
    assert sorted(keys) == [f"prompts-{i}" for i in range(4)]
    assert _summary(stdout)["done before (resumed)"] == 4 - failed


@pytest.mark.vllm
def test_requests_too_long_for_the_context_are_left_out(served, tmp_path, capsys):
    """The tiny server's context is 512 tokens ("apple " is 2 tokens of the tiny tokenizer): a 480-token prompt
    gets completions but its judge requests are refused (HTTP 400); a 600-token one gets no completion. The
    short prompts' requests succeed, so those refusals are the long prompts' own: both are recorded as
    `refused` with the server's message, nothing is retried forever, the run succeeds."""
    url, _ = served
    short = [{"prompt": f"Name a {thing}."} for thing in ("color", "fruit", "city")]
    rows = [*short, {"prompt": "apple " * 240}, {"prompt": "apple " * 300}]
    prompts, out = _prompts(tmp_path, rows=rows), tmp_path / "prefs.jsonl"
    pool_path = _e2e_pool(tmp_path, {"*": url})
    rc, stdout, err = _cli(_args(tmp_path, pool_path, url, out, prompts, "--judge-guided"), capsys)
    assert rc == 0, err
    skipped = {s["key"]: s for s in _jsonl(f"{out}.skipped.jsonl")}
    assert skipped["prompts-3"]["reason"] == skipped["prompts-4"]["reason"] == "refused"
    assert all("HTTP 400" in skipped[k]["server_error"] for k in ("prompts-3", "prompts-4"))
    assert skipped["prompts-4"]["ratings"] == []  # every completion request refused
    assert all(v is None for e in skipped["prompts-3"]["ratings"] for v in e["ratings"].values())
    assert {"prompts-3", "prompts-4"}.isdisjoint(r["id"] for r in _jsonl(out))
    s = _summary(stdout)
    _, names4 = annotation_mix(load_pool(pool_path), "prompts-4", on_policy_share=0.5, seed=0)
    unrated = s["aspects left unrated"]
    assert unrated > 0 and unrated % 4 == 0 and s["unparseable ratings"] == 0  # guided: refusals only
    assert s["requests refused"] == len(names4) + unrated and s["skipped: refused"] == 2


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_hides_the_progress_bar(tmp_path, capsys, stub, monkeypatch, quiet):
    import tulu_jax.curation.requests as requests

    seen, real = [], requests.run_requests
    monkeypatch.setattr(requests, "run_requests", lambda *a, **kw: seen.append(kw["progress"]) or real(*a, **kw))
    url, _ = stub(_judging)
    args = _stub_args(tmp_path, url, tmp_path / "out.jsonl", _prompts(tmp_path, n=1))
    if not quiet:
        args.remove("--quiet")
    rc, _, err = _cli(args, capsys)
    assert rc == 0 and seen == [not quiet], err
