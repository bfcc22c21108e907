"""Tülu 3 instruction-following (IFEval-style) verifiers for RLVR rewards.

Tülu 3 §6 (RLVR) rewards a completion of an IFEval-style prompt with 1 when it satisfies the prompt's single
verifiable constraint. The constraint arrives as a JSON ground truth ``{"func_name": ..., **kwargs}`` (keys with
``null`` values are ignored) naming one of 25 checks; the reference implementation is open-instruct's
``open_instruct/if_functions.py`` called from ``open_instruct/ground_truth_utils.py``. This module reimplements the
25 checks. By default it applies the fixes open-instruct made after the Tülu 3 release (its current code); the
``legacy`` set selects, per function, the behaviour of the code the Tülu 3 models were trained with (2024). Five
functions differ: placeholders (2024 passed everything), choice (2024 tested the reverse containment), sentence
counting (2024 ignored ``!``), capital-word "around" (2024 meant exactly N) and sections (2024 split on the bare
splitter and wanted exactly N pieces). ``DIFFERENCES_TABLE`` (markdown) and ``LEGACY_DIFFERENCES`` spell them out.

Every "around" rule compares the absolute difference abs(count - N) with its tolerance (symmetric). Language
detection uses langdetect with ``DetectorFactory.seed = 0`` so verdicts are reproducible across calls and
processes; text langdetect cannot classify (no letters) fails the language check, and JSON nested too deeply for
``json.loads`` fails the JSON check (2024 raised on both). Placeholders, titles and highlights are counted by linear
scans giving the regexes' counts (the lazy regexes are quadratic on lines of many ``[`` or ``<<``).

Errors: a malformed ground truth (not JSON, unknown ``func_name``, missing/unknown/mistyped kwargs) raises
``ValueError``; the model's answer never raises, whatever it contains.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from typing import Any

import langdetect
from langdetect.detector_factory import DetectorFactory

# langdetect draws random n-gram samples; a fixed seed makes every detector (created per call) deterministic.
DetectorFactory.seed = 0

_QUANTIFIERS = ("at least", "around", "at most")


def detect_language(text: str) -> str | None:
    """langdetect's language code for ``text`` (e.g. "en", "zh-cn"), seeded; None when it cannot tell.

    langdetect reads at most its first 10,000 characters. Source: open-instruct ``if_functions.py``
    (``validate_response_language``), which calls ``langdetect.detect`` unseeded.
    """
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


def _meets(count: int, N: int, quantifier: str, around_tolerance: int) -> bool:
    """Whether ``count`` satisfies "at least"/"at most"/"around" N; "around" is |count - N| <= tolerance."""
    if quantifier == "at least":
        return count >= N
    if quantifier == "at most":
        return count <= N
    return abs(count - N) <= around_tolerance


def _ten_percent(N: int) -> int:
    # open-instruct's tolerance: Python's round (half to even) of 0.1 N, at least 1.
    return max(round(N * 0.1), 1)


def count_bracket_pairs(text: str, opening: str, closing: str) -> int:
    """Non-overlapping ``opening ... closing`` pairs on single lines (what ``re.findall(r"<o>(.*?)<c>")`` counts).

    A plain scan instead of the regex: the lazy regex rescans to the end of the line from every unmatched
    opening, which is quadratic on adversarial lines such as a megabyte of ``[``.
    """
    count = 0
    for line in text.split("\n"):
        start = line.find(opening)
        while start >= 0:
            end = line.find(closing, start + len(opening))
            if end < 0:
                break  # no closing after this opening, so none after any later opening either
            count += 1
            start = line.find(opening, end + len(closing))
    return count


# --- the 25 checks (ours). Each takes the answer text and the ground truth's kwargs and returns a bool. ---


def verify_keywords(text: str, *, keyword_list: list[str]) -> bool:
    """Every keyword occurs in the text as a case-insensitive substring."""
    lowered = text.lower()
    return all(keyword.lower() in lowered for keyword in keyword_list)


def verify_keyword_frequency(text: str, *, word: str, N: int) -> bool:
    """The word occurs exactly N times among the lowercased ``\\b\\w+\\b`` tokens."""
    target = word.lower()
    return sum(1 for token in re.findall(r"\b\w+\b", text.lower()) if token == target) == N


def validate_forbidden_words(text: str, *, forbidden_words: list[str]) -> bool:
    """None of the words occurs as a case-insensitive substring."""
    lowered = text.lower()
    return not any(word.lower() in lowered for word in forbidden_words)


def verify_letter_frequency(text: str, *, letter: str, N: int) -> bool:
    """The (case-sensitive) letter occurs exactly N times."""
    return text.count(letter) == N


def validate_response_language(text: str, *, language: str) -> bool:
    """langdetect (seeded) classifies the text as ``language``; unclassifiable text fails."""
    return detect_language(text) == language


def verify_paragraph_count(text: str, *, N: int) -> bool:
    """Exactly N non-empty paragraphs separated by ``* * *`` (after stripping every line)."""
    cleaned = "\n".join(line.strip() for line in text.splitlines()).strip()
    paragraphs = cleaned.split("* * *")
    return all(p.strip() for p in paragraphs) and len(paragraphs) == N


def validate_word_constraint(text: str, *, N: int, quantifier: str) -> bool:
    """Whitespace-separated word count is at least / at most / around (±max(round(0.1 N), 1)) N."""
    return _meets(len(text.split()), N, quantifier, _ten_percent(N))


# A sentence ends at whitespace right after a terminator, unless the text before looks like an abbreviation:
# "x.y." (e.g. "e.g. ", "i.e. ") or a capitalised two-letter one ("Mr. ", "Dr. ").
_NOT_AFTER_ABBREVIATION = r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)"
_SENTENCE_END = re.compile(_NOT_AFTER_ABBREVIATION + r"(?<=[.?!])\s")
_SENTENCE_END_2024 = re.compile(_NOT_AFTER_ABBREVIATION + r"(?<=[.?])\s")


def _sentence_constraint(text: str, N: int, quantifier: str, splitter: re.Pattern[str]) -> bool:
    return _meets(len(splitter.split(text)), N, quantifier, 1)


def verify_sentence_constraint(text: str, *, N: int, quantifier: str) -> bool:
    """Sentence count (split at whitespace after ``.``, ``?`` or ``!``) is at least / at most / around (±1) N."""
    return _sentence_constraint(text, N, quantifier, _SENTENCE_END)


def validate_paragraphs(text: str, *, N: int, first_word: str, i: int) -> bool:
    """Exactly N paragraphs split on blank lines (``\\n\\n``), the i-th (1-based) starting with ``first_word``."""
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and paragraphs[i - 1].strip().startswith(first_word)


def verify_postscript(text: str, *, postscript_marker: str) -> bool:
    """The marker occurs and is followed by some text (from its first occurrence, stripped, longer than it)."""
    at = text.find(postscript_marker)
    return at >= 0 and len(text[at:].strip()) > len(postscript_marker)


def validate_placeholders(text: str, *, N: int) -> bool:
    """At least N ``[...]`` placeholders (on single lines)."""
    return count_bracket_pairs(text, "[", "]") >= N


def verify_bullet_points(text: str, *, N: int) -> bool:
    """Exactly N lines whose stripped form starts with ``*`` or ``-``."""
    return sum(1 for line in text.split("\n") if line.strip().startswith(("*", "-"))) == N


def validate_title(text: str) -> bool:
    """Some line holds a ``<<...>>`` title (possibly empty)."""
    return count_bracket_pairs(text, "<<", ">>") > 0


def validate_choice(text: str, *, options: list[str]) -> bool:
    """Some option occurs in the text."""
    return any(option in text for option in options)


def validate_highlighted_sections(text: str, *, N: int) -> bool:
    """At least N ``*...*`` highlights (on single lines; ``**`` counts as an empty one)."""
    # re.findall(r"\*(.*?)\*") pairs consecutive asterisks within a line: floor(count / 2) per line.
    return sum(line.count("*") // 2 for line in text.split("\n")) >= N


def validate_sections(text: str, *, N: int, section_splitter: str) -> bool:
    """At least N numbered section headers: the splitter (any case) followed by a number, e.g. "SECTION 2"."""
    header = re.compile(r"\s?" + re.escape(section_splitter) + r"\s?\d+\s?", flags=re.IGNORECASE)
    return sum(1 for _ in header.finditer(text)) >= N


def validate_json_format(text: str) -> bool:
    """The whole text parses as JSON (a markdown code fence around it fails)."""
    try:
        json.loads(text)
    except ValueError:  # JSONDecodeError, and UnicodeError subclasses
        return False
    except RecursionError:  # e.g. a megabyte of "["
        return False
    return True


def validate_repeat_prompt(text: str, *, original_prompt: str) -> bool:
    """The text starts with the prompt, verbatim."""
    return text.startswith(original_prompt)


def validate_two_responses(text: str) -> bool:
    """Exactly one ``******`` separator, and the two stripped halves differ."""
    if text.count("******") != 1:
        return False
    first, second = text.split("******")
    return first.strip() != second.strip()


def validate_uppercase(text: str) -> bool:
    """Uppercasing leaves the text unchanged."""
    return text == text.upper()


def validate_lowercase(text: str) -> bool:
    """Lowercasing leaves the text unchanged."""
    return text == text.lower()


def _capital_words(text: str) -> int:
    return len(re.findall(r"\b[A-Z]+\b", text))


def validate_frequency_capital_words(text: str, *, N: int, quantifier: str) -> bool:
    """All-capital words (``\\b[A-Z]+\\b``) number at least / at most / around (±max(round(0.1 N), 1)) N."""
    return _meets(_capital_words(text), N, quantifier, _ten_percent(N))


def validate_end(text: str, *, end_phrase: str) -> bool:
    """The text ends with the phrase, verbatim."""
    return text.endswith(end_phrase)


def validate_quotation(text: str) -> bool:
    """The text starts and ends with ``"`` (a lone ``"`` counts, as in open-instruct)."""
    return text.startswith('"') and text.endswith('"')


def validate_no_commas(text: str) -> bool:
    """No ``,`` anywhere."""
    return "," not in text


IF_FUNCTIONS: dict[str, Callable[..., bool]] = {
    f.__name__: f
    for f in (
        verify_keywords,
        verify_keyword_frequency,
        validate_forbidden_words,
        verify_letter_frequency,
        validate_response_language,
        verify_paragraph_count,
        validate_word_constraint,
        verify_sentence_constraint,
        validate_paragraphs,
        verify_postscript,
        validate_placeholders,
        verify_bullet_points,
        validate_title,
        validate_choice,
        validate_highlighted_sections,
        validate_sections,
        validate_json_format,
        validate_repeat_prompt,
        validate_two_responses,
        validate_uppercase,
        validate_lowercase,
        validate_frequency_capital_words,
        validate_end,
        validate_quotation,
        validate_no_commas,
    )
}
"""The 25 checks under our semantics, keyed by the ground truth's ``func_name``: ``f(text, **kwargs) -> bool``."""


# --- the 2024 behaviour of the checks open-instruct changed since (selected through ``legacy``). ---


def _placeholders_2024(text: str, *, N: int) -> bool:
    return True  # the tuple (has_enough, placeholders) it returned is always truthy


def _choice_2024(text: str, *, options: list[str]) -> bool:
    return any(text in option for option in options)


def _sentence_constraint_2024(text: str, *, N: int, quantifier: str) -> bool:
    return _sentence_constraint(text, N, quantifier, _SENTENCE_END_2024)


def _capital_words_2024(text: str, *, N: int, quantifier: str) -> bool:
    return _meets(_capital_words(text), N, quantifier, 0)


def _sections_2024(text: str, *, N: int, section_splitter: str) -> bool:
    pieces = text.split(section_splitter)
    return len(pieces) - (pieces[0] == "") == N


_LEGACY_FUNCTIONS: dict[str, Callable[..., bool]] = {
    "validate_placeholders": _placeholders_2024,
    "validate_choice": _choice_2024,
    "verify_sentence_constraint": _sentence_constraint_2024,
    "validate_frequency_capital_words": _capital_words_2024,
    "validate_sections": _sections_2024,
}

# Function -> (its 2024 behaviour, ours).
_DIFFERENCES: dict[str, tuple[str, str]] = {
    "validate_placeholders": (
        "returned a `(bool, list)` tuple, which is truthy: every response passed",
        "at least N `[...]` placeholders",
    ),
    "validate_choice": (
        "the whole response is a substring of some option (`text in option`)",
        "some option occurs in the response (`option in text`)",
    ),
    "verify_sentence_constraint": ("sentences end at `.` and `?`", "sentences end at `.`, `?` and `!`"),
    "validate_frequency_capital_words": (
        '"around" means exactly N all-capital words',
        '"around" means abs(count - N) <= max(round(0.1 N), 1), as for word counts',
    ),
    "validate_sections": (
        "split on the bare splitter (case-sensitive), drop a leading empty piece, want exactly N pieces",
        'at least N numbered headers: the splitter in any case followed by a number ("Section 2")',
    ),
}

LEGACY_DIFFERENCES: dict[str, str] = {name: f"2024: {old}; ours: {new}." for name, (old, new) in _DIFFERENCES.items()}
"""Function name -> one line on how its 2024 behaviour differs from ours (for the README)."""

DIFFERENCES_TABLE: str = "\n".join(
    ["| function | 2024 (`legacy`) | ours (default) |", "|---|---|---|"]
    + [f"| `{name}` | {old} | {new} |" for name, (old, new) in _DIFFERENCES.items()]
)
"""Markdown table of ``_DIFFERENCES`` for the README."""


# --- ground-truth parsing and kwarg validation ---


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(value: Any) -> str | None:
    return None if _is_int(value) and value >= 0 else "a non-negative integer"


def _check_str(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def _check_nonempty_str(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "a non-empty string"


def _check_letter(value: Any) -> str | None:
    return None if isinstance(value, str) and len(value) == 1 else "a single character"


def _check_nonempty_str_list(value: Any) -> str | None:
    # An empty list or an empty element makes the check vacuous: every response passes (or none does).
    ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    return None if ok else "a non-empty list of non-empty strings"


def _check_quantifier(value: Any) -> str | None:
    return None if value in _QUANTIFIERS else f"one of {list(_QUANTIFIERS)}"


def _check_index(value: Any) -> str | None:
    return None if _is_int(value) and value >= 1 else "a positive integer (1-based paragraph index)"


_KWARG_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "N": _check_count,
    "i": _check_index,
    "word": _check_nonempty_str,
    "letter": _check_letter,
    "language": _check_str,
    "quantifier": _check_quantifier,
    "first_word": _check_nonempty_str,
    "postscript_marker": _check_nonempty_str,
    "section_splitter": _check_nonempty_str,
    "original_prompt": _check_nonempty_str,
    "end_phrase": _check_nonempty_str,
    "keyword_list": _check_nonempty_str_list,
    "forbidden_words": _check_nonempty_str_list,
    "options": _check_nonempty_str_list,
}

_PARAMETERS: dict[str, frozenset[str]] = {
    name: frozenset(p for p in inspect.signature(f).parameters if p != "text") for name, f in IF_FUNCTIONS.items()
}


def _integral(value: Any) -> Any:
    # JSON written from floats ("N": 3.0) still names an exact count.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def parse_ground_truth(ground_truth: str) -> tuple[str, dict[str, Any]]:
    """Split a Tülu IFEval ground truth into ``(func_name, kwargs)``, validated; ``null`` kwargs are dropped.

    Raises ValueError (one line) when it is not a JSON object, names no/an unknown ``func_name``, or its kwargs
    are missing, unexpected or of the wrong type for that function (e.g. ``N`` not a non-negative integer,
    ``quantifier`` not "at least"/"around"/"at most", ``i`` outside 1..N).
    """
    try:
        spec = json.loads(ground_truth)
    except (TypeError, ValueError) as e:
        raise ValueError(f"IFEval ground truth is not JSON ({e}): {ground_truth!r:.200}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("func_name"), str):
        raise ValueError(f"IFEval ground truth must be a JSON object with a string func_name: {ground_truth!r:.200}")
    name = spec["func_name"]
    if name not in IF_FUNCTIONS:
        raise ValueError(f"IFEval ground truth names unknown func_name {name!r}; known: {sorted(IF_FUNCTIONS)}")
    kwargs = {k: _integral(v) for k, v in spec.items() if k != "func_name" and v is not None}
    expected = _PARAMETERS[name]
    if set(kwargs) != expected:
        missing, extra = sorted(expected - set(kwargs)), sorted(set(kwargs) - expected)
        raise ValueError(
            f"IFEval ground truth for {name} takes kwargs {sorted(expected)}: missing {missing}, unexpected {extra}"
        )
    for key, value in kwargs.items():
        problem = _KWARG_CHECKS[key](value)
        if problem is not None:
            raise ValueError(f"IFEval ground truth for {name}: {key} must be {problem}, got {value!r:.100}")
    if "i" in kwargs and kwargs["i"] > kwargs["N"]:
        raise ValueError(f"IFEval ground truth for {name}: paragraph index i={kwargs['i']} exceeds N={kwargs['N']}")
    return name, kwargs


def verify_ifeval(answer: str, ground_truth: str, legacy: frozenset[str] = frozenset()) -> bool:
    """Whether ``answer`` satisfies the constraint in ``ground_truth`` (Tülu 3 §6 IFEval reward, 1 when True).

    Args:
      answer: the response text (the part after the last ``<|assistant|>\\n``, stripped, as in open-instruct's
        ``ground_truth_utils.verify_ifeval_sample``). Any string is accepted; it never raises.
      ground_truth: JSON ``{"func_name": ..., **kwargs}`` from the RLVR IFEval data (``null`` kwargs ignored).
      legacy: function names (from ``parse_if_semantics``) checked with their 2024 behaviour.
    Raises:
      ValueError: malformed ground truth (see ``parse_ground_truth``) or an unknown name in ``legacy``.
    """
    name, kwargs = parse_ground_truth(ground_truth)
    if not legacy <= _LEGACY_FUNCTIONS.keys():
        raise ValueError(
            f"unknown legacy IFEval functions {sorted(legacy - _LEGACY_FUNCTIONS.keys())}; "
            f"known: {sorted(_LEGACY_FUNCTIONS)}"
        )
    check = _LEGACY_FUNCTIONS[name] if name in legacy else IF_FUNCTIONS[name]
    return bool(check(answer, **kwargs))


def parse_if_semantics(spec: str) -> frozenset[str]:
    """The ``legacy`` set for a semantics spec.

    ``"head"`` -> no legacy functions (open-instruct's current fixes everywhere); ``"2024"`` -> every function
    whose 2024 behaviour differs (``LEGACY_DIFFERENCES``); ``"2024:f1,f2"`` -> just those.

    Raises:
      ValueError: another spec, an empty list after ``2024:``, or a name not in ``LEGACY_DIFFERENCES`` (the
        message lists the known names).
    """
    text = spec.strip()
    if text == "head":
        return frozenset()
    if text == "2024":
        return frozenset(LEGACY_DIFFERENCES)
    if text.startswith("2024:"):
        names = [n.strip() for n in text[len("2024:") :].split(",")]
        unknown = [n for n in names if n not in LEGACY_DIFFERENCES]
        if unknown:
            raise ValueError(
                f"IF semantics {spec!r}: unknown function(s) {unknown}; functions with 2024 behaviour: "
                f"{sorted(LEGACY_DIFFERENCES)}"
            )
        return frozenset(names)
    raise ValueError(
        f"IF semantics {spec!r} must be 'head', '2024' or '2024:<f1>,<f2>,...' with f in {sorted(LEGACY_DIFFERENCES)}"
    )
