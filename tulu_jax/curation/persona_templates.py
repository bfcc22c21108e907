"""Prompt templates for persona-driven prompt synthesis, and reading the prompt back out of the model's reply.

Tülu 3 §3.1 conditions a model on a persona (PersonaHub, Chan et al. 2024: "Scaling Synthetic Data Creation
with 1,000,000,000 Personas") to write diverse skill-specific prompts: hard math, grade-school math, Python
coding and precise instruction following (open-instruct `scripts/persona_driven_data_gen/`). The templates
here are our own wording. Each asks the model to start its reply with a fixed prefix ("Math problem:",
"Coding task:", "Request:"), which `extract_prompt` requires and strips; a reply without it is malformed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SKILLS = ("math", "grade_math", "code", "if")

PREFIXES = {"math": "Math problem:", "grade_math": "Math problem:", "code": "Coding task:", "if": "Request:"}

_INTRO = (
    "We are collecting realistic tasks written from the point of view of different people. The person:\n\n{persona}\n\n"
)
_NO_ANSWER = "Do not solve it or give any hints. "
_START = 'Start your reply with "{prefix}" followed by the {what} and nothing else.'

_TASKS = {
    "math": (
        "Write one challenging math problem that this person could plausibly face or pose, rooted in their work or "
        "interests. It should need several steps of advanced reasoning (for example algebra, calculus, probability, "
        "combinatorics, number theory or geometry) and have at most two sub-problems. " + _NO_ANSWER
    ),
    "grade_math": (
        "Write one arithmetic word problem set in this person's everyday life, suitable for a primary-school pupil: "
        "two to four steps of addition, subtraction, multiplication or division leading to a single whole-number "
        "answer. " + _NO_ANSWER
    ),
    "code": (
        "Write one self-contained Python programming task that this person might need done. Say what the function "
        "takes as input, what it must return and any edge cases, and give a small example of input and expected "
        "output. Do not write the solution. "
    ),
    "if": (
        "Write one request that this person might send to an AI assistant: a question or a writing task in their "
        "own voice. The following rules will be attached after your request, so the request must be one a reply "
        "could answer while obeying all of them:\n{rules}\nDo not repeat or mention these rules, and do not answer "
        "the request. "
    ),
}

_WHAT = {"math": "problem", "grade_math": "problem", "code": "task", "if": "request"}


def render_template(skill: str, persona: str, rules: Sequence[str] = ()) -> str:
    """The user message asking the model for one prompt of `skill` in the voice of `persona`. For "if",
    `rules` are the constraint instructions that will be appended to the request (listed so the request
    suits them). Raises ValueError for an unknown skill, or rules given for another skill / none for "if"."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
    if (skill == "if") != bool(rules):
        raise ValueError(f"skill {skill!r}: rules are needed for 'if' and only for it")
    task = _TASKS[skill].format(rules="\n".join(f"- {r}" for r in rules)) if rules else _TASKS[skill]
    start = _START.format(prefix=PREFIXES[skill], what=_WHAT[skill])
    return _INTRO.format(persona=persona.strip()) + task + start


REFUSALS = ("i'm sorry", "i am sorry", "sorry,", "i cannot", "i can't", "i can not", "as an ai", "i apologize")

# A solution the model wrote although told not to starts on a line of its own with a clear header:
# "Solution:" / "Answer: 42" (bold allowed), a markdown heading "## Solution", a bold "**Answer**" line, or
# "Here is the solution". A line like "Answer in simplest form." is part of the prompt and is kept.
_HEAD = r"(?:solution|answer)"
_SOLUTION = re.compile(
    rf"^[ \t]*(?:#+[ \t]*{_HEAD}\b|\**[ \t]*{_HEAD}[ \t]*\**[ \t]*:|\*\*{_HEAD}\*\*[ \t]*$|here is the solution\b)",
    re.IGNORECASE | re.MULTILINE,
)

MIN_PROMPT_WORDS = 4


def extract_prompt(skill: str, text: str, finish_reason: str = "stop") -> tuple[str | None, str | None]:
    """(prompt, None) from a reply, or (None, reason) when the reply is malformed. Reasons, checked in this
    order: "empty" (blank), "truncated" (`finish_reason` "length": cut at max_tokens, so the prompt may be
    incomplete), "refusal" (starts like a refusal and has no prefix), "no_prefix" (the skill's prefix is
    absent), "too_short" (fewer than MIN_PROMPT_WORDS words after it). The prompt is the text after the
    first occurrence of the prefix (any case, markdown bold around it dropped), cut before a line that
    starts a solution ("Solution:", "Answer: ...", "## Solution", "**Answer**"), stripped of surrounding
    quotes and whitespace."""
    stripped = text.strip()
    if not stripped:
        return None, "empty"
    if finish_reason == "length":
        return None, "truncated"
    at = stripped.lower().find(PREFIXES[skill].lower())
    if at < 0:
        return None, "refusal" if stripped.lower().startswith(REFUSALS) else "no_prefix"
    prompt = stripped[at + len(PREFIXES[skill]) :]
    solution = _SOLUTION.search(prompt)
    if solution is not None and solution.start() > 0:
        prompt = prompt[: solution.start()]
    prompt = prompt.strip().lstrip("*").strip().strip('"').strip()
    if len(prompt.split()) < MIN_PROMPT_WORDS:
        return None, "too_short"
    return prompt, None


def check_response(text: str, finish_reason: str = "stop") -> str | None:
    """Why a response (the `--respond` pass) is malformed, or None: "empty" when blank, "truncated" when cut
    at max_tokens (an SFT target that stops mid-sentence teaches stopping mid-sentence)."""
    if not text.strip():
        return "empty"
    if finish_reason == "length":
        return "truncated"
    return None
