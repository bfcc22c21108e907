"""IF constraint catalogue (tulu_jax.curation.if_constraints) and `tulu-jax data rlvr-if`."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from tulu_jax.cli import main
from tulu_jax.curation.if_constraints import (
    CONFLICTS,
    CONSTRAINT_TYPES,
    DATASET,
    LANGUAGES,
    Constraint,
    make_if_prompt,
    sample_constraints,
)
from tulu_jax.rewards.ifeval_google import instruction_ids
from tulu_jax.rewards.registry import check_ground_truth, verify

REQUEST = "Tell me about rivers."

# id -> (kwargs, a response meeting the constraint, one breaking it). Written by hand from the wording.
CASES = {
    "keywords:existence": ({"keywords": ["harbor", "meadow"]}, "The harbor by the meadow.", "The harbor at dawn."),
    "keywords:frequency": (
        {"keyword": "bridge", "relation": "at least", "frequency": 2},
        "A bridge and another bridge.",
        "One bridge only.",
    ),
    "keywords:forbidden_words": ({"forbidden_words": ["just", "very"]}, "It is quite nice.", "It is very nice."),
    "keywords:letter_frequency": (
        {"letter": "e", "let_relation": "at least", "let_frequency": 5},
        "Eleven trees here.",
        "A big cat.",
    ),
    "language:response_language": (
        {"language": "de"},
        "Der Hund läuft jeden Morgen durch den Park und trinkt danach Wasser aus dem Brunnen.",
        "The dog runs through the park every morning and drinks water from the fountain afterwards.",
    ),
    "length_constraints:number_sentences": (
        {"relation": "less than", "num_sentences": 3},
        "The sky is blue. The grass is green.",
        "The sky is blue. The grass is green. The sun is warm. The sea is wide.",
    ),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2},
        "Rivers flow downhill.\n***\nThey reach the sea.",
        "Rivers flow downhill to the sea.",
    ),
    "length_constraints:number_words": (
        {"relation": "at least", "num_words": 6},
        "Rivers carry water from hills to seas.",
        "Rivers flow.",
    ),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "finally"},
        "Rivers flow downhill.\n\nFinally, they reach the sea.",
        "Rivers flow downhill.\n\nThey reach the sea.",
    ),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        "Meet at [place] on [day].",
        "Meet at [place] on Monday.",
    ),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."},
        "Rivers are long.\n\nP.S. Bring boots.",
        "Rivers are long.",
    ),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* Nile\n* Amazon", "* Nile\n* Amazon\n* Rhine"),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Sure thing."),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        "The *Nile* and the *Amazon* are long.",
        "The *Nile* is long.",
    ),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nThe Nile.\nSection 2\nThe Amazon.",
        "Section 1\nThe Nile and the Amazon.",
    ),
    "detectable_format:json_format": ({}, '{"river": "Nile"}', "river: Nile"),
    "detectable_format:title": ({}, "<<Rivers>>\nThey flow.", "Rivers\nThey flow."),
    "combination:two_responses": ({}, "The Nile.\n******\nThe Amazon.", "The Nile."),
    "combination:repeat_prompt": ({}, REQUEST + " Rivers flow to the sea.", "Rivers flow to the sea."),
    "startend:end_checker": (
        {"end_phrase": "That is my answer."},
        "The Nile. That is my answer.",
        "That is my answer. The Nile.",
    ),
    "change_case:capital_word_frequency": (
        {"capital_relation": "at least", "capital_frequency": 2},
        "The NILE is VERY long.",
        "The Nile is long.",
    ),
    "change_case:english_capital": (
        {},
        "THE NILE IS THE LONGEST RIVER IN AFRICA.",
        "The Nile is the longest river in Africa.",
    ),
    "change_case:english_lowercase": (
        {},
        "the nile is the longest river in africa.",
        "The Nile is the longest river in Africa.",
    ),
    "punctuation:no_comma": ({}, "Yes it is long.", "Yes, it is long."),
    "startend:quotation": ({}, '"The Nile is long."', "The Nile is long."),
}


def test_catalogue_covers_every_instruction_the_verifier_checks():
    assert set(CONSTRAINT_TYPES) == set(instruction_ids()) == set(CASES)


@pytest.mark.parametrize("cid", sorted(CASES))
def test_instruction_and_ground_truth_agree(cid):
    """A response written to the instruction's wording verifies 1 under the ground truth; one breaking it 0."""
    kwargs, good, bad = CASES[cid]
    made = make_if_prompt(REQUEST, [Constraint(cid, kwargs)])
    assert made["dataset"] == DATASET and made["constraints"] == [cid]
    check_ground_truth(DATASET, made["ground_truth"])
    assert verify(DATASET, good, made["ground_truth"]).score == 1.0
    assert verify(DATASET, bad, made["ground_truth"]).score == 0.0
    # The instruction carries every drawn value (numbers, words, markers) the verifier will check.
    instruction = made["prompt"].split("\n\n", 1)[1]
    for key, value in kwargs.items():
        if key in ("relation", "let_relation", "capital_relation"):
            assert ("fewer than" if value == "less than" else "at least") in instruction
        elif key == "language":
            assert LANGUAGES[value] in instruction
        else:
            for v in value if isinstance(value, list) else [value]:
                assert str(v) in instruction, (key, v, instruction)


def test_repeat_prompt_ground_truth_holds_the_request():
    made = make_if_prompt(REQUEST, [Constraint("combination:repeat_prompt", {})])
    gt = json.loads(made["ground_truth"])
    assert gt["kwargs"] == [{"prompt_to_repeat": REQUEST}] and gt["prompt"] == made["prompt"]
    assert made["prompt"].startswith(REQUEST + "\n\n")


def test_conflicts_are_symmetric_and_rule_out_contradictions():
    for a, others in CONFLICTS.items():
        assert a in others
        for b in others:
            assert a in CONFLICTS[b], (a, b)
    assert "change_case:english_capital" in CONFLICTS["change_case:english_lowercase"]
    assert CONFLICTS["detectable_format:constrained_response"] == frozenset(CONSTRAINT_TYPES)


def test_sampling_is_deterministic_compatible_and_reaches_every_type():
    def draw(seed):
        rng = random.Random(seed)
        return [sample_constraints(rng, 1, 3) for _ in range(1500)]

    first, again = draw(7), draw(7)
    assert first == again and first != draw(8)
    sizes, seen = Counter(), Counter()
    for cs in first:
        ids = [c.id for c in cs]
        sizes[len(ids)] += 1
        seen.update(ids)
        for i, a in enumerate(ids):
            assert not any(b in CONFLICTS[a] for b in ids[i + 1 :]), ids
        made = make_if_prompt(REQUEST, cs)  # raises if a ground truth fails check_ground_truth
        assert json.loads(made["ground_truth"])["instruction_id_list"] == ids
    assert set(seen) == set(CONSTRAINT_TYPES)
    assert set(sizes) == {1, 2, 3}
    rng = random.Random(0)
    assert all(len(sample_constraints(rng, 2, 2)) == 2 for _ in range(100))


def test_forbidden_words_never_collide_with_mandated_text():
    from tulu_jax.curation import if_constraints as ic

    mandated = " ".join(ic.KEYWORDS + ic.FIRST_WORDS + ic.END_PHRASES + ("Section", "SECTION", "P.S.", "P.P.S"))
    words = set(mandated.lower().replace("?", " ").replace(".", " ").replace("!", " ").split())
    assert not words & set(ic.FORBIDDEN)


def test_a_response_meeting_three_constraints_verifies():
    cs = [
        Constraint("keywords:existence", {"keywords": ["meadow"]}),
        Constraint("punctuation:no_comma", {}),
        Constraint("detectable_format:title", {}),
    ]
    made = make_if_prompt(REQUEST, cs)
    assert verify(DATASET, "<<Rivers>>\nA river crosses the meadow.", made["ground_truth"]).score == 1.0
    verdict = verify(DATASET, "<<Rivers>>\nA river, wide and slow.", made["ground_truth"])
    assert verdict.score == 0.0 and verdict.details == (False, False, True)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_writes_verifiable_rows_deterministically(tmp_path, capsys):
    rows = [
        {
            "id": "a",
            "messages": [{"role": "user", "content": "Describe a harbor."}, {"role": "assistant", "content": "x"}],
        },
        {"id": "b", "prompt": "Plan a picnic.", "source": "mine"},
        {"prompt": "Explain tides."},
    ]
    _write(tmp_path / "in.jsonl", rows)
    out1, out2 = tmp_path / "o1.jsonl", tmp_path / "o2.jsonl"
    for out in (out1, out2):
        assert main(["data", "rlvr-if", "--prompts", str(tmp_path / "in.jsonl"), "--out", str(out), "--seed", "3"]) == 0
    assert out1.read_text() == out2.read_text()
    got = [json.loads(line) for line in out1.read_text().splitlines()]
    assert [r.get("id") for r in got] == ["a", "b", None]
    assert [r["source"] for r in got] == ["rlvr-if", "mine", "rlvr-if"]
    for src, r in zip(rows, got):
        request = src["messages"][0]["content"] if "messages" in src else src["prompt"]
        assert r["messages"][0]["role"] == "user" and len(r["messages"]) == 1
        assert r["messages"][0]["content"].startswith(request + "\n\n")
        assert r["dataset"] == "google_ifeval" and 1 <= len(r["constraints"]) <= 3
        check_ground_truth(r["dataset"], r["ground_truth"])
    table = capsys.readouterr().out
    assert "rows in" in table and "rows out" in table
    assert sum(Counter(c for r in got for c in r["constraints"]).values()) == sum(len(r["constraints"]) for r in got)
    again = ["data", "rlvr-if", "--prompts", str(tmp_path / "in.jsonl"), "--out", str(out2), "--seed", "4"]
    assert main(again) == 2  # an existing --out needs --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    assert out1.read_text() != out2.read_text()


def test_cli_bad_rows_and_flags(tmp_path, capsys):
    _write(tmp_path / "in.jsonl", [{"prompt": "Plan a picnic."}, {"text": "no prompt here"}])
    args = ["data", "rlvr-if", "--prompts", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "in.jsonl line 2" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()
    assert main(args + ["--on-bad-row", "skip"]) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 1
    assert "skipped: no_prompt" in capsys.readouterr().out
    assert main(args + ["--min-constraints", "2", "--max-constraints", "1"]) == 2
    assert "--min-constraints" in capsys.readouterr().err
    assert main(["data", "rlvr-if", "--prompts", str(tmp_path / "missing.jsonl"), "--out", "x.jsonl"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_multi_turn_rows_keep_the_conversation(tmp_path):
    """Constraints go on the last user turn; earlier turns stay; a trailing answer is dropped and counted
    (the RLVR policy writes it); a preference row's `chosen` is read the same way."""
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Nile."},
        {"role": "user", "content": "Describe its delta."},
        {"role": "assistant", "content": "It is wide."},
    ]
    rows = [
        {"id": "m", "messages": convo},
        {"id": "c", "chosen": convo[1:4], "rejected": convo[1:3] + [{"role": "user", "content": "x"}]},
    ]
    _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "o.jsonl"
    assert main(["data", "rlvr-if", "--prompts", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 0
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    m, c = got["m"], got["c"]
    assert m["messages"][:3] == convo[:3] and len(m["messages"]) == 4 and m["dropped_turns"] == 1
    assert c["messages"][:2] == convo[1:3] and len(c["messages"]) == 3 and c["dropped_turns"] == 0
    for r in (m, c):
        last = r["messages"][-1]
        assert last["role"] == "user" and last["content"].startswith("Describe its delta.\n\n")
        assert json.loads(r["ground_truth"])["prompt"] == last["content"]
        check_ground_truth(r["dataset"], r["ground_truth"])
    assert rows[0]["messages"] == convo  # the input row is not changed in place


def test_existing_ground_truth_is_kept_under_original(tmp_path, capsys):
    _write(
        tmp_path / "in.jsonl",
        [{"prompt": "Add 2 and 3.", "ground_truth": "5", "dataset": "gsm8k"}, {"prompt": "Plan a picnic."}],
    )
    out = tmp_path / "o.jsonl"
    assert main(["data", "rlvr-if", "--prompts", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 0
    a, b = map(json.loads, out.read_text().splitlines())
    assert (a["original_ground_truth"], a["original_dataset"], a["dataset"]) == ("5", "gsm8k", DATASET)
    check_ground_truth(a["dataset"], a["ground_truth"])
    assert "original_ground_truth" not in b and "original_dataset" not in b
    assert re.search(r"old ground_truth kept as original_ground_truth\s+1\b", capsys.readouterr().out)
    # Feeding the output back in would stack constraints on a row whose first ones are already set aside.
    again = tmp_path / "again.jsonl"
    assert main(["data", "rlvr-if", "--prompts", str(out), "--out", str(again)]) == 2
    err = capsys.readouterr().err.strip()
    assert "o.jsonl line 1: already has 'original_" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "Hi."}, {"role": "system", "content": "x"}], "ends with system"),
        ([{"role": "assistant", "content": "Hello."}], "has no user turn"),
        ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "last user turn is blank"),
    ],
)
def test_a_conversation_without_a_last_user_turn_is_a_bad_row(tmp_path, capsys, messages, expected):
    _write(tmp_path / "in.jsonl", [{"messages": messages}])
    assert main(["data", "rlvr-if", "--prompts", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "in.jsonl line 1" in err and expected in err and len(err.splitlines()) == 1


def test_out_may_not_be_the_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    _write(prompts, [{"prompt": "Plan a picnic."}])
    before = prompts.read_text()
    for out in (prompts, tmp_path / "link.jsonl"):
        if out != prompts:
            out.symlink_to(prompts)
        assert main(["data", "rlvr-if", "--prompts", str(prompts), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--out {out}: is --prompts" in err and len(err.splitlines()) == 1
    assert prompts.read_text() == before
    with pytest.raises(SystemExit):  # argparse choices
        main(["data", "rlvr-if", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--on-bad-row", "x"])


def test_a_prompt_string_moves_to_original_prompt(tmp_path, capsys):
    """The row holds one prompt, the constrained one: a `prompt` (or `messages`) it had is set aside."""
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"id": 7, "prompt": "Describe a lighthouse."}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["data", "rlvr-if", "--prompts", str(src), "--out", str(out), "--seed", "1"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "prompt" not in row and row["original_prompt"] == "Describe a lighthouse."
    assert row["messages"][-1]["content"].startswith("Describe a lighthouse.") and row["id"] == 7
    assert json.loads(row["ground_truth"])["prompt"] == row["messages"][-1]["content"]
