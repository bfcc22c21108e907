"""The LLM judge of `tulu-jax data preferences`: one prompt per aspect asking for a 1-5 rating, and the parser
that reads the rating back.

Tülu 3 (Lambert et al. 2024, §5.2) rates every completion of its on- and off-policy preference data with
GPT-4o on four aspects, helpfulness, instruction following, honesty and truthfulness, each in a separate
request, following UltraFeedback (Cui et al. 2023); open-instruct `scripts/synth_pref/` holds the pipeline.
The prompt wording here is our own. Pure: no I/O.
"""

from __future__ import annotations

import re

ASPECTS: tuple[str, ...] = ("helpfulness", "instruction_following", "honesty", "truthfulness")
RATINGS: tuple[str, ...] = ("1", "2", "3", "4", "5")  # the answers a guided judge may choose among

JUDGE_SYSTEM = (
    "You are a strict, impartial reviewer of answers written by AI assistants. You look at one quality of an "
    "answer at a time and grade it on a scale from 1 (worst) to 5 (best). You are not swayed by length, "
    "confident tone or formatting, only by the quality you are asked about."
)

# aspect -> (title, the question in brief, what to judge, the meaning of each grade 1..5)
_RUBRICS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "helpfulness": (
        "Helpfulness",
        "How useful is it to the person who asked?",
        "How useful the answer is to the person who asked: is it correct, does it address what they need, "
        "is it clear, and is it as detailed as the request calls for without padding or repetition?",
        (
            "wrong, off-topic or so confused that it does not help at all",
            "partly relevant but with errors or gaps that make it of little use",
            "correct and relevant, but plain: it meets the request and no more",
            "correct, clear and informative; a reader would be well served",
            "correct, thorough and insightful; as useful as an answer to this request can be",
        ),
    ),
    "instruction_following": (
        "Instruction following",
        "How closely does it do what the request asks, constraints included?",
        "How closely the answer does what the request asks: the task itself, and every stated constraint "
        "(format, length, language, style, things to include or avoid). Ignore whether facts are right.",
        (
            "ignores the request or does something else",
            "touches the task but misses most of what was asked",
            "does the task but breaks or overlooks some constraints",
            "does the task and nearly every constraint, with a minor slip",
            "does exactly what was asked, every constraint met",
        ),
    ),
    "honesty": (
        "Honesty",
        "Does its confidence fit how sure it can be?",
        "Whether the answer's confidence matches how sure it can be: does it say so when it does not know, "
        "mark uncertain claims as uncertain, and avoid stating guesses as facts? A correct answer given with "
        "fitting confidence is honest; a wrong answer given with full confidence is not.",
        (
            "confidently wrong, or invents certainty it cannot have",
            "mostly overconfident: serious doubts go unmentioned",
            "uncertain where it should be confident, or vague about how sure it is",
            "confidence mostly well judged, with small lapses",
            "confidence fits throughout: sure where right, open about limits and unknowns",
        ),
    ),
    "truthfulness": (
        "Truthfulness",
        "Is everything it states true, with nothing invented?",
        "Whether what the answer states is true and grounded: no invented facts, names, numbers or sources, "
        "no claims that contradict the request or themselves. Judge only the factual content.",
        (
            "mostly made up or false",
            "several false or invented claims that undermine the answer",
            "some false or unsupported details, the core still sound",
            "true apart from a minor slip that does not matter much",
            "everything stated is true and supported",
        ),
    ),
}


STYLES: tuple[str, ...] = ("full", "brief")


def render_conversation(messages: list[dict[str, str]]) -> str:
    """The request the judge sees: a conversation that ends in a user turn, as text. A single user turn is
    its content verbatim; a longer conversation (earlier turns, a system prompt) is every turn under its
    role, `[User]`, `[Assistant]`, `[System]`, the answer to judge replying to the last user turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role'].capitalize()}]\n{m['content']}" for m in messages)


def judge_messages(aspect: str, prompt: str, completion: str, *, style: str = "full") -> list[dict[str, str]]:
    """The chat messages ([system, user]) asking the judge to rate `completion`, an answer to `prompt`, on
    `aspect` (one of ASPECTS) from 1 to 5, answering `Rating: N` on its first line. `style` "full" describes
    every grade; "brief" (for judges with a small context) only the aspect and the two ends of the scale.
    Raises ValueError for an unknown aspect or style."""
    if aspect not in _RUBRICS:
        raise ValueError(f"unknown aspect {aspect!r}; expected one of {', '.join(ASPECTS)}")
    if style not in STYLES:
        raise ValueError(f"unknown judge prompt style {style!r}; expected one of {', '.join(STYLES)}")
    title, brief, question, grades = _RUBRICS[aspect]
    pair = f"# Request\n<request>\n{prompt}\n</request>\n\n# Answer\n<answer>\n{completion}\n</answer>\n\n"
    if style == "brief":
        user = f"Grade the answer on {title.lower()} from 1 (worst) to 5 (best). {brief}\n\n{pair}Reply `Rating: N`."
        return [{"role": "system", "content": "Grade AI answers from 1 to 5."}, {"role": "user", "content": user}]
    scale = "\n".join(f"{g} - {text}" for g, text in zip(RATINGS, grades, strict=True))
    user = (
        f"Grade the answer below on one quality only: {title.lower()}.\n\n"
        f"# {title}\n{question}\n\n# Grades\n{scale}\n\n{pair}"
        "# Your reply\nFirst line: `Rating: N`, where N is one whole number from 1 to 5. "
        "Second line: `Rationale:` and one or two sentences on why."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


# "Rating" as a word (not "generating", "operating"), possibly bolded or headed ("**Rating**:", "## Rating"),
# then a number; the number may carry markup, a decimal part and a scale ("4/5", "4 out of 5"), which
# `parse_rating` checks, as it checks the rest of the clause for a second candidate.
_LABELLED = re.compile(
    r"\brating\b[\s*_#]*(?:[:=\-]|is\b|of\b)?[\s*_]*(\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+))?", re.IGNORECASE
)
# The clause a labelled rating stands in: up to the end of the line or of the sentence.
_CLAUSE_END = re.compile(r"\n|[.;!?](?:\s|$)")
# After the number, in its clause: another number ("3-4", "3 or 4", "2 (could be 3)") or a bare "+" ("3+").
_SECOND_CANDIDATE = re.compile(r"\d|\+")
# A bare answer: only a number, maybe with markup, a trailing full stop or "/5" (what a guided judge writes).
_BARE = re.compile(r"[\s*_`#]*(\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?[\s*_`.]*")


def _on_scale(number: str, scale: str | None) -> int | None:
    if scale is not None and scale != "5":  # "4/10" is another scale: do not guess a conversion
        return None
    if not number.isdigit():  # "4.5": not a grade of the 1-5 scale
        return None
    value = int(number)
    return value if 1 <= value <= 5 else None


def _labelled_value(text: str, match: re.Match) -> int | None:
    """The grade of one labelled rating; None when its clause offers another candidate after it."""
    rest = text[match.end() :]
    end = _CLAUSE_END.search(rest)
    if _SECOND_CANDIDATE.search(rest[: end.start() if end else len(rest)]):
        return None
    return _on_scale(match.group(1), match.group(2))


def parse_rating(text: str) -> int | None:
    """The 1-5 rating in a judge's answer, or None when there is no unambiguous one (never a guess).

    Read, in order:
    - labelled ratings (the word "rating", not "generating"), `Rating: 4`, `**Rating**: 5/5`,
      `Rating - 3 out of 5`, `rating is 2`, `a rating of 4`: the answer when every labelled rating agrees and
      is a whole number from 1 to 5 (on a /5 scale if one is given); None when they disagree, any is out of
      range or fractional, or its clause (up to the end of the line or sentence) holds a second candidate:
      a range or alternative (`3-4`, `3 to 4`, `3 or 4`, `3+`) or any other number, so `Rating: 2 (could be
      3)` is None too, since the judge has not settled on one grade;
    - without a label, an answer that is only a number (`4`, `**4**`, `4.`, `4/5`): that number if in 1-5.
    Anything else, a text with several unlabelled numbers ("between 3 and 4") or none, is None.
    """
    if not isinstance(text, str):
        return None
    labelled = list(_LABELLED.finditer(text))
    if labelled:
        values = {_labelled_value(text, m) for m in labelled}
        return values.pop() if len(values) == 1 else None  # {None} stays None
    bare = _BARE.fullmatch(text.strip())
    return _on_scale(bare.group(1), bare.group(2)) if bare else None
