"""The Scorer pool: input order, a real library hang killed at the deadline, worker reuse, verifier
exceptions and dead workers scored as errors, and a seeded fuzz of every verifier."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli_env
from test_rewards_math_gsm8k import GSM8K_ANSWERS, GSM8K_VECTORS, MATH_ANSWERS, MATH_VECTORS, hostile_inputs

from tulu_jax.rewards import Scorer, UnknownDataset, VerifyItem, verify

PROMPT = "<|user|>\nQ\n<|assistant|>\n"
TIMEOUT_S = 5.0  # the slowest legitimate case here takes ~1 s on a loaded 2-core machine
# sympy expanding (x+y+z)^999 against x^2+1 runs for minutes (over 20 s measured), in C code no signal stops.
HANG = VerifyItem("math", PROMPT + "So the answer is $\\boxed{(x+y+z)^{999}}$.", "x^2+1")
KILL_SLACK_S = 2.0  # the parent notices an overrun within one wait() wake-up; a loaded machine adds delay

# (dataset, response, ground truth, verdict): test_rewards_math_gsm8k.py checks these verdicts in-process.
CASES = [("gsm8k", *case) for case in GSM8K_VECTORS + GSM8K_ANSWERS] + [
    ("math", *case) for case in MATH_VECTORS + MATH_ANSWERS
]


@pytest.fixture(scope="module")
def scorer():
    with Scorer(workers=2, timeout_s=TIMEOUT_S, plugins=("verifier_plugin",)) as s:
        yield s


def _items(cases):
    return [VerifyItem(d, PROMPT + r, g) for d, r, g, _ in cases]


def _expected(cases):
    return [float(e) for _, _, _, e in cases]


def test_order_kept_and_verdicts_equal_in_process(scorer):
    cases = CASES * 2
    random.Random(0).shuffle(cases)
    verdicts = scorer.score(_items(cases))
    assert [v.score for v in verdicts] == _expected(cases)
    assert [v.verifier for v in verdicts] == [d for d, _, _, _ in cases]
    item = VerifyItem("math", PROMPT + "$\\boxed{2\\sqrt{2}}$", "\\sqrt{8}")
    pooled, local = scorer.score([item])[0], verify(item.dataset, item.response, item.ground_truth)
    assert (pooled.score, pooled.verifier, pooled.status, pooled.details) == (1.0, "math", "ok", None)
    assert (local.score, local.verifier, local.status, local.details) == (1.0, "math", "ok", None)
    assert {v.status for v in verdicts} == {"ok"}
    assert scorer.score([]) == []


def test_pool_is_reused(scorer):
    pids = scorer.pids
    scorer.score(_items(CASES[:5]))
    scorer.score(_items(CASES[5:40]))
    assert scorer.pids == pids


def test_real_hang_is_killed_at_the_deadline(scorer):
    before = scorer.pids
    ok = _items(CASES[:30])
    items = ok[:10] + [HANG] + ok[10:]
    expected = _expected(CASES[:30])
    start = time.monotonic()
    verdicts = scorer.score(items)
    wall = time.monotonic() - start
    hang = verdicts[10]
    assert (hang.score, hang.status, hang.verifier) == (0.0, "timeout", "math")
    assert TIMEOUT_S <= hang.elapsed_s < TIMEOUT_S + KILL_SLACK_S
    assert wall < TIMEOUT_S + KILL_SLACK_S + 5.0
    others = verdicts[:10] + verdicts[11:]
    assert [v.score for v in others] == expected
    assert {v.status for v in others} == {"ok"}
    after = scorer.pids
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1  # only the hung worker was replaced
    assert [v.score for v in scorer.score(ok)] == expected  # the pool keeps working
    assert scorer.pids == after


def testhostile_inputs_through_the_pool(scorer, tmp_path):
    pwned, inputs = hostile_inputs(tmp_path)
    items = [VerifyItem(d, PROMPT + r, "7") for d in ("gsm8k", "math") for r in inputs]
    verdicts = scorer.score(items)
    assert {(v.score, v.status) for v in verdicts} == {(0.0, "ok")}
    assert max(v.elapsed_s for v in verdicts) < TIMEOUT_S
    assert not pwned.exists()


def test_verifier_exception_scores_zero_as_error(scorer):
    items = _items(CASES[:3]) + [VerifyItem("test_raise", "boom", "x")] + _items(CASES[3:6])
    verdicts = scorer.score(items)
    assert (verdicts[3].score, verdicts[3].status) == (0.0, "error")
    assert "RuntimeError: test verifier raised" in verdicts[3].message
    assert [v.score for v in verdicts[:3] + verdicts[4:]] == _expected(CASES[:6])


def test_dead_worker_scores_zero_as_error_and_is_replaced(scorer):
    before = scorer.pids
    items = _items(CASES[:3]) + [VerifyItem("test_crash", "x", "x")] + _items(CASES[3:20])
    verdicts = scorer.score(items)
    assert (verdicts[3].score, verdicts[3].status) == (0.0, "error")
    assert "died" in verdicts[3].message
    assert [v.score for v in verdicts[:3] + verdicts[4:]] == _expected(CASES[:20])
    assert sum(a != b for a, b in zip(before, scorer.pids, strict=True)) == 1
    counts = scorer.stats["test_crash"]
    assert counts["error"] >= 1


def test_unknown_dataset_is_refused_before_any_work(scorer):
    with pytest.raises(UnknownDataset, match="known: .*gsm8k.*math"):
        scorer.score(_items(CASES[:2]) + [VerifyItem("mmlu", "x", "y")])
    with pytest.raises(TypeError, match="item 0"):
        scorer.score([VerifyItem("gsm8k", None, "1")])
    none_truth = scorer.score([VerifyItem("gsm8k", "18", None)])[0]
    assert (none_truth.score, none_truth.status) == (0.0, "ok")


def test_workers_do_not_import_jax(scorer):
    verdict = scorer.score([VerifyItem("test_modules", "jax,sympy,tulu_jax.rewards.math_answer", "")])[0]
    assert verdict.details == (False, True, True)
    assert verdict.score == 0.0  # a verifier with per-part results (google_ifeval) passes only if all do


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        Scorer(workers=0)
    for timeout_s in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^timeout_s must be a finite number of seconds > 0, got"):
            Scorer(workers=1, timeout_s=timeout_s)


# The owner of a Scorer, hung on two items that each run for minutes: prints its worker pids, then scores.
OWNER = """
from tulu_jax.rewards import Scorer, VerifyItem
if __name__ == "__main__":
    with Scorer(workers=2, timeout_s=60) as scorer:
        print(*scorer.pids, flush=True)
        scorer.score([VerifyItem("math", {response!r}, {ground_truth!r})] * 2)
"""


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie nobody reaps, e.g. under a container's PID 1, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_owner(sig):
    code = OWNER.format(response=HANG.response, ground_truth=HANG.ground_truth)
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        workers = [int(p) for p in owner.stdout.readline().split()]
        assert len(workers) == 2, owner.communicate(timeout=60)
        forkserver = {_parent(pid) for pid in workers}
        assert owner.pid not in forkserver  # the workers are the forkserver's children, not the owner's
        time.sleep(2.0)  # both workers are now deep in sympy
        assert all(_running(pid) for pid in workers)
        owner.send_signal(sig)
        owner.wait(timeout=30)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(_running(p) for p in [*workers, *forkserver]):
            time.sleep(0.1)
        assert [p for p in [*workers, *forkserver] if _running(p)] == []
    finally:
        owner.kill()
        owner.wait()


# ------------------------------------------------------------------------------------------------ fuzz

FUZZ_TIMEOUT_S = 10.0
INSERTS = [
    "{", "}", "\\", "\\boxed{", "\\boxed ", "$", "^{99999999}", "^{9^{9}}", "!!!", "!", "\\frac", "\\sqrt", "ü",
    "\u202e", "\ud800", "\x00", "Final Answer: The final answer is ", ". I hope it is correct.", "#### ", "1,000",
    "-", "=", "\\left(", "\\right)", "\\text{ ", "\\pm", "\\infty", "<|assistant|>\n", "9" * 50, "\n",
]  # fmt: skip
ALPHABET = "0123456789.,-+=$\\{}()[]^_!/ abcxyz\n\u00e9\u4e2d\U0001f600"


def _mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 6)):
        at = rng.randint(0, len(text))
        op = rng.random()
        if op < 0.6:
            text = text[:at] + rng.choice(INSERTS) + text[at:]
        elif op < 0.8:
            text = text[:at] + text[at + rng.randint(1, 10) :]
        else:
            text = text[:at] + text[at : at + 20] * rng.randint(2, 50) + text[at:]
    return text


# strings per verifier: MATH's symbolic checks cost ~100x GSM8K's, so it gets fewer to keep the test short
FUZZ_COUNTS = {"gsm8k": 1500, "math": 700, "ifeval": 1500, "google_ifeval": 300}
IF_BASES = [
    ("Hello world.", '{"func_name": "validate_lowercase"}', 0),
    ("HELLO", '{"func_name": "validate_uppercase"}', 1),
    ("a, b", '{"func_name": "validate_no_commas"}', 0),
    ("Paris. Have a nice day.", '{"func_name": "validate_end", "end_phrase": "Have a nice day."}', 1),
    ("the river", '{"func_name": "verify_keywords", "keyword_list": ["river"]}', 1),
    ("one two", '{"func_name": "validate_word_constraint", "N": 3, "quantifier": "at most"}', 1),
    ("Bonjour tout le monde", '{"func_name": "validate_response_language", "language": "fr"}', 1),
    ('{"a": [1, 2]}', '{"func_name": "validate_json_format"}', 1),
    ("x [a] [b]", '{"func_name": "validate_placeholders", "N": 2}', 1),
    ("* a\n* b", '{"func_name": "verify_bullet_points", "N": 2}', 1),
]
GOOGLE_BASES = [
    (
        "hello there, friend",
        json.dumps(
            {
                "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
                "kwargs": [{}, {}],
                "prompt": "Say hello.",
            }
        ),
        0,
    ),
    (
        "One. Two. Three.",
        json.dumps(
            {
                "instruction_id_list": ["length_constraints:number_sentences"],
                "kwargs": [{"relation": "at least", "num_sentences": 2}],
                "prompt": "Write.",
            }
        ),
        1,
    ),
]


def fuzz_items(seed: int, counts: dict[str, int]) -> list[VerifyItem]:
    """Mutated real answers and random strings (half each) for every verifier that can be imported."""
    rng = random.Random(seed)
    bases = {"gsm8k": GSM8K_VECTORS + GSM8K_ANSWERS, "math": MATH_VECTORS + MATH_ANSWERS}
    bases["ifeval"], bases["google_ifeval"] = IF_BASES, GOOGLE_BASES
    items = []
    for dataset, base in bases.items():
        for k in range(counts[dataset]):
            response, truth, _ = rng.choice(base)
            if k % 2:
                response = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 80)))
            else:
                response = _mutate(rng, response)
            if dataset in ("gsm8k", "math") and rng.random() < 0.2:  # IF truths stay JSON: a bad one is a data error
                truth = _mutate(rng, truth)
            items.append(VerifyItem(dataset, PROMPT + response, truth))
    return items


def test_fuzz_every_verifier():
    items = fuzz_items(seed=1234, counts=FUZZ_COUNTS)
    start = time.monotonic()
    with Scorer(workers=2, timeout_s=FUZZ_TIMEOUT_S) as scorer:
        verdicts = scorer.score(items)
    wall = time.monotonic() - start
    assert len(verdicts) == len(items)
    for item, v in zip(items, verdicts, strict=True):
        assert v.status in ("ok", "timeout"), (item, v)
        assert v.score in (0.0, 1.0)
    worst = max(v.elapsed_s for v in verdicts if v.status == "ok")
    assert worst < FUZZ_TIMEOUT_S
    timeouts = sum(v.status == "timeout" for v in verdicts)
    for v in verdicts:
        if v.status == "timeout":
            assert v.elapsed_s < FUZZ_TIMEOUT_S + KILL_SLACK_S
    passed = sum(v.score for v in verdicts)
    print(
        f"\nfuzz: {len(items)} strings ({sorted(scorer.stats)}), exceptions escaped: 0, errors: 0, "
        f"timeouts: {timeouts}, passed: {passed:.0f}, worst ok latency {worst:.3f} s, wall {wall:.1f} s"
    )


def test_interrupted_call_leaves_no_stale_chunk(scorer, monkeypatch):
    """An exception in the middle of `score` (Ctrl-C) replaces the busy workers: the next call is clean."""
    from tulu_jax.rewards.scorer import Scorer as ScorerClass

    real_wait = ScorerClass._wait

    def interrupted(self, *args):
        real_wait(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(ScorerClass, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scorer.score(_items(CASES * 4))
    monkeypatch.setattr(ScorerClass, "_wait", real_wait)
    assert [v.score for v in scorer.score(_items(CASES[:30]))] == _expected(CASES[:30])


# ------------------------------------------------------------------------------------ failed replacements

SCORER_MODULE = sys.modules[Scorer.__module__]


def _flaky_workers(monkeypatch, plugin: str, failures: int) -> list:
    """Makes the next `failures` workers the Scorer starts also import `plugin` (which kills or hangs them
    while they start); returns the list those workers are appended to."""
    real = SCORER_MODULE._Worker
    bad = []

    class Flaky(real):
        def __init__(self, ctx, legacy, plugins, *rest):
            flaky = len(bad) < failures
            super().__init__(ctx, legacy, (*plugins, plugin) if flaky else plugins, *rest)
            if flaky:
                bad.append(self)

    monkeypatch.setattr(SCORER_MODULE, "_Worker", Flaky)
    return bad


def _crash_then_ok():
    """A chunk whose crash kills the only worker, so that a replacement must start to finish the call."""
    return _items(CASES[:3]) + [VerifyItem("test_crash", "x", "x")] + _items(CASES[3:8])


def _alarm(seconds: int):
    """Raises TimeoutError in this (main) thread after `seconds`: a call that would loop forever fails."""

    def fire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)


def _no_alarm():
    signal.alarm(0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_replacement_that_dies_while_starting_is_retried(monkeypatch):
    with Scorer(workers=1, timeout_s=TIMEOUT_S, plugins=("verifier_plugin",)) as scorer:
        bad = _flaky_workers(monkeypatch, "start_crash_plugin", failures=SCORER_MODULE.START_TRIES - 1)
        verdicts = scorer.score(_crash_then_ok())
        assert len(bad) == SCORER_MODULE.START_TRIES - 1
        assert [w.proc.exitcode for w in bad] == [5] * len(bad)  # each died in its plugin import
        assert (verdicts[3].score, verdicts[3].status) == (0.0, "error")
        assert [v.score for v in verdicts[:3] + verdicts[4:]] == _expected(CASES[:8])
        assert {v.status for v in verdicts[:3] + verdicts[4:]} == {"ok"}


def test_replacement_that_never_starts_is_a_clear_error(monkeypatch):
    scorer = Scorer(workers=1, timeout_s=TIMEOUT_S, plugins=("verifier_plugin",))
    try:
        bad = _flaky_workers(monkeypatch, "start_crash_plugin", failures=100)
        tries = SCORER_MODULE.START_TRIES
        with pytest.raises(RuntimeError, match=rf"failed to start {tries} times in a row; last: worker \d+ died"):
            scorer.score(_crash_then_ok())
        assert len(bad) == tries
        with pytest.raises(RuntimeError, match="Scorer is closed"):  # the short pool is shut, not reused
            scorer.score(_items(CASES[:1]))
        assert not any(_running(pid) for pid in scorer.pids)
    finally:
        scorer.close()


def test_replacement_that_hangs_while_starting_is_timed_out(monkeypatch):
    with Scorer(workers=1, timeout_s=TIMEOUT_S, plugins=("verifier_plugin",)) as scorer:
        scorer.start_timeout_s = 3.0  # for the replacements only: the first worker has started
        bad = _flaky_workers(monkeypatch, "start_hang_plugin", failures=1)
        _alarm(120)  # without a start deadline, score() would wait for the hung worker forever
        try:
            start = time.monotonic()
            verdicts = scorer.score(_crash_then_ok())
            wall = time.monotonic() - start
        finally:
            _no_alarm()
        assert len(bad) == 1 and not bad[0].proc.is_alive()  # killed at its start deadline
        assert wall >= scorer.start_timeout_s
        assert (verdicts[3].score, verdicts[3].status) == (0.0, "error")
        assert [v.score for v in verdicts[:3] + verdicts[4:]] == _expected(CASES[:8])


# ------------------------------------------------------------------------------------ the deadline race


def test_overrun_blames_the_item_checked_not_the_next_one():
    """The deadline check saw item 0 overdue, but the worker finished it and moved on to item 1 before the
    kill: item 0 gets "timeout", item 1 (innocent) is queued again. `_lost` is called directly with the
    checked (index, start), so the moment of the move is fixed rather than left to the scheduler."""
    from collections import deque

    with Scorer(workers=1, timeout_s=TIMEOUT_S, plugins=("verifier_plugin",)) as scorer:
        w = scorer._workers[0]
        payload = [("gsm8k", PROMPT + "18", "18"), ("test_sleep", "30", "x")]
        w.send([0, 1], payload)
        deadline = time.monotonic() + 30
        while w.current()[0] != 1:  # item 0 done, item 1 (30 s of sleep) under way
            assert time.monotonic() < deadline, "the worker never reached item 1"
            time.sleep(0.01)
        checked = (0, w.current()[1] - int((TIMEOUT_S + 1) * 1e9))  # as the check saw it: item 0, overdue
        results, queue = [None, None], deque()
        scorer._lost(0, payload, results, queue, "timeout", "over the deadline", checked)
        assert (results[0].score, results[0].status, results[0].verifier) == (0.0, "timeout", "gsm8k")
        assert results[0].elapsed_s > TIMEOUT_S
        assert results[1] is None and list(queue) == [[1]]
        assert not w.proc.is_alive() and scorer.pids != [w.proc.pid]
        assert [v.score for v in scorer.score(_items(CASES[:5]))] == _expected(CASES[:5])  # the pool works


def test_lost_worker_reply_already_sent_is_kept():
    """A worker that sent its whole chunk's reply just before the kill: the reply is used, nothing is blamed."""
    from collections import deque

    with Scorer(workers=1, timeout_s=TIMEOUT_S, plugins=("verifier_plugin",)) as scorer:
        w = scorer._workers[0]
        payload = [(d, PROMPT + r, g) for d, r, g, _ in CASES[:4]]
        w.send([0, 1, 2, 3], payload)
        assert w.conn.poll(30)  # the reply is in the pipe
        results, queue = [None] * 4, deque()
        scorer._lost(0, payload, results, queue, "timeout", "over the deadline", (0, 0))
        assert [(v.score, v.status) for v in results] == [(e, "ok") for e in _expected(CASES[:4])]
        assert not queue


# ------------------------------------------------------------------------------------ pool size


def test_default_pool_size_is_capped(monkeypatch):
    from tulu_jax.rewards.scorer import DEFAULT_MAX_WORKERS, default_workers

    for cpus, expected in ((None, 1), (1, 1), (3, 3), (DEFAULT_MAX_WORKERS, DEFAULT_MAX_WORKERS), (256, 8)):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert default_workers() == min(cpus or 1, DEFAULT_MAX_WORKERS) == expected
    monkeypatch.setattr(os, "cpu_count", lambda: 256)
    monkeypatch.setattr(SCORER_MODULE, "default_workers", lambda: 1)  # Scorer() asks default_workers
    with Scorer() as scorer:
        assert len(scorer.pids) == 1
