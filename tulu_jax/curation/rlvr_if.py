"""RLVR instruction-following prompts from any prompts (Tülu 3 §3.1 and §6): each prompt gets 1-3 verifiable
constraints appended (`tulu_jax.curation.if_constraints`) and the `google_ifeval` ground truth that checks
them, so `tulu-jax rlvr` can reward responses that meet every constraint. Tülu 3 built its IF RLVR set the
same way: prompts with IFEval-style constraints whose ground truths a verifier checks (open-instruct
`ground_truth_utils.py`)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from tulu_jax.curation.if_constraints import make_if_prompt, sample_constraints
from tulu_jax.curation.rows import user_text
from tulu_jax.data.chat import DataError

SOURCE = "rlvr-if"


def row_rng(seed: int, index: int) -> random.Random:
    """The generator for the `index`-th row (0-based among the rows read): one per row, so a row's
    constraints depend only on the seed and its position."""
    return random.Random(f"rlvr-if:{seed}:{index}")


def _conversation(row: dict, where: str) -> tuple[list[dict], int]:
    """The conversation an RLVR prompt asks (the turns up to and including the last user turn) and how
    many trailing assistant turns were dropped, from `messages`, else `chosen` (a preference row), else a
    string `prompt` (one user turn). Raises DataError naming `where` when none is usable."""
    user_text(row, where)  # one check of the fields, with its error messages
    for field in ("messages", "chosen"):
        if row.get(field) is not None:
            turns = [dict(m) for m in row[field]]
            break
    else:
        turns = [{"role": "user", "content": row["prompt"]}]
    dropped = 0
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
        dropped += 1
    if not turns or turns[-1]["role"] != "user":
        last = turns[-1]["role"] if turns else "nothing"
        raise DataError(
            f"{where}: the conversation must end with a user turn (before any answer), ends with {last}", "no_user_turn"
        )
    if not turns[-1]["content"].strip():
        raise DataError(f"{where}: the last user turn is blank", "bad_prompt")
    return turns, dropped


# Fields an RLVR row gets new values for; the input's values move to original_<field>.
_REPLACED = ("messages", "prompt", "ground_truth", "dataset")


def rlvr_if_row(row: dict, where: str, rng: random.Random, *, min_constraints: int, max_constraints: int) -> dict:
    """The RLVR row for one input row: its fields kept (`source` set to "rlvr-if" when absent); `messages`
    the row's conversation (`messages`, else `chosen`, else a `prompt` string as one user turn) up to its
    last user turn, i.e. trailing assistant turns dropped (the RLVR policy writes that answer), with the
    constraints' instructions appended to that last user turn; `ground_truth` (google_ifeval JSON checking
    them, its prompt the last user turn), `dataset` ("google_ifeval"), `constraints` (instruction ids) and
    `dropped_turns` (how many trailing assistant turns were removed) added. The fields this replaces keep
    their old values under `original_<field>`: `messages` and a `prompt` string (so the row holds one prompt,
    the constrained one), `ground_truth` and `dataset` (the reward now checks the constraints only). Raises
    DataError naming `where` when the row has no usable prompt, or already has an `original_<field>`
    (constraints were added to it before)."""
    turns, dropped = _conversation(row, where)
    for field in _REPLACED:
        if f"original_{field}" in row:
            raise DataError(
                f"{where}: already has 'original_{field}': constraints were added to it before", "already_rlvr_if"
            )
    made = make_if_prompt(turns[-1]["content"].strip(), sample_constraints(rng, min_constraints, max_constraints))
    turns[-1]["content"] = made.pop("prompt")
    out = dict(row)
    for field in _REPLACED:
        if field in out:
            out[f"original_{field}"] = out.pop(field)
    out.update(messages=turns, dropped_turns=dropped, **made)
    out.setdefault("source", SOURCE)
    return out


def rlvr_if_rows(
    rows: Iterable[tuple[str, dict]],
    *,
    seed: int,
    min_constraints: int = 1,
    max_constraints: int = 3,
    on_bad_row: str = "error",
    counts: dict[str, Any],
) -> Iterator[dict]:
    """`rlvr_if_row` for every (where, row), in order, deterministic given `seed`. A row without a usable
    prompt raises DataError under on_bad_row="error", or is counted in `counts["rows_skipped"][reason]`
    under "skip". `counts["constraints"]` (a Counter) receives the instruction ids drawn,
    `counts["rows_out"]` the rows yielded, `counts["dropped_answers"]` the rows whose trailing assistant
    turns were dropped and `counts["kept_ground_truth"]` the rows whose old ground truth moved to
    `original_ground_truth`."""
    skipped = counts.setdefault("rows_skipped", {})
    per_type = counts.setdefault("constraints", Counter())
    for k in ("rows_out", "dropped_answers", "kept_ground_truth"):
        counts.setdefault(k, 0)
    for index, (where, row) in enumerate(rows):
        try:
            out = rlvr_if_row(
                row, where, row_rng(seed, index), min_constraints=min_constraints, max_constraints=max_constraints
            )
        except DataError as e:
            if on_bad_row == "error":
                raise
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        per_type.update(out["constraints"])
        counts["rows_out"] += 1
        counts["dropped_answers"] += out["dropped_turns"] > 0
        counts["kept_ground_truth"] += "original_ground_truth" in out
        yield out
