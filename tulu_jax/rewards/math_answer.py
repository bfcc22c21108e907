"""MATH verifier ("flex"): candidate answers are pulled out of a response and each is compared with the raw
ground truth, symbolically (math-verify) and as Hendrycks-normalised strings (open-instruct
`ground_truth_utils.py` `verify_math_sample`, `math_utils.py`; Tülu 3 §6).

Candidates, in the reference's order:
  (a) the content of the last `\\boxed{...}` (brace matched); `\\boxed x` (a space) takes the text after the
      last `\\boxed ` up to the next `$`; `\\fbox{...}` is found by the reference but rejected;
  (b) X of Minerva's `Final Answer: The final answer is X. I hope it is correct.`, through
      `normalize_final_answer`;
  (c) only when (a) and (b) found nothing: the normalised text between the last two `$`;
  (d) otherwise the normalised whole answer.
A candidate passes when `hendrycks_is_equiv` or `symbolic_equiv` holds against the raw ground truth.

Everything that scans the whole response is linear in its length (1 MB responses stay fast). Candidates
that could make sympy compute for minutes (towers of powers, factorials of big or non-literal operands,
long digit runs, deep braces, long text) are refused: they score False without being parsed
(`refusal_reason`). What the guard misses is the job of the Scorer's hard deadline.
"""

import logging
import re
from functools import lru_cache

MAX_CANDIDATE_CHARS = 1000
MAX_BRACE_DEPTH = 32
MAX_DIGIT_RUN = 100
MAX_EXPONENT_DIGITS = 5  # 2^{99999} has 30k digits (fast); 2^{2^{30}} took 12 s in math-verify
MAX_FACTORIAL_DIGITS = 4  # 9999! is fast; (10^9)! never ends

# math-verify warns once that its own (SIGALRM) timeout is off: that is on purpose, see `symbolic_equiv`.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# ---------------------------------------------------------------------------------------------- candidates


def last_boxed_content(text: str) -> str | None:
    """The content of the last `\\boxed{...}` of `text` (braces matched), None when there is none, it
    never closes, or the last box is `\\fbox` (rejected, as in the reference). When `text` contains
    `\\boxed ` (with a space), the text after its last occurrence up to the next `$` is returned instead."""
    if "\\boxed " in text:
        return text.rpartition("\\boxed ")[2].partition("$")[0]
    start = text.rfind("\\boxed")
    if start < 0 or not text.startswith("\\boxed{", start):
        return None
    open_at = start + len("\\boxed")
    depth = 0
    for m in _BRACE.finditer(text, open_at):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[open_at + 1 : m.start()]
    return None


_BRACE = re.compile(r"[{}]")

_MINERVA_START = "Final Answer: The final answer is"
_MINERVA_END = " I hope it is correct"


def minerva_answer(text: str) -> str | None:
    """X of the first `Final Answer: The final answer is X. I hope it is correct.` in `text` (stripped),
    or None. Same matches as the reference's regex `Final Answer: The final answer is(.*?). I hope it is
    correct.` on `text + "I hope it is correct."` (lazy, within one line, `.` any character), found with
    two `str.find` per candidate line so that it stays linear."""
    text = text + "I hope it is correct."
    pos = text.find(_MINERVA_START)
    while pos >= 0:
        body = pos + len(_MINERVA_START)
        line_end = text.find("\n", body)
        line_end = len(text) if line_end < 0 else line_end
        # X may be empty; one any-character sits between X and " I hope", another after "correct".
        end = text.find(_MINERVA_END, body + 1, line_end)
        if end >= 0 and end + len(_MINERVA_END) < line_end:
            return text[body : end - 1].strip()
        # No end on this line: a later start on the same line cannot find one either.
        pos = text.find(_MINERVA_START, line_end)
    return None


# Minerva's normalisation (Lewkowycz et al. 2022, appendix D; open-instruct `math_utils.py`).
_SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"',
    "\\dots",
)  # fmt: skip
_UNWRAP = tuple(re.compile(rf"\\{name}\{{(.*?)\}}") for name in ("text", "textbf", "overline"))
_UNWRAP_BOXED = re.compile(r"\\boxed\{(.*)\}")
_SHORT_FRAC = re.compile(r"frac([^{])(.)")
_SHORT_SQRT = re.compile(r"sqrt([^{])")


def _first_math_span(line: str) -> str:
    # The reference's `(.*?)(\$)(.*?)(\$)(.*)` -> `$\3$`, applied line by line (`.` stops at newlines).
    first = line.find("$")
    second = line.find("$", first + 1) if first >= 0 else -1
    return line if second < 0 else "$" + line[first + 1 : second] + "$"


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer: the text after the last `=`, fixed substitutions, units
    and filler words removed, the first `$...$` of each line kept, `\\text{}`, `\\textbf{}`, `\\overline{}`
    and `\\boxed{}` unwrapped, `\\fracab` -> `\\frac{a}{b}`, `\\sqrta` -> `\\sqrt{a}`, `$` dropped, and commas
    dropped from a number made only of digits and commas. Callers bound the length first (some steps are
    quadratic in the worst case)."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    answer = "\n".join(_first_math_span(line) for line in answer.split("\n"))
    for pattern in _UNWRAP:
        answer = pattern.sub(r"\1", answer)
    answer = _UNWRAP_BOXED.sub(r"\1", answer)
    answer = _SHORT_FRAC.sub(r"frac{\1}{\2}", answer)
    answer = _SHORT_SQRT.sub(r"sqrt{\1}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def _normalized(raw: str) -> str | None:
    return None if len(raw) > MAX_CANDIDATE_CHARS else normalize_final_answer(raw)


def math_candidates(answer: str) -> list[str | None]:
    """The candidate answers (a)-(d) of the module docstring, in order. An entry is None where the
    candidate exists but was too long to normalise (it can never pass)."""
    found: list[str | None] = []
    boxed = last_boxed_content(answer)
    if boxed is not None:
        found.append(boxed)
    minerva = minerva_answer(answer)
    if minerva is not None:
        found.append(_normalized(minerva))
    if not found:
        last = answer.rfind("$")
        before = answer.rfind("$", 0, last) if last > 0 else -1
        if before >= 0:
            found.append(_normalized(answer[before + 1 : last]))
    if not found:
        found.append(_normalized(answer))
    return found


# ------------------------------------------------------------------------------------ Hendrycks strings


class _StripError(ValueError):
    """strip_string cannot normalise this string (the reference's failed assertions)."""


def _fix_fracs(s: str) -> str:
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        out.append("\\frac")
        if part.startswith("{"):
            out.append(part)
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    head, *rest = s.split("\\sqrt")
    out = [head]
    for part in rest:
        if not part:
            raise _StripError("\\sqrt without an argument")
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def strip_string(s: str) -> str:
    """Hendrycks et al. 2021 (MATH) answer normalisation: drops `\\left`/`\\right`, `^\\circ`, `\\$`, `\\%`,
    a trailing `\\text{ unit}`, spaces and a short `k=` prefix (at most 2 characters before the only `=`);
    `tfrac`/`dfrac` -> `frac`, `\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`, `a/b` of two integers ->
    `\\frac{a}{b}`, `.5` -> `0.5`, `0.5` -> `\\frac{1}{2}`. Raises ValueError where the reference's
    assertions fail (two `\\text{ ` units, a bare `\\sqrt` at the end)."""
    for before, after in (
        ("\n", ""),
        ("\\!", ""),
        ("\\\\", "\\"),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
    ):
        s = s.replace(before, after)
    if "\\text{ " in s:  # a unit on the right: "5 \text{ cm}" -> "5 "
        head, *units = s.split("\\text{ ")
        if len(units) != 1:
            raise _StripError("more than one \\text{ unit")
        s = head
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs) <= 2:
        s = rhs
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def hendrycks_is_equiv(candidate: str, ground_truth: str) -> bool:
    """True iff both strings are equal after `strip_string`; raw equality where strip_string fails."""
    try:
        return strip_string(candidate) == strip_string(ground_truth)
    except ValueError:
        return candidate == ground_truth


# ------------------------------------------------------------------------------------------- the guard

_DIGITS = re.compile(r"\d+")
_FACTORIAL = re.compile(r"(\d*)\s*!")
_CARET = re.compile(r"\^\s*")
_LETTER_FACTORIAL = re.compile(r"(?<![A-Za-z\\])[A-Za-z]\s*!")


def _braced_group(s: str, open_at: int) -> str | None:
    depth = 0
    for i in range(open_at, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return s[open_at + 1 : i]
    return None


def _power_refusal(s: str) -> str | None:
    for m in _CARET.finditer(s):
        at = m.end()
        if at < len(s) and s[at] == "{":
            exponent = _braced_group(s, at)
            if exponent is None:
                return "unclosed exponent"
            after = at + len(exponent) + 2
        else:
            digits = _DIGITS.match(s, at)
            exponent = digits.group() if digits else s[at : at + 1]
            after = at + len(exponent)
        if "^" in exponent or s[after : after + 1] == "^":
            return "tower of powers"
        if len(max(_DIGITS.findall(exponent), key=len, default="")) > MAX_EXPONENT_DIGITS:
            return "huge exponent"
    return None


def refusal_reason(candidate: str) -> str | None:
    """Why `candidate` must not reach sympy (None: it may). Refused: over MAX_CANDIDATE_CHARS characters,
    braces nested deeper than MAX_BRACE_DEPTH, a digit run over MAX_DIGIT_RUN digits, a power inside an
    exponent (`9^{9^9}`, `2^3^4`), an exponent with over MAX_EXPONENT_DIGITS digits, and a factorial that is
    not of a letter or of an integer literal of at most MAX_FACTORIAL_DIGITS digits (`100!!`, `(10^9)!`,
    `(n+1)!` too: sympy may evaluate it). Linear in the length of the candidate (the length is checked
    first)."""
    if len(candidate) > MAX_CANDIDATE_CHARS:
        return "too long"
    depth = deepest = 0
    for ch in candidate:
        if ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}":
            depth -= 1
    if deepest > MAX_BRACE_DEPTH:
        return "braces nested too deep"
    if len(max(_DIGITS.findall(candidate), key=len, default="")) > MAX_DIGIT_RUN:
        return "too many digits"
    if "!" in candidate:
        ok = sum(1 for m in _FACTORIAL.finditer(candidate) if 0 < len(m.group(1)) <= MAX_FACTORIAL_DIGITS)
        ok += len(_LETTER_FACTORIAL.findall(candidate))
        if ok < candidate.count("!"):
            return "factorial of a big or computed operand"
    return _power_refusal(candidate)


# ------------------------------------------------------------------------------ ambiguous answers

# math-verify reads `7 = 5`, `x=7 \\ y=5`, `7 \approx 5` or `7 \text{ or } 5` as several answers and accepts
# the gold among them, and Hendrycks' short-prefix and unit rules strip `7 = ` and ` \text{ or } 5`: a policy
# would learn to hedge. A candidate may not use these constructs unless the ground truth does.
_EQUALITY = re.compile(r"=|\\equiv(?![A-Za-z])|\\in(?![A-Za-z])")
_SHORT_NAME = re.compile(r"[A-Za-z]{1,2}")
_HEDGES = (
    (re.compile(r"\\text\{\s*or\s*\}|\bor\b", re.IGNORECASE), "an 'or' between answers"),
    (re.compile(r"\\(?:approx|simeq)(?![A-Za-z])"), "an approximate relation"),
    (re.compile(r"\\boxed"), "a nested \\boxed"),
    (re.compile(r"\\\\"), "a \\\\ line break"),
)


def _without_spaces(s: str) -> str:
    return "".join(s.split())


def ambiguity_reason(candidate: str, ground_truth: str) -> str | None:
    """Why `candidate` is not one answer that `ground_truth` can be compared with (None: it is). Refused,
    unless `ground_truth` has the same construct: an `or`, `\\approx`/`\\simeq`, a `\\boxed`, a `\\\\` line
    break; more equalities (`=`, `\\equiv`, `\\in`) than the ground truth (at least one is allowed); and an
    equality whose left side is neither a short variable name (1-2 letters: `x = 3`, `k=5`, as Hendrycks'
    prefix rule intends) nor the ground truth's left side (`x^2+y^2=1`). Stricter than math-verify, which
    picks either side of `7 = 5`, and than open-instruct `math_utils.py` `strip_string`, whose short-prefix
    rule strips `7 = ` and whose unit rule strips ` \\text{ or } 5`."""
    for pattern, what in _HEDGES:
        if pattern.search(candidate) and not pattern.search(ground_truth):
            return what
    sides = _EQUALITY.split(candidate)
    gold_sides = _EQUALITY.split(ground_truth)
    if len(sides) > max(2, len(gold_sides)):
        return "more equalities than the ground truth"
    if len(sides) == 2 and not _SHORT_NAME.fullmatch(sides[0].strip()):
        if len(gold_sides) != 2 or _without_spaces(sides[0]) != _without_spaces(gold_sides[0]):
            return "an equality whose left side is not a variable name"
    return None


def _last_box_is_nested(answer: str) -> bool:
    # True when the last `\boxed{` opens inside an earlier, still open `\boxed{...}`: `\boxed{\boxed{7}\boxed{5}}`.
    last = answer.rfind("\\boxed{")
    if last < 0:
        return False
    open_boxes: list[int] = []  # brace depth at which each open box started
    depth = 0
    for m in _BOX_OR_BRACE.finditer(answer, 0, last):
        if m.group() == "}":
            depth -= 1
            if open_boxes and depth == open_boxes[-1]:
                open_boxes.pop()
        else:
            if m.group() != "{":
                open_boxes.append(depth)
            depth += 1
    return bool(open_boxes)


_BOX_OR_BRACE = re.compile(r"\\boxed\{|[{}]")


# ---------------------------------------------------------------------------------- symbolic equivalence


@lru_cache(maxsize=256)
def _parse(latex: str) -> tuple:
    from math_verify import LatexExtractionConfig, parse

    # LaTeX extraction only: math-verify's plain-expression extraction runs sympy's parse_expr (eval).
    # Its SIGALRM timeout is off (it cannot interrupt sympy's C-level work and fails in threads): the
    # Scorer's worker processes enforce the deadline.
    return tuple(parse(f"${latex}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None))


_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{6,}")


def looks_like_prose(candidate: str) -> bool:
    """True when `candidate`, LaTeX commands removed, holds a run of 6 or more letters: a sentence (path
    (d) of a response without box or `$`) or a word answer. Sympy would read it as a product of one-letter
    symbols, which costs up to seconds and cannot equal a formula; such candidates are compared as
    strings only."""
    return _WORD.search(_COMMAND.sub(" ", candidate)) is not None


def symbolic_equiv(candidate: str, ground_truth: str) -> bool:
    """True iff math-verify finds `candidate` equal to `ground_truth`, both parsed as LaTeX and compared by
    `verify(gold, pred)` (gold first: the comparison is not symmetric; e.g. gold `1<x<2` accepts `(1,2)`
    but gold `(1,2)` rejects `1<x<2`). False for refused strings (`refusal_reason`) and unparsable ones.
    May take long on expressions the guard lets through (`(x+y+z)^{999}`): run it under a deadline."""
    if refusal_reason(candidate) or refusal_reason(ground_truth) or looks_like_prose(candidate):
        return False
    from math_verify import verify

    gold, pred = _parse(ground_truth), _parse(candidate)
    if not gold or not pred:
        return False
    return bool(verify(list(gold), list(pred), timeout_seconds=None))


def verify_math(answer: str, ground_truth: str) -> bool:
    """True iff one candidate of `answer` (see `math_candidates`) is equivalent to the raw `ground_truth`
    (`hendrycks_is_equiv` or `symbolic_equiv`); refused candidates never pass (`refusal_reason`,
    `ambiguity_reason`, a last `\\boxed` inside another), nor do `\\fbox` ones (the reference rejects them;
    math-verify would unwrap them like `\\boxed`)."""
    candidates = math_candidates(answer)
    if candidates[0] is not None and last_boxed_content(answer) is not None and _last_box_is_nested(answer):
        candidates[0] = None  # a box inside a box is two answers, not one
    for candidate in candidates:
        if candidate is None or refusal_reason(candidate) or "\\fbox" in candidate:
            continue
        if ambiguity_reason(candidate, ground_truth):
            continue
        if hendrycks_is_equiv(candidate, ground_truth) or symbolic_equiv(candidate, ground_truth):
            return True
    return False
