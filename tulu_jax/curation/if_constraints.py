"""Verifiable instruction-following constraints for synthesised RLVR prompts (Tülu 3 §3.1 and §6).

Tülu 3 builds its IF data by attaching verifiable constraints, of the kinds IFEval checks, to prompts
(open-instruct `scripts/persona_driven_data_gen/` writes persona-driven IF prompts; Zhou et al. 2023 define
the constraint types). This module holds our catalogue of those constraints: for each of the 25 instruction
ids that `tulu_jax.rewards.ifeval_google` checks, how to draw its kwargs in sensible ranges and our own
wording of the instruction a prompt carries, plus a table of pairs that no single response can meet (or
that make a poor prompt together), so a sampled set never conflicts.

Ground truths use the `google_ifeval` verifier's format, `{"instruction_id_list": [...], "kwargs": [...],
"prompt": ...}`, for one constraint as for several: it is the registry's verifier that checks several at
once (Tülu's `ifeval` format holds one `func_name`), and one format keeps one catalogue and one wording.
The reward is 1 only when every constraint passes (`tulu_jax.rewards.registry.verify`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

DATASET = "google_ifeval"

# Word pools, pairwise disjoint, and disjoint from the fixed phrases below, so a keyword to use is never a
# word to avoid (and no end phrase or section marker contains a forbidden word).
KEYWORDS = (
    "harbor", "lantern", "meadow", "compass", "orchard", "ledger", "glacier", "violin", "workshop", "pebble",
    "satellite", "recipe", "bridge", "garden", "journey", "museum", "timber", "signal",
)  # fmt: skip
FORBIDDEN = ("very", "really", "basically", "actually", "simply", "just", "thing", "stuff", "literally", "obviously")
FIRST_WORDS = ("first", "moreover", "finally", "however", "today", "consider", "imagine", "overall")
END_PHRASES = (
    "Is there anything else I can help with?",
    "Let me know if you have questions.",
    "That is my answer.",
    "Thank you for reading.",
    "Hope this helps!",
)
LANGUAGES = {"es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese"}
LETTERS = "abcdeghilmnoprstuwy"  # letters a fluent answer can repeat without contortion
_ORDINALS = ("first", "second", "third", "fourth", "fifth")


def _relation(rng: random.Random, low: tuple[int, int], high: tuple[int, int]) -> tuple[str, int]:
    """("less than", n in `high`) or ("at least", n in `low`): upper bounds loose enough to leave room."""
    relation = rng.choice(("less than", "at least"))
    lo, hi = high if relation == "less than" else low
    return relation, rng.randint(lo, hi)


def _words(relation: str, n: int, what: str) -> str:
    return f"{'fewer than' if relation == 'less than' else 'at least'} {n} {what}"


def _quoted_list(words: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


@dataclasses.dataclass(frozen=True)
class ConstraintType:
    """One instruction id of the catalogue: `draw(rng) -> kwargs` and `describe(kwargs) -> instruction`."""

    id: str
    draw: Callable[[random.Random], dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]


def _t(id: str, draw, describe) -> ConstraintType:
    return ConstraintType(id, draw, describe)


def _draw_word_count(rng):
    relation, n = _relation(rng, (40, 300), (100, 400))
    return {"relation": relation, "num_words": n}


def _draw_sentences(rng):
    relation, n = _relation(rng, (3, 8), (6, 15))
    return {"relation": relation, "num_sentences": n}


def _draw_keyword_frequency(rng):
    relation, n = _relation(rng, (1, 3), (2, 4))
    return {"keyword": rng.choice(KEYWORDS), "relation": relation, "frequency": n}


def _draw_capital_frequency(rng):
    relation, n = _relation(rng, (2, 6), (4, 10))
    return {"capital_relation": relation, "capital_frequency": n}


def _draw_nth_paragraph(rng):
    n = rng.randint(2, 5)
    return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": rng.choice(FIRST_WORDS)}


def _draw_sections(rng):
    return {"section_spliter": rng.choice(("Section", "SECTION")), "num_sections": rng.randint(2, 5)}


_TYPES: tuple[ConstraintType, ...] = (
    _t(
        "keywords:existence",
        lambda rng: {"keywords": sorted(rng.sample(KEYWORDS, rng.randint(1, 2)))},
        lambda k: f"Your answer must include the word{'s' * (len(k['keywords']) > 1)} {_quoted_list(k['keywords'])}.",
    ),
    _t(
        "keywords:frequency",
        _draw_keyword_frequency,
        lambda k: f'Use the word "{k["keyword"]}" {_words(k["relation"], k["frequency"], "times")} in your answer.',
    ),
    _t(
        "keywords:forbidden_words",
        lambda rng: {"forbidden_words": sorted(rng.sample(FORBIDDEN, rng.randint(1, 3)))},
        lambda k: (
            f"Do not use the word{'s' * (len(k['forbidden_words']) > 1)} "
            f"{_quoted_list(k['forbidden_words'])} anywhere in your answer."
        ),
    ),
    _t(
        "keywords:letter_frequency",
        lambda rng: {"letter": rng.choice(LETTERS), "let_relation": "at least", "let_frequency": rng.randint(3, 12)},
        lambda k: (
            f'The letter "{k["letter"]}" must appear at least {k["let_frequency"]} times in your answer '
            "(capital or small both count)."
        ),
    ),
    _t(
        "language:response_language",
        lambda rng: {"language": rng.choice(sorted(LANGUAGES))},
        lambda k: f"Write your whole answer in {LANGUAGES[k['language']]}; use no other language.",
    ),
    _t(
        "length_constraints:number_sentences",
        _draw_sentences,
        lambda k: f"Your answer must be {_words(k['relation'], k['num_sentences'], 'sentences')} long.",
    ),
    _t(
        "length_constraints:number_paragraphs",
        lambda rng: {"num_paragraphs": rng.randint(2, 5)},
        lambda k: (
            f"Write exactly {k['num_paragraphs']} paragraphs, with a line holding only the markdown divider "
            "*** between one paragraph and the next."
        ),
    ),
    _t(
        "length_constraints:number_words",
        _draw_word_count,
        lambda k: f"Answer in {_words(k['relation'], k['num_words'], 'words')}.",
    ),
    _t(
        "length_constraints:nth_paragraph_first_word",
        _draw_nth_paragraph,
        lambda k: (
            f"Write exactly {k['num_paragraphs']} paragraphs separated by blank lines; the "
            f'{_ORDINALS[k["nth_paragraph"] - 1]} paragraph must begin with the word "{k["first_word"]}".'
        ),
    ),
    _t(
        "detectable_content:number_placeholders",
        lambda rng: {"num_placeholders": rng.randint(1, 4)},
        lambda k: (
            f"Include at least {k['num_placeholders']} placeholder{'s' * (k['num_placeholders'] > 1)} in "
            "square brackets, such as [address]."
        ),
    ),
    _t(
        "detectable_content:postscript",
        lambda rng: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
        lambda k: f"Finish with a postscript that starts with {k['postscript_marker']}",
    ),
    _t(
        "detectable_format:number_bullet_lists",
        lambda rng: {"num_bullets": rng.randint(2, 6)},
        lambda k: (
            f"Give exactly {k['num_bullets']} bullet points as markdown list items (lines starting with "
            '"* "), and no other lines that start with * or -.'
        ),
    ),
    _t(
        "detectable_format:constrained_response",
        lambda rng: {},
        lambda k: (
            'Reply with one of these and nothing else: "My answer is yes.", "My answer is no." or "My answer is maybe."'
        ),
    ),
    _t(
        "detectable_format:number_highlighted_sections",
        lambda rng: {"num_highlights": rng.randint(1, 4)},
        lambda k: (
            f"Highlight at least {k['num_highlights']} part{'s' * (k['num_highlights'] > 1)} of your answer "
            "with markdown, like *a highlighted part*."
        ),
    ),
    _t(
        "detectable_format:multiple_sections",
        _draw_sections,
        lambda k: (
            f"Split your answer into {k['num_sections']} sections, starting each with "
            f'"{k["section_spliter"]} X" where X is its number ({k["section_spliter"]} 1, '
            f"{k['section_spliter']} 2, ...)."
        ),
    ),
    _t(
        "detectable_format:json_format",
        lambda rng: {},
        lambda k: "Format your entire answer as valid JSON (a ```json code fence around it is allowed).",
    ),
    _t(
        "detectable_format:title",
        lambda rng: {},
        lambda k: "Give your answer a title in double angle brackets, such as <<a short title>>.",
    ),
    _t(
        "combination:two_responses",
        lambda rng: {},
        lambda k: "Give two different answers, separated by a line of six asterisks: ******",
    ),
    _t(
        "combination:repeat_prompt",
        lambda rng: {},  # prompt_to_repeat is the request, known once the prompt is (see `bind_request`)
        lambda k: (
            "Before you answer, repeat the request above word for word (leave out these instructions), "
            "then give your answer."
        ),
    ),
    _t(
        "startend:end_checker",
        lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
        lambda k: f'End your answer with the exact phrase "{k["end_phrase"]}" and nothing after it.',
    ),
    _t(
        "change_case:capital_word_frequency",
        _draw_capital_frequency,
        lambda k: f"Write {_words(k['capital_relation'], k['capital_frequency'], 'words')} in ALL CAPITAL letters.",
    ),
    _t(
        "change_case:english_capital",
        lambda rng: {},
        lambda k: "Write your entire answer in English, in capital letters only.",
    ),
    _t(
        "change_case:english_lowercase",
        lambda rng: {},
        lambda k: "Write your entire answer in English, in lowercase letters only; no capital letters at all.",
    ),
    _t("punctuation:no_comma", lambda rng: {}, lambda k: "Do not use any commas in your answer."),
    _t("startend:quotation", lambda rng: {}, lambda k: "Wrap your entire answer in double quotation marks."),
)

CONSTRAINT_TYPES: dict[str, ConstraintType] = {t.id: t for t in _TYPES}
"""Instruction id -> its ConstraintType, for every id `tulu_jax.rewards.ifeval_google.instruction_ids()` checks."""

_ALL = frozenset(CONSTRAINT_TYPES)

# Pairs one response cannot meet, or meets only by luck of the drawn kwargs (why, per entry). Made symmetric
# below; every type also conflicts with itself (two draws of one type could contradict each other).
_CONFLICT_LISTS: dict[str, frozenset[str]] = {
    # The answer is one fixed sentence, JSON, two answers, or starts with the request: almost nothing else fits.
    "detectable_format:constrained_response": _ALL,
    "detectable_format:json_format": _ALL - {"keywords:existence", "keywords:forbidden_words"},
    "combination:two_responses": _ALL
    - {"keywords:existence", "keywords:forbidden_words", "language:response_language", "detectable_format:title"},
    # The request's own text may hold commas, capitals or forbidden words; only these always fit.
    "combination:repeat_prompt": _ALL - {"keywords:existence", "detectable_format:title"},
    # Other languages cannot carry English keywords, end phrases, section markers or English casing.
    "language:response_language": frozenset(
        {
            "keywords:existence",
            "keywords:frequency",
            "keywords:forbidden_words",
            "startend:end_checker",
            "detectable_format:multiple_sections",
            "change_case:english_capital",
            "change_case:english_lowercase",
            "length_constraints:nth_paragraph_first_word",  # an English first word
        }
    ),
    "change_case:english_lowercase": frozenset(
        {
            "change_case:english_capital",
            "change_case:capital_word_frequency",
            "detectable_format:multiple_sections",  # "Section"/"SECTION" markers are case-sensitive
        }
    ),
    "change_case:english_capital": frozenset(
        {"change_case:capital_word_frequency", "detectable_format:multiple_sections"}
    ),
    "change_case:capital_word_frequency": frozenset({"detectable_format:multiple_sections"}),
    # Two paragraph rules split on different separators; paragraph and sentence counts bound each other.
    "length_constraints:number_paragraphs": frozenset(
        {"length_constraints:nth_paragraph_first_word", "length_constraints:number_sentences"}
    ),
    # Word and sentence counts drawn independently may contradict (fewer than 40 words in 8+ sentences).
    "length_constraints:number_words": frozenset({"length_constraints:number_sentences"}),
    # The first paragraph would have to start with both a quote and a given word.
    "startend:quotation": frozenset({"length_constraints:nth_paragraph_first_word", "detectable_format:title"}),
}


def _symmetric(lists: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    table = {t: {t} for t in CONSTRAINT_TYPES}
    for a, others in lists.items():
        for b in others:
            table[a].add(b)
            table[b].add(a)
    return {t: frozenset(v) for t, v in table.items()}


CONFLICTS: dict[str, frozenset[str]] = _symmetric(_CONFLICT_LISTS)
"""Instruction id -> the ids (itself included) it may not be combined with; symmetric."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One drawn constraint: a Google IFEval instruction `id` and its `kwargs` (JSON values)."""

    id: str
    kwargs: dict[str, Any]

    def instruction(self) -> str:
        """Our wording of the constraint, as appended to a prompt."""
        return CONSTRAINT_TYPES[self.id].describe(self.kwargs)


def sample_constraints(
    rng: random.Random, min_constraints: int = 1, max_constraints: int = 3, *, exclude: Sequence[str] = ()
) -> list[Constraint]:
    """Draws k in [min_constraints, max_constraints] (uniform) pairwise compatible constraints (see
    `CONFLICTS`), in drawing order, from the types not in `exclude`. Deterministic given the state of `rng`.
    A draw that runs out of compatible types before k is redrawn (e.g. `constrained_response` only ever
    appears alone). Raises ValueError for bounds outside 1 <= min <= max <= 3 or an unknown excluded id."""
    if not 1 <= min_constraints <= max_constraints <= 3:
        raise ValueError(f"need 1 <= min_constraints <= max_constraints <= 3, got {min_constraints}, {max_constraints}")
    unknown = sorted(set(exclude) - _ALL)
    if unknown:
        raise ValueError(f"unknown constraint ids {unknown}; known: {sorted(_ALL)}")
    pool = sorted(_ALL - set(exclude))
    k = rng.randint(min_constraints, max_constraints)
    while True:
        chosen: list[str] = []
        for _ in range(k):
            left = [t for t in pool if not any(t in CONFLICTS[c] for c in chosen)]
            if not left:
                break
            chosen.append(rng.choice(left))
        if len(chosen) == k:
            return [Constraint(t, CONSTRAINT_TYPES[t].draw(rng)) for t in chosen]


def bind_request(constraints: Sequence[Constraint], request: str) -> list[Constraint]:
    """The constraints with the request filled in where a kwarg is the request itself (`repeat_prompt`'s
    `prompt_to_repeat`)."""
    return [
        Constraint(c.id, {**c.kwargs, "prompt_to_repeat": request}) if c.id == "combination:repeat_prompt" else c
        for c in constraints
    ]


def constrained_prompt(request: str, constraints: Sequence[Constraint]) -> str:
    """The request followed by a blank line and each constraint's instruction, one per line."""
    return request.rstrip() + "\n\n" + "\n".join(c.instruction() for c in constraints)


def ground_truth(constraints: Sequence[Constraint], prompt: str) -> str:
    """The `google_ifeval` ground truth (JSON text) of `constraints` for `prompt` (the whole prompt, as in
    Google's IFEval rows). Call `bind_request` first when a constraint repeats the request."""
    return json.dumps(
        {
            "instruction_id_list": [c.id for c in constraints],
            "kwargs": [c.kwargs for c in constraints],
            "prompt": prompt,
        },
        ensure_ascii=False,
    )


def make_if_prompt(request: str, constraints: Sequence[Constraint]) -> dict[str, Any]:
    """{"prompt", "ground_truth", "dataset", "constraints"} for `request` with `constraints` attached:
    the prompt text, the google_ifeval ground truth (checked with `registry.check_ground_truth`, so a
    ValueError here is a bug in the catalogue), the dataset name and the instruction ids."""
    from tulu_jax.rewards.registry import check_ground_truth

    bound = bind_request(constraints, request)
    prompt = constrained_prompt(request, bound)
    gt = ground_truth(bound, prompt)
    check_ground_truth(DATASET, gt)
    return {"prompt": prompt, "ground_truth": gt, "dataset": DATASET, "constraints": [c.id for c in bound]}
