"""Google IFEval strict checks (tulu_jax.rewards.ifeval_google): every instruction id offline, errors, metrics."""

import json
import random
import time

import pytest

from tulu_jax.rewards import check_ground_truth
from tulu_jax.rewards.ifeval_google import (
    _build,
    check_instructions,
    count_sentences,
    ground_truth_from_row,
    instruction_ids,
    word_tokens,
)

PROMPT_TO_REPEAT = "Write a haiku about rain."
GERMAN = "Das Wetter ist heute sehr schön und wir gehen zusammen in den großen Park spazieren."
ENGLISH = "The weather is lovely today and we are going for a long walk in the park together."

# instruction id -> (kwargs as in IFEval's input_data.jsonl, passing response, failing response)
CASES = {
    "keywords:existence": ({"keywords": ["planet", "orbit"]}, "The planet keeps its ORBIT.", "The planet spins."),
    "keywords:frequency": (
        {"keyword": "data", "frequency": 3, "relation": "at least"},
        "data, Data and DATA",
        "data and data",
    ),
    # Whole words only: "badge" does not contain the forbidden word "bad".
    "keywords:forbidden_words": ({"forbidden_words": ["bad", "evil"]}, "A badge is fine.", "That is Bad."),
    "keywords:letter_frequency": (
        {"letter": "q", "let_frequency": 2, "let_relation": "less than"},
        "quiet",
        "Quick quiz",
    ),
    "language:response_language": ({"language": "de"}, GERMAN, ENGLISH),
    # "Dr." is an abbreviation, so the passing text has 2 sentences (< 3), the failing one 3.
    "length_constraints:number_sentences": (
        {"num_sentences": 3, "relation": "less than"},
        "Dr. Smith arrived at noon. He left.",
        "One. Two. Three.",
    ),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "First part.\n***\nSecond part.", "Only one."),
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "at least"},
        "one two three four five",
        "one two three four",
    ),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "Start here.\n\nThen, finish.",
        "Start here.\n\nAfter that, finish.",
    ),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Dear [name], at [address].", "Dear [name]."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Body.\nP.S. bye", "Body only."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* a\n* b", "* a\n* b\n* c"),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Yes, definitely."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "*one* and *two*", "*one* only"),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nIntro\nSection 2\nBody",
        "Section 1\nIntro only",
    ),
    # Google strips a markdown fence before parsing (Tülu's validate_json_format does not).
    "detectable_format:json_format": ({}, '```json\n{"a": 1}\n```', "{a: 1}"),
    "detectable_format:title": ({}, "<<Joy>>\nText", "No title"),
    "combination:two_responses": ({}, "Answer A.\n******\nAnswer B.", "Answer A.\n******\nAnswer A."),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": PROMPT_TO_REPEAT},
        PROMPT_TO_REPEAT + "\nRain taps the window...",
        "Here is a haiku about rain.",
    ),
    "startend:end_checker": (
        {"end_phrase": "Any other questions?"},
        "Done. Any other questions?",
        "Any other questions? Done.",
    ),
    "change_case:capital_word_frequency": (
        {"capital_frequency": 2, "capital_relation": "at least"},
        "I LOVE this",
        "i love This",
    ),
    "change_case:english_capital": ({}, ENGLISH.upper(), ENGLISH),
    "change_case:english_lowercase": ({}, ENGLISH.lower(), ENGLISH),
    "punctuation:no_comma": ({}, "No commas here.", "One, two."),
    "startend:quotation": ({}, '"Quoted text."', 'Quoted "text".'),
}


def row(ids, kwargs, prompt=f"{PROMPT_TO_REPEAT} First repeat the request, then answer.", key=1000):
    return {"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


def test_cases_cover_every_instruction_id():
    assert sorted(CASES) == list(instruction_ids())
    assert len(CASES) == 25


@pytest.mark.parametrize("instruction_id", sorted(CASES))
def test_pass_and_fail(instruction_id):
    kwargs, passing, failing = CASES[instruction_id]
    truth = ground_truth_from_row(row([instruction_id], [kwargs]))
    assert check_instructions(passing, truth) == (True,)
    assert check_instructions(failing, truth) == (False,)


def test_offline_sentence_and_word_tokenization():
    assert count_sentences("Mr. Smith met Dr. Jones at 5 p.m. today. They talked, e.g. about rain! Did it help?") == 3
    assert count_sentences("") == 0
    assert word_tokens("I LOVE the U.S. SO MUCH. OK?") == ["I", "LOVE", "the", "U.S.", "SO", "MUCH", ".", "OK", "?"]


def test_null_kwargs_from_the_hf_copy_are_dropped():
    padded = {"num_words": 5, "relation": "at least", "keywords": None, "language": None}
    truth = ground_truth_from_row(row(["length_constraints:number_words"], [padded]))
    assert json.loads(truth)["kwargs"] == [{"num_words": 5, "relation": "at least"}]
    # A hand-written ground truth may keep the nulls too.
    kept = json.dumps({"instruction_id_list": ["length_constraints:number_words"], "kwargs": [padded], "prompt": ""})
    assert check_instructions("one two three four five", kept) == (True,)


def test_prompt_and_instruction_level_accuracy():
    """Three prompts, seven instructions; the verdicts and both accuracies are worked out by hand."""
    prompts = [
        (["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}]),
        (["length_constraints:number_words", "startend:end_checker"],
         [{"num_words": 4, "relation": "at least"}, {"end_phrase": "Bye."}]),
        (["detectable_format:title", "detectable_content:number_placeholders", "combination:repeat_prompt"],
         [{}, {"num_placeholders": 1}, {"prompt_to_repeat": PROMPT_TO_REPEAT}]),
    ]  # fmt: skip
    responses = [
        "all lowercase and no commas in this english sentence at all.",  # both pass
        "Only three words",  # 3 < 4 words, and does not end with "Bye."
        PROMPT_TO_REPEAT + "\n<<Rain>>\nDrops fall.",  # title and repeat pass, no [placeholder]
    ]
    verdicts = [
        check_instructions(response, ground_truth_from_row(row(ids, kwargs)))
        for (ids, kwargs), response in zip(prompts, responses)
    ]
    assert verdicts == [(True, True), (False, False), (True, False, True)]
    prompt_level = sum(all(v) for v in verdicts) / len(verdicts)
    instruction_level = sum(sum(v) for v in verdicts) / sum(len(v) for v in verdicts)
    assert prompt_level == pytest.approx(1 / 3)
    assert instruction_level == pytest.approx(4 / 7)


def test_empty_response_fails_every_instruction():
    truth = ground_truth_from_row(row(["punctuation:no_comma", "detectable_format:title"], [{}, {}]))
    assert check_instructions("", truth) == (False, False)
    assert check_instructions(" \n\t", truth) == (False, False)


@pytest.mark.parametrize(
    "bad_row,message",
    [
        (row(["length_constraints:number_words"], [{"relation": "at least"}]), "needs kwarg 'num_words'"),
        (row(["length_constraints:number_words"], [{"num_words": -1, "relation": "at least"}]), "invalid num_words"),
        (row(["length_constraints:number_words"], [{"num_words": "5", "relation": "at least"}]), "an integer"),
        (row(["length_constraints:number_words"], [{"num_words": 5, "relation": "at most"}]), "cannot take kwargs"),
        (row(["keywords:letter_frequency"], [{"letter": "ab", "let_frequency": 1, "let_relation": "at least"}]),
         "invalid letter"),
        (row(["keywords:existence"], [{"keywords": "planet"}]), "a list of strings"),
        (row(["punctuation:no_comma"], [{"num_words": 5}]), "cannot take kwargs"),
        (row(["language:response_language"], [{"language": "xx"}]), "cannot take kwargs"),
        (row(["detectable_format:rephrase"], [{}]), "unknown IFEval instruction id"),
        (row(["punctuation:no_comma"], [{}, {}]), "kwargs must be a list of 1"),
        (row([], []), "non-empty list"),
        ({"key": 7, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "prompt must be a string"),
    ],
)  # fmt: skip
def test_bad_rows_raise_value_error_naming_the_row(bad_row, message):
    with pytest.raises(ValueError, match=message) as error:
        ground_truth_from_row(bad_row)
    assert "key=" in str(error.value)
    # The same content given as a ground truth: `verify` refuses the row, with the verifier's own reason.
    truth = json.dumps({k: v for k, v in bad_row.items() if k != "key"})
    with pytest.raises(ValueError, match=message) as from_verifier:
        check_instructions("any answer", truth)
    with pytest.raises(ValueError) as from_check:
        check_ground_truth("google_ifeval", truth)
    assert str(from_check.value) == str(from_verifier.value)


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"kwargs": [{}], "prompt": "p"}, "instruction_id_list must be a non-empty list"),
        ({"instruction_id_list": ["punctuation:no_comma"], "prompt": "p"}, "kwargs must be a list of 1"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "prompt must be a string"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [7], "prompt": "p"}, "must be an object"),
        ({"instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["(c"]}], "prompt": ""},
         "not a valid regex"),
    ],
)  # fmt: skip
def test_check_ground_truth_refuses_what_the_verifier_cannot_use(spec, message):
    with pytest.raises(ValueError, match=message):
        check_ground_truth("google_ifeval", json.dumps(spec))
    for not_an_object in ("{", "[1]", '"text"'):
        with pytest.raises(ValueError, match="not JSON|JSON object"):
            check_ground_truth("google_ifeval", not_an_object)


def test_check_ground_truth_accepts_every_case():
    for instruction_id, (kwargs, _, _) in CASES.items():
        assert check_ground_truth("google_ifeval", ground_truth_from_row(row([instruction_id], [kwargs]))) is None


def test_bad_ground_truth_raises_value_error():
    with pytest.raises(ValueError, match="not JSON"):
        check_instructions("x", "{")
    with pytest.raises(ValueError, match="JSON object"):
        check_instructions("x", "[1]")
    # Google matches keywords as regular expressions; an invalid one is a ground-truth error, not a verdict.
    bad_regex = json.dumps({"instruction_id_list": ["keywords:existence"], "kwargs": [{"keywords": ["(c"]}],
                            "prompt": ""})  # fmt: skip
    with pytest.raises(ValueError, match="not a valid regex"):
        check_instructions("I write (c", bad_regex)


@pytest.mark.parametrize("error", [IndexError("list index out of range"), TypeError("unhashable type: 'list'\nmore")])
def test_checker_crash_on_a_ground_truth_is_reported_as_a_bad_ground_truth(monkeypatch, error):
    """A checker that trips over odd kwargs on the probe answer (any exception, not only ValueError) makes
    `check_ground_truth` raise a one-line ValueError naming the exception, instead of a traceback."""
    import tulu_jax.rewards.ifeval_google as ifeval_google

    def crash(answer, ground_truth):
        raise error

    monkeypatch.setattr(ifeval_google, "check_instructions", crash)
    # A ground truth no other test checks, so that the per-ground-truth cache holds no earlier answer.
    truth = json.dumps({"instruction_id_list": [], "kwargs": [], "prompt": f"crash {type(error).__name__}"})
    with pytest.raises(ValueError) as raised:
        check_ground_truth("google_ifeval", truth)
    message = str(raised.value)
    assert f"{type(error).__name__}: {str(error).splitlines()[0]}" in message
    assert "google_ifeval" in message and "\n" not in message


# The library's own checkers are the reference for the ones rewritten to run in linear time.
REWRITTEN = {
    "detectable_content:number_placeholders": ([{"num_placeholders": n} for n in range(4)], "[]ab \n"),
    "detectable_format:title": ([{}], "<> a\n"),
    "detectable_format:number_bullet_lists": ([{"num_bullets": n} for n in range(4)], "* -\n\ta"),
    "detectable_content:postscript": (
        [{"postscript_marker": m} for m in ("P.S.", "P.P.S", "Note:")],
        "pPsS. \nNote:",
    ),
    "detectable_format:json_format": ([{}], '{}[]"1`json \n'),
}


@pytest.mark.parametrize("instruction_id", sorted(REWRITTEN))
def test_rewritten_checkers_agree_with_the_library(instruction_id):
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    kwargs_options, alphabet = REWRITTEN[instruction_id]
    rng = random.Random(0)
    for kwargs in kwargs_options:
        ours = _build(instruction_id, kwargs)
        reference = INSTRUCTION_DICT[instruction_id](instruction_id)
        reference.build_description(**kwargs)
        assert type(ours) is not type(reference)
        for _ in range(3000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(16)))
            assert ours.check_following(text) == reference.check_following(text), (kwargs, text)


_MB = 1 << 20
ADVERSARIAL = [
    "",
    "\x00" * 1000,
    "\ud800 lone \udfff *x* <<t>>",
    "[" * _MB,
    "<<" * (_MB // 2),
    "*" * _MB,
    "x" + " " * _MB + "x",
    "x" + "\n" * _MB + "x",
    "x" + " \n" * (_MB // 2) + "x",
    "Hello world. " * (_MB // 13),
]
# NLTK's tokenizers run at ~1 MB per 15 s here: linear, but too slow for megabytes in a unit test.
TOKENIZED = ("change_case:capital_word_frequency", "length_constraints:number_sentences")


def test_model_output_never_raises():
    ids = sorted(CASES)
    fast = ground_truth_from_row(
        row([i for i in ids if i not in TOKENIZED], [CASES[i][0] for i in ids if i not in TOKENIZED])
    )
    tokenized = ground_truth_from_row(row(list(TOKENIZED), [CASES[i][0] for i in TOKENIZED]))
    start = time.perf_counter()
    for text in ADVERSARIAL:
        for truth, sample in ((fast, text), (tokenized, text[: 1 << 16])):
            verdicts = check_instructions(sample, truth)
            assert len(verdicts) == len(json.loads(truth)["instruction_id_list"])
            assert all(isinstance(v, bool) for v in verdicts)
    # Linear scans keep this to seconds; Google's quadratic regexes took hours on these answers.
    assert time.perf_counter() - start < 20
