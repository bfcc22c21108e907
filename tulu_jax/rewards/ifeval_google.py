"""Google IFEval instruction checks (strict), for the Tülu 3 IFEval evaluation and multi-constraint rewards.

Google's IFEval (Zhou et al. 2023, github.com/google-research/google-research/tree/master/instruction_following_eval)
scores a response against a prompt's list of instruction ids, each with its kwargs; Tülu 3 reports prompt-level
strict accuracy (all instructions pass) and instruction-level accuracy (the mean). The checks themselves come from
the ``if-verifiable`` package (``if_verifiable.ifeval``, a packaging of Google's ``instructions.py``), which this
module drives the way Google's ``evaluation_lib.test_instruction_following_strict`` does: a whitespace-only
response fails everything.

Changes, by subclassing ten checkers (``if_verifiable`` itself is left untouched):

- ``length_constraints:number_sentences`` and ``change_case:capital_word_frequency`` need NLTK's trained English
  Punkt sentence model (NLTK's ``punkt_tab`` data), a download unavailable offline. They use an untrained
  ``PunktSentenceTokenizer`` given a list of common English abbreviations instead; counts can differ from the
  trained model on abbreviations not in that list.
- ``language:response_language``, ``change_case:english_capital`` and ``change_case:english_lowercase`` use
  langdetect seeded (``DetectorFactory.seed = 0``, set by ``tulu_jax.rewards.ifeval``) so verdicts are
  reproducible, and keep Google's rule that text langdetect cannot classify passes, without logging the text.
- ``detectable_content:number_placeholders``, ``detectable_format:title``, ``detectable_format:number_bullet_lists``
  and ``detectable_content:postscript`` give Google's verdicts in linear time where its regexes take quadratic
  time on adversarial answers (a line of many ``[`` or ``<<``, long runs of blank lines or spaces); and
  ``detectable_format:json_format`` fails, instead of raising RecursionError, on JSON nested too deeply to parse.

Every instruction is built from the row's kwargs only: a missing or invalid kwarg, for which the checker would
draw a random value, raises ValueError instead.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

from tulu_jax.rewards.ifeval import count_bracket_pairs, detect_language

# Lowercase, without the final period, as Punkt stores abbreviation types.
_ABBREVIATIONS = (
    "mr mrs ms dr prof sr jr st mt rev gen col capt lt sgt gov sen rep hon vs etc al fig figs no nos vol vols "
    "ed eds pp approx dept est inc ltd co corp bros jan feb mar apr jun jul aug sep sept oct nov dec "
    "e.g i.e a.m p.m u.s u.k u.n ph.d b.a m.a b.sc m.sc"
).split()


@functools.cache
def _sentence_tokenizer() -> PunktSentenceTokenizer:
    params = PunktParameters()
    params.abbrev_types = set(_ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


_WORD_TOKENIZER = NLTKWordTokenizer()


def count_sentences(text: str) -> int:
    """Sentences in ``text`` by offline Punkt (untrained, with common English abbreviations)."""
    return len(_sentence_tokenizer().tokenize(text))


def word_tokens(text: str) -> list[str]:
    """NLTK ``word_tokenize`` (Treebank words within Punkt sentences) using the offline sentence tokenizer."""
    return [token for sentence in _sentence_tokenizer().tokenize(text) for token in _WORD_TOKENIZER.tokenize(sentence)]


def _relation_holds(count: int, relation: str, threshold: int) -> bool:
    # Google's two relations; build_description already rejected any other.
    return count < threshold if relation == "less than" else count >= threshold


def _line_title(line: str) -> bool:
    """Whether Google's title regex ``<<[^\\n]+>>`` finds a non-blank title in one line, in linear time.

    The greedy regex matches at most once per line, from the first ``<<`` to the last ``>>`` with at least one
    character between; the title counts when it is not blank once the brackets are stripped.
    """
    start, end = line.find("<<"), line.rfind(">>")
    return start >= 0 and end >= start + 3 and bool(line[start : end + 2].lstrip("<").rstrip(">").strip())


_WHITESPACE = re.compile(r"\s*")


def count_bullets(value: str, marker: str) -> int:
    """Matches of Google's bullet regex ``^\\s*\\*[^\\*].*$`` (``marker="*"``) or ``^\\s*-.*$`` (``"-"``), multiline.

    Emulates ``re.findall`` in linear time: from a line start the regex skips all whitespace (newlines too), so
    every line start inside one whitespace run reaches the same character and the regex, retrying each of them,
    is quadratic on long runs of blank lines.
    """
    count, start, n = 0, 0, len(value)
    while True:  # `start` is a line start
        k = _WHITESPACE.match(value, start).end()
        if marker == "*":
            matched, rest = k + 1 < n and value[k] == "*" and value[k + 1] != "*", k + 2
        else:
            matched, rest = k < n and value[k] == "-", k + 1
        if matched:
            count += 1
            end = value.find("\n", rest)  # `.*$` runs to the end of the line
            if end < 0:
                return count
            # findall resumes at `end`, itself a line start when `[^*]` consumed a newline ("*\n\n").
            start = end if value[end - 1] == "\n" else end + 1
        else:
            end = value.find("\n", k)  # all line starts up to k fail the same way
            if end < 0:
                return count
            start = end + 1


def _english_or_undetectable(text: str) -> bool:
    language = detect_language(text)
    return language is None or language == "en"


@functools.cache
def _checker_classes() -> dict[str, type]:
    """Instruction id -> checker class; imported on first use (``if_verifiable`` imports ``datasets``, ~3 s)."""
    from if_verifiable.ifeval import instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    class NumberOfSentences(instructions.NumberOfSentences):
        def check_following(self, value: str) -> bool:
            return _relation_holds(count_sentences(value), self._comparison_relation, self._num_sentences_threshold)

    class CapitalWordFrequency(instructions.CapitalWordFrequencyChecker):
        def check_following(self, value: str) -> bool:
            capitals = sum(1 for word in word_tokens(value) if word.isupper())
            return _relation_holds(capitals, self._comparison_relation, self._frequency)

    class Placeholders(instructions.PlaceholderChecker):
        def check_following(self, value: str) -> bool:
            return count_bracket_pairs(value, "[", "]") >= self._num_placeholders

    class Title(instructions.TitleChecker):
        def check_following(self, value: str) -> bool:
            return any(_line_title(line) for line in value.split("\n"))

    class Bullets(instructions.BulletListChecker):
        def check_following(self, value: str) -> bool:
            return count_bullets(value, "*") + count_bullets(value, "-") == self._num_bullets

    class Postscript(instructions.PostscriptChecker):
        def check_following(self, value: str) -> bool:
            # Google's patterns minus their leading `\s*` and trailing `.*$`, which cannot change whether one
            # matches but make the search quadratic on long whitespace runs.
            if self._postscript_marker == "P.P.S":
                pattern = r"p\.\s?p\.\s?s"
            elif self._postscript_marker == "P.S.":
                pattern = r"p\.\s?s\."
            else:
                pattern = self._postscript_marker.lower()
            return re.search(pattern, value.lower(), flags=re.MULTILINE) is not None

    class Json(instructions.JsonFormat):
        def check_following(self, value: str) -> bool:
            try:
                return super().check_following(value)
            except RecursionError:  # nested deeper than Python's recursion limit: not JSON json.loads can read
                return False

    class ResponseLanguage(instructions.ResponseLanguageChecker):
        def check_following(self, value: str) -> bool:
            language = detect_language(value)
            return language is None or language == self._language

    class EnglishCapital(instructions.CapitalLettersEnglishChecker):
        def check_following(self, value: str) -> bool:
            return value.isupper() and _english_or_undetectable(value)

    class EnglishLowercase(instructions.LowercaseLettersEnglishChecker):
        def check_following(self, value: str) -> bool:
            return value.islower() and _english_or_undetectable(value)

    return {
        **INSTRUCTION_DICT,
        "length_constraints:number_sentences": NumberOfSentences,
        "change_case:capital_word_frequency": CapitalWordFrequency,
        "detectable_content:number_placeholders": Placeholders,
        "detectable_format:json_format": Json,
        "detectable_format:title": Title,
        "detectable_format:number_bullet_lists": Bullets,
        "detectable_content:postscript": Postscript,
        "language:response_language": ResponseLanguage,
        "change_case:english_capital": EnglishCapital,
        "change_case:english_lowercase": EnglishLowercase,
    }


def instruction_ids() -> tuple[str, ...]:
    """The 25 Google IFEval instruction ids this module checks, sorted."""
    return tuple(sorted(_checker_classes()))


# How build_description stores a valid kwarg, when not verbatim.
_STORED_AS = {
    "keywords": sorted,
    "letter": lambda v: v.strip().lower(),
    "first_word": lambda v: v.lower(),
}


_INT_KWARGS = frozenset(
    "num_sentences num_paragraphs num_words nth_paragraph num_placeholders num_bullets num_highlights num_sections "
    "frequency let_frequency capital_frequency".split()
)
_LIST_KWARGS = frozenset(("keywords", "forbidden_words"))


def _kwarg_type_problem(key: str, value: Any) -> str | None:
    """Why ``value`` has the wrong JSON type for IFEval kwarg ``key`` (None when fine)."""
    if key in _INT_KWARGS:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if key in _LIST_KWARGS:
        return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a list of strings"
    return None if isinstance(value, str) else "a string"


def _build(instruction_id: str, kwargs: dict[str, Any]) -> Any:
    """A checker built from exactly these kwargs (ValueError when it would not be, see module docstring)."""
    classes = _checker_classes()
    if instruction_id not in classes:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}; known: {sorted(classes)}")
    for key, value in kwargs.items():
        problem = _kwarg_type_problem(key, value)
        if problem is not None:
            raise ValueError(f"IFEval instruction {instruction_id}: kwarg {key} must be {problem}, got {value!r:.100}")
    checker = classes[instruction_id](instruction_id)
    try:
        checker.build_description(**kwargs)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"IFEval instruction {instruction_id} cannot take kwargs {kwargs}: {e!r}") from None
    stored = checker.get_instruction_args() or {}
    for key in checker.get_instruction_args_keys():
        if key not in kwargs:
            raise ValueError(
                f"IFEval instruction {instruction_id} needs kwarg {key!r} (it would be drawn at random); got {kwargs}"
            )
        if stored[key] != _STORED_AS.get(key, lambda v: v)(kwargs[key]):
            raise ValueError(
                f"IFEval instruction {instruction_id}: invalid {key}={kwargs[key]!r} (the checker "
                f"would replace it with a random value)"
            )
    return checker


def _parse(ground_truth: str) -> tuple[list[str], list[dict[str, Any]], str]:
    try:
        spec = json.loads(ground_truth)
    except (TypeError, ValueError) as e:
        raise ValueError(f"IFEval ground truth is not JSON ({e}): {ground_truth!r:.200}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"IFEval ground truth must be a JSON object: {ground_truth!r:.200}")
    return _fields(spec, "IFEval ground truth")


def _fields(row: dict[str, Any], where: str) -> tuple[list[str], list[dict[str, Any]], str]:
    """Validated (instruction ids, kwargs with nulls dropped, prompt) of an IFEval row or ground truth."""
    ids, kwargs_list, prompt = row.get("instruction_id_list"), row.get("kwargs"), row.get("prompt")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: instruction_id_list must be a non-empty list of strings, got {ids!r:.200}")
    if not isinstance(kwargs_list, list) or len(kwargs_list) != len(ids):
        raise ValueError(
            f"{where}: kwargs must be a list of {len(ids)} objects (one per instruction id), got {kwargs_list!r:.200}"
        )
    if not all(isinstance(k, dict) for k in kwargs_list):
        raise ValueError(f"{where}: every kwargs entry must be an object, got {kwargs_list!r:.200}")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt must be a string, got {prompt!r:.200}")
    cleaned = [{k: v for k, v in kwargs.items() if v is not None} for kwargs in kwargs_list]
    return ids, cleaned, prompt


def ground_truth_from_row(row: dict[str, Any]) -> str:
    """The ground-truth JSON for one row of Google IFEval's ``input_data.jsonl`` (or the ``google/IFEval`` dataset).

    Keeps ``instruction_id_list``, ``kwargs`` (null values dropped, as the HF copy pads every kwargs object with
    all keys) and ``prompt``, after checking that every instruction builds from its kwargs.

    Raises:
      ValueError: a missing/mistyped field, an unknown instruction id or unusable kwargs; the message names the
        row's ``key`` when it has one.
    """
    where = f"IFEval row key={row['key']!r}" if "key" in row else "IFEval row"
    ids, kwargs_list, prompt = _fields(row, where)
    for instruction_id, kwargs in zip(ids, kwargs_list, strict=True):
        try:
            _build(instruction_id, kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return json.dumps({"instruction_id_list": ids, "kwargs": kwargs_list, "prompt": prompt})


def check_ground_truth(ground_truth: str) -> None:
    """Raises the ValueError ``check_instructions`` would raise for ``ground_truth`` whatever the answer (not
    JSON, a missing/mistyped field, mismatched lengths, an unknown instruction id, kwargs missing or invalid, a
    keyword that is not a valid regular expression); returns None for a usable ground truth."""
    check_instructions(_PROBE_ANSWER, ground_truth)


# A non-blank answer, so that every checker (and every keyword regex) runs once.
_PROBE_ANSWER = "probe"


def check_instructions(answer: str, ground_truth: str) -> tuple[bool, ...]:
    """Strict pass/fail of ``answer`` for each instruction in ``ground_truth``, in order.

    Args:
      answer: the response text; any string (a whitespace-only one fails every instruction). Never raises.
      ground_truth: JSON ``{"instruction_id_list": [...], "kwargs": [{...}, ...], "prompt": "..."}`` (see
        ``ground_truth_from_row``).
    Returns:
      One bool per instruction: prompt-level strict accuracy is ``all(...)``, instruction-level the mean.
    Raises:
      ValueError: malformed ground truth (not JSON, bad fields, unknown id, kwargs missing or invalid, a keyword
        that is not a valid regular expression; Google's checkers match keywords as regexes).
    """
    ids, kwargs_list, _ = _parse(ground_truth)
    checkers = [_build(i, k) for i, k in zip(ids, kwargs_list, strict=True)]
    if not answer.strip():
        return tuple(False for _ in checkers)
    verdicts = []
    for checker, kwargs in zip(checkers, kwargs_list, strict=True):
        try:
            verdicts.append(bool(checker.check_following(answer)))
        except re.error as e:  # the pattern comes from the kwargs, so it fails for every answer
            raise ValueError(f"IFEval instruction {checker.id}: kwargs {kwargs} are not a valid regex: {e}") from None
    return tuple(verdicts)
