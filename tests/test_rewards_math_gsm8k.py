"""GSM8K and MATH verifiers (open-instruct `ground_truth_utils.py`, `math_utils.py`; Tülu 3 §6): the
reference's test vectors, real-looking answers, hostile inputs, and the linear-time rewrites of the
reference's regexes checked against those regexes on random strings."""

import os
import random
import re
import time

import pytest

from tulu_jax.rewards import (
    answer_text,
    check_ground_truth,
    extract_gsm8k_answer,
    gsm8k_ground_truth,
    hendrycks_is_equiv,
    math_candidates,
    normalize_final_answer,
    refusal_reason,
    strip_string,
    symbolic_equiv,
    verify,
    verify_math,
)
from tulu_jax.rewards.gsm8k import drop_thousands_commas
from tulu_jax.rewards.math_answer import ambiguity_reason, last_boxed_content, minerva_answer

PROMPT = "<|user|>\nQ\n<|assistant|>\n"
# In-process (no deadline) hostile inputs must finish well inside the Scorer's default 10 s deadline,
# on a loaded 2-core machine.
PROMPT_BOUND_S = 5.0


def score(dataset: str, response: str, ground_truth: str) -> float:
    return verify(dataset, PROMPT + response, ground_truth).score


# Reference vectors (2024 verdicts). "-5" failed in 2024 (the old regex dropped the sign of integers);
# open-instruct HEAD's regex, which we use, keeps it.
GSM8K_VECTORS = [
    ("So she pays 18 dollars.\n#### 18", "18", 1),
    ("Total is 1,234 apples", "1234", 1),
    ("The total is 1,000,000 dollars", "1000000", 1),
    ("The answer is 18.", "18", 1),
    ("The answer is 18.0", "18", 0),
    ("It costs $3.50", "3.5", 0),
    ("The temperature is -5", "-5", 1),
    ("18 apples, wait, 20 apples", "18", 0),
    ("So the answer is 12,345.67", "12345.67", 1),
]
GSM8K_ANSWERS = [
    (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
        "in April and May.\n#### 72",
        "72",
        1,
    ),
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.", "10", 1),
    ("Betty has 100 / 2 = $50. Her grandparents gave 15 * 2 = $30. She needs 100 - 50 - 30 - 15 = $5 more.", "5", 1),
    ("Julie read 12 x 2 = 24 pages today, 12 + 24 = 36 in all, so 84 are left; half is 42. The answer is 42.", "42", 1),
    ("James writes 3 * 2 = 6 pages a week, so 6 * 52 = 312 pages a year.", "312", 1),
    ("The answer is 42 pages, which is 50% of the rest.", "42", 0),
    ("Total cost: $1,250.00", "1250", 0),
    ("He has 5 - 8 = -3 dollars, so he owes $3.", "3", 1),
    ("The temperature dropped to -12 degrees.", "-12", 1),
    ("So the total is 2,400.", "2400", 1),
    ("Mark needs 3/4 of a cup", "0.75", 0),
    ("It takes .5 hours", ".5", 1),
    ("It takes .5 hours", "0.5", 0),
    ("I cannot solve this problem.", "7", 0),
    ("The final answer is +5", "+5", 1),
    ("The final answer is +5", "5", 0),
    ("There are 1200 eggs.", "Each day 3 * 400 = 1,200 eggs.\n#### 1,200", 1),
    ("Answer: 1e3", "1000", 0),
    ("The answer is 18 \n\n", "18", 1),
]


@pytest.mark.parametrize(("response", "ground_truth", "expected"), GSM8K_VECTORS + GSM8K_ANSWERS)
def test_gsm8k_verdicts(response, ground_truth, expected):
    assert score("gsm8k", response, ground_truth) == expected


def test_gsm8k_pieces():
    assert extract_gsm8k_answer("no number here") == "no number here"
    assert extract_gsm8k_answer("a 1,2,3 b") == "3"  # one pass: "12,3"
    assert extract_gsm8k_answer("x -7.25 and +3") == "+3"
    assert gsm8k_ground_truth("So 3 * 6 = 18.\n#### 1,018 ") == "1018"
    assert gsm8k_ground_truth("a #### 1 #### 2") == "2"
    assert gsm8k_ground_truth(" 18 ") == "18"  # no ####: the whole field, stripped
    assert answer_text("<|assistant|>\nfirst<|assistant|>\n  second \n") == "second"
    assert answer_text("  no header ") == "no header"


def test_thousands_commas_equal_the_reference_single_pass():
    """The reference's line `re.sub(r"(\\d),(\\d)", r"\\1\\2", text)`, run once (not until nothing changes)."""

    def reference(text: str) -> str:
        return re.sub(r"(\d),(\d)", r"\1\2", text)

    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("12,, a.-") for _ in range(rng.randint(0, 20)))
        assert drop_thousands_commas(text) == reference(text), text
    # Groups of 2+ digits merge in one pass (the digit after a comma is not the next match's first digit);
    # single digits do not: a list of primes is not one number.
    assert drop_thousands_commas("1,000,000 and 12,345.67") == "1000000 and 12345.67"
    assert drop_thousands_commas("2,3,5") == "23,5"
    assert score("gsm8k", "The primes are 2,3,5", "5") == 1
    assert score("gsm8k", "The primes are 2,3,5", "235") == 0
    assert score("gsm8k", "Count 1,2,3", "3") == 1


MATH_VECTORS = [
    ("Thus the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", 1),
    ("$\\boxed{0.5}$", "\\frac{1}{2}", 1),
    ("Final Answer: The final answer is $\\dfrac{3}{4}$. I hope it is correct.", "\\frac{3}{4}", 1),
    ("Final Answer: The final answer is 5.", "5", 0),
    ("The roots give $x = 2$ and so the sum is $5$", "5", 1),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1),
    ("\\boxed{(1,2)}", "(1, 2)", 1),
    ("\\boxed{10\\%}", "10", 1),
    ("\\boxed{90^\\circ}", "90", 1),
    ("\\boxed{\\$18.90}", "18.90", 1),
    ("\\boxed{x=3}", "3", 1),
    ("The answer is 7", "7", 0),
    ("\\fbox{5}", "5", 0),
    ("\\boxed{3}", "4", 0),
]
MATH_ANSWERS = [
    ("We have $x^2-5x+6=(x-2)(x-3)$, so the roots are $2$ and $3$. Their sum is $\\boxed{5}$.", "5", 1),
    ("We have $x^2-5x+6=(x-2)(x-3)$, so the roots are $2$ and $3$. Their sum is $\\boxed{5}$.", "6", 0),
    ("The probability is $\\boxed{\\dfrac{5}{36}}$.", "\\frac{5}{36}", 1),
    ("The area is $\\boxed{12\\pi}$ square units.", "12\\pi", 1),
    ("So $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt3}{2}", 1),
    ("The solution set is $\\boxed{[-2, 5)}$.", "[-2,5)", 1),
    ("The solution set is $\\boxed{(-\\infty, 3)}$.", "(-\\infty,3]", 0),
    ("Final Answer: The final answer is $12$. I hope it is correct.", "12", 1),
    ("Final Answer: The final answer is $\\$ 1,\\!000$. I hope it is correct.", "1000", 1),
    ("So $x = \\boxed{-\\frac{1}{3}}$.", "-\\frac13", 1),
    ("Therefore the answer is $\\boxed{\\text{(C)}}$.", "\\text{(C)}", 1),
    ("Squaring ten times gives $\\boxed{2^{10}}$.", "1024", 1),
    ("Rationalising, $\\boxed{\\sqrt{2}/2}$.", "\\frac{\\sqrt{2}}{2}", 1),
    ("Approximately $\\boxed{3.14}$.", "\\pi", 0),
    ("The set is $\\boxed{\\{1, 2, 3\\}}$.", "\\{3,2,1\\}", 1),
    ("First $\\boxed{5}$, wait, actually $\\boxed{6}$.", "5", 0),
    ("The line is $\\boxed{y = 2x + 1}$.", "2x+1", 1),
    ("The answer is $\\frac{7}{2}$", "3.5", 1),
    ("Thus $\\boxed{5!}$ arrangements.", "120", 1),
    ("So $x = \\boxed{\\pm 2021}$.", "2021", 0),
    ("Hence $\\boxed{2021}$.", "\\pm 2021", 0),
    ("It is \\boxed 7$ apples.", "7", 1),
]


@pytest.mark.parametrize(("response", "ground_truth", "expected"), MATH_VECTORS + MATH_ANSWERS)
def test_math_verdicts(response, ground_truth, expected):
    assert score("MATH", response, ground_truth) == expected


# Hedged answers: math-verify (and, for some, the reference's Hendrycks prefix/unit rules) accept the gold
# among several answers. Each is checked to pass the lenient comparison, so that the refusal is what fails it.
HEDGED = [
    ("\\boxed{7 = 5}", "5"),
    ("\\boxed{7 = 5 = 3}", "3"),
    ("\\boxed{7 \\text{ or } 5}", "7"),
    ("\\boxed{7 \\approx 5}", "7"),
    ("\\boxed{x=7 \\\\ y=5}", "5"),
    ("\\boxed{7 \\equiv 5}", "5"),
    ("\\boxed{f(x) = 5}", "5"),
    ("\\boxed{x = 7 = 5}", "5"),
]
LEGIT = [
    ("\\boxed{x=3}", "3"),
    ("\\boxed{k = 3}", "3"),
    ("\\boxed{x = \\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{(1,2)}", "(1, 2)"),
    ("\\boxed{[1, 2)}", "[1,2)"),
    ("\\boxed{x \\in (1, 2)}", "(1,2)"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{x^2+y^2=1}", "x^2 + y^2 = 1"),  # the ground truth's own left side
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("\\boxed{\\text{Monday or Tuesday}}", "\\text{Monday or Tuesday}"),  # the ground truth's own "or"
    ("\\boxed{\\int_0^1 x\\,dx}", "\\frac{1}{2}"),  # `\\in` of `\\int` is no relation
]


@pytest.mark.parametrize(("response", "ground_truth"), HEDGED)
def test_hedged_answers_score_zero(response, ground_truth):
    (candidate,) = math_candidates(response)
    assert hendrycks_is_equiv(candidate, ground_truth) or symbolic_equiv(candidate, ground_truth)
    assert ambiguity_reason(candidate, ground_truth) is not None
    assert score("MATH", response, ground_truth) == 0


@pytest.mark.parametrize(("response", "ground_truth"), LEGIT)
def test_single_answers_still_pass(response, ground_truth):
    (candidate,) = math_candidates(response)
    assert ambiguity_reason(candidate, ground_truth) is None
    assert score("MATH", response, ground_truth) == 1


def test_a_box_inside_a_box_is_refused():
    # The last box is the inner `\\boxed{5}` (as in the reference), but it sits inside a box holding two answers.
    assert math_candidates("\\boxed{\\boxed{7}\\boxed{5}}") == ["5"]
    assert score("MATH", "\\boxed{\\boxed{7}\\boxed{5}}", "5") == 0
    assert score("MATH", "\\boxed{\\boxed{7}} \\boxed{5}", "5") == 1  # boxes one after another: the last counts
    assert score("MATH", "\\boxed{ok} then {\\boxed{5}}", "5") == 1  # braces that are no box do not nest it
    assert score("MATH", "\\boxed 7 \\boxed{5}$", "5") == 0  # `\\boxed ` takes "7 \\boxed{5}": two answers


def test_math_candidates_follow_the_reference_order():
    # (a) and (b) both found; (c) and (d) not tried
    text = "so $\\boxed{3}$\nFinal Answer: The final answer is $4$. I hope it is correct."
    assert math_candidates(text) == ["3", "4"]
    assert math_candidates("the sum is $x=5$ and $7$") == ["7"]  # (c): between the last two $
    assert math_candidates("The answer is 7") == ["Theansweris7"]  # (d): the normalised whole text
    assert last_boxed_content("\\boxed{a{b}c} then \\boxed{d") is None  # the last box never closes
    assert last_boxed_content("\\fbox{5}") is None
    assert last_boxed_content("\\boxed{1} \\boxed 2$ x") == "2"  # a `\boxed ` anywhere wins


def test_verify_takes_gold_first():
    """math-verify's `verify(gold, pred)` is not symmetric: a gold interval condition accepts the interval,
    a gold interval rejects the condition. symbolic_equiv(candidate, ground_truth) passes gold first."""
    from math_verify import LatexExtractionConfig, parse
    from math_verify import verify as mv_verify

    def p(s):
        return parse(f"${s}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)

    assert mv_verify(p("1<x<2"), p("(1,2)"), timeout_seconds=None)
    assert not mv_verify(p("(1,2)"), p("1<x<2"), timeout_seconds=None)
    assert symbolic_equiv("(1,2)", "1<x<2")
    assert not symbolic_equiv("1<x<2", "(1,2)")


@pytest.mark.parametrize(
    ("raw", "stripped"),
    [
        ("\\left( 3, 4 \\right)", "(3,4)"),
        ("90^{\\circ}", "90"),
        ("\\$5", "5"),
        ("50\\%", "50"),
        ("k = 7", "7"),
        ("abc=7", "abc=7"),  # more than 2 characters before `=`: kept
        ("\\tfrac12", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\frac1{22}", "\\frac{1}{22}"),
        ("3/4", "\\frac{3}{4}"),
        ("x/4", "x/4"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        (".25", "0.25"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("5 \\text{ cm}", "5"),
        ("", ""),
    ],
)
def test_strip_string(raw, stripped):
    assert strip_string(raw) == stripped


def test_hendrycks_falls_back_to_raw_equality():
    with pytest.raises(ValueError):
        strip_string("1 \\text{ cm} + 2 \\text{ m}")
    assert hendrycks_is_equiv("1 \\text{ cm} + 2 \\text{ m}", "1 \\text{ cm} + 2 \\text{ m}")
    assert not hendrycks_is_equiv("2\\sqrt", "2")


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("x = 5", "5"),
        ("$\\$ 1,\\!000$", "1000"),
        ("10 \\text{ dollars}", "10"),
        ("\\textbf{(B)}", "(B)"),
        ("\\boxed{7}", "7"),
        ("\\fracab", "\\frac{a}{b}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("1,000,000", "1000000"),
        ("45^\\circ", "45"),
        ("a $3$ and $4$", "3"),
    ],
)
def test_normalize_final_answer(raw, normalized):
    assert normalize_final_answer(raw) == normalized


def _random_text(rng: random.Random, tokens: list[str], n: int) -> str:
    return "".join(rng.choice(tokens) for _ in range(rng.randint(0, n)))


def test_minerva_search_equals_the_reference_regex():
    """The two-find search equals the reference's lazy regex on the text plus "I hope it is correct."."""
    reference = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")
    tokens = ["Final Answer: The final answer is", " I hope it is correct", ".", " ", "\n", "5", "$x$", "I hope"]
    rng = random.Random(1)
    for _ in range(3000):
        text = _random_text(rng, tokens, 8)
        m = reference.search(text + "I hope it is correct.")
        assert minerva_answer(text) == (m.group(1).strip() if m else None), repr(text)


def test_math_span_equals_the_reference_regex():
    """normalize_final_answer keeps the first `$...$` of each line as the reference's
    `(.*?)(\\$)(.*?)(\\$)(.*)` -> `$\\3$` does (then drops the `$`)."""
    rng = random.Random(2)
    tokens = ["$", "x", "1", "\n", "y"]  # nothing that the other normalisation steps touch
    for _ in range(3000):
        text = _random_text(rng, tokens, 12)
        expected = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", text).replace("$", "")
        assert normalize_final_answer(text) == expected, repr(text)


@pytest.mark.parametrize(
    "candidate", ["5", "2^{10}", "5!", "n!", "\\frac{1}{2}", "x^2+2x+1", "e^{i\\pi}", "9999!", "(x+1)^{2}", "10^{18}"]
)
def test_guard_lets_ordinary_answers_through(candidate):
    assert refusal_reason(candidate) is None


@pytest.mark.parametrize(
    "candidate",
    [
        "9^{9^{9^{9}}}",
        "2^3^4",
        "100!!!!",
        "(10^{9})!",
        "99999!",
        "2^{10000000000}",
        "1" * 101,
        "{" * 40 + "1" + "}" * 40,
        "x" * 1001,
    ],
)
def test_guard_refuses_costly_candidates(candidate):
    assert refusal_reason(candidate) is not None


MEGABYTE = 1 << 20


def hostile_inputs(tmp_path):
    """(a path that must never be created, responses built to hang, blow up or exploit a verifier)."""
    pwned = tmp_path / "pwned"
    deep = "{" * 5000 + "5" + "}" * 5000
    return pwned, [
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{100!!!!}",
        "$\\boxed{(10^{9})!}$",
        "\\boxed{2^{2^{30}}}",
        "\\boxed" + deep,
        deep,
        "\\boxed{5\x00}",
        "\x00" * 100,
        "\\boxed{\ud800}",
        "\ud800\udfff $\ud800$",
        f"\\boxed{{__import__('os').system('touch {pwned}')}}",
        f"$__import__('os').system('touch {pwned}')$",
        f"Final Answer: The final answer is __import__('os').system('touch {pwned}'). I hope it is correct.",
        "\\boxed{__import__('os').system('touch /tmp/pwned')}",
        "\\def\\a{\\a}\\a",
        "\\boxed{\\def\\a{\\a}\\a}",
        "$\\newcommand{\\x}{\\x\\x}\\x$",
        "1," * (MEGABYTE // 2),
        "\\boxed{" * (MEGABYTE // 7),
        "Final Answer: The final answer is " * (MEGABYTE // 34),
        "$" * MEGABYTE,
        "\\text{" * (MEGABYTE // 6),
        "a" * MEGABYTE,
        "$x$ " * (MEGABYTE // 4),
        "\\boxed{" + "9" * MEGABYTE + "}",
    ]


@pytest.mark.parametrize("dataset", ["gsm8k", "math"])
def testhostile_inputs_score_zero_promptly(dataset, tmp_path):
    pwned, inputs = hostile_inputs(tmp_path)
    tmp_pwned_before = os.path.exists("/tmp/pwned")
    worst = 0.0
    for response in inputs:
        start = time.perf_counter()
        verdict = verify(dataset, PROMPT + response, "7")
        worst = max(worst, time.perf_counter() - start)
        assert verdict.score == 0.0, response[:80]
        assert time.perf_counter() - start < PROMPT_BOUND_S, response[:80]
    assert not pwned.exists()
    assert tmp_pwned_before or not os.path.exists("/tmp/pwned")
    print(f"{dataset}: {len(inputs)} hostile inputs, worst {worst:.3f} s")


def test_sympy_parse_expr_is_never_called(monkeypatch):
    """math-verify's plain-expression extraction runs sympy's parse_expr (an eval); only its LaTeX
    extraction may run."""
    import math_verify.parser

    calls = []  # math-verify swallows exceptions, so record the calls rather than raise
    monkeypatch.setattr(math_verify.parser, "parse_expr", lambda *args, **kwargs: calls.append(args))
    assert verify_math("so $\\boxed{3/6 + 0}$", "0.5")  # plain-text fractions still parse, as LaTeX
    assert not verify_math("x = 1/3 + y**2 and __import__('os')", "7/9")
    assert calls == []
    # the recorder does catch math-verify's expression extraction (so the assertion above can fail)
    math_verify.parse("1/3 + y**2", extraction_config=[math_verify.ExprExtractionConfig()], parsing_timeout=None)
    assert calls


def test_refused_answers_fail_even_against_themselves():
    for answer in ["9^{9^{9^{9}}}", "100!!!!", "{" * 5000 + "5" + "}" * 5000]:
        assert not verify_math(f"\\boxed{{{answer}}}", answer)


def test_check_ground_truth_needs_a_reference_answer():
    for dataset in ("gsm8k", "MATH"):
        for empty in ("", " \n\t"):
            with pytest.raises(ValueError, match="non-empty string"):
                check_ground_truth(dataset, empty)
        with pytest.raises(ValueError, match="must be a string, got list"):
            check_ground_truth(dataset, ["18"])
    for _, ground_truth, _ in GSM8K_VECTORS + GSM8K_ANSWERS:
        assert check_ground_truth("gsm8k", ground_truth) is None
    for _, ground_truth, _ in MATH_VECTORS:
        assert check_ground_truth("math", ground_truth) is None


@pytest.mark.parametrize("ground_truth", ["18 apples", "$18", "1,2,3", "18 #### ", "1e3", "- 5"])
def test_gsm8k_ground_truth_that_can_never_match_is_refused(ground_truth):
    # No response can make its last number equal these: every row would silently score 0.
    rng = random.Random(1)
    responses = [ground_truth, f"The answer is {ground_truth}"] + [str(rng.randint(-999, 999)) for _ in range(50)]
    assert not any(score("gsm8k", r, ground_truth) for r in responses)
    with pytest.raises(ValueError, match="is not a number the GSM8K rule can match"):
        check_ground_truth("gsm8k", ground_truth)


def test_gsm8k_word_ground_truth_is_refused():
    # A word only equals a whole response without any digit (the reference's no-number fallback): not a
    # GSM8K answer.
    assert score("gsm8k", "eighteen", "eighteen") == 1
    assert score("gsm8k", "It is eighteen", "eighteen") == 0
    with pytest.raises(ValueError, match="'eighteen' is not a number"):
        check_ground_truth("gsm8k", "eighteen")


@pytest.mark.parametrize(
    ("ground_truth", "number"), [(" 18", "18"), ("1,200", "1200"), ("x #### -7 ", "-7"), ("+.5", "+.5")]
)
def test_gsm8k_ground_truth_is_normalised_before_comparing(ground_truth, number):
    assert check_ground_truth("gsm8k", ground_truth) is None
    assert gsm8k_ground_truth(ground_truth) == number
    assert score("gsm8k", f"so it is {number}", ground_truth) == 1
