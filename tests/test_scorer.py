"""The Scorer pool: input order, a real library hang killed at the deadline, worker reuse, verifier
exceptions and dead workers scored as errors, and a seeded fuzz of every verifier."""

import importlib.util
import random
import time

import pytest
from test_rewards_math_gsm8k import GSM8K_ANSWERS, GSM8K_VECTORS, MATH_ANSWERS, MATH_VECTORS

from tulu_jax.rewards import Scorer, UnknownDataset, VerifyItem, verify

PROMPT = "<|user|>\nQ\n<|assistant|>\n"
TIMEOUT_S = 3.0
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


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        Scorer(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        Scorer(workers=1, timeout_s=0)


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


def fuzz_items(seed: int, per_verifier: int) -> list[VerifyItem]:
    """Mutated real answers and random strings (half each) for every verifier that can be imported."""
    rng = random.Random(seed)
    bases = {"gsm8k": GSM8K_VECTORS + GSM8K_ANSWERS, "math": MATH_VECTORS + MATH_ANSWERS}
    if importlib.util.find_spec("tulu_jax.rewards.ifeval") is not None:  # written by another branch
        bases["ifeval"] = [("Hello world.", '{"func_name": "validate_lowercase"}', 0)]
    items = []
    for dataset, base in bases.items():
        for k in range(per_verifier):
            response, truth, _ = rng.choice(base)
            if k % 2:
                response = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 80)))
            else:
                response = _mutate(rng, response)
            truth = _mutate(rng, truth) if rng.random() < 0.2 else truth
            items.append(VerifyItem(dataset, PROMPT + response, truth))
    return items


def test_fuzz_every_verifier():
    items = fuzz_items(seed=1234, per_verifier=1000)
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
