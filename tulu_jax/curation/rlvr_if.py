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


def rlvr_if_row(row: dict, where: str, rng: random.Random, *, min_constraints: int, max_constraints: int) -> dict:
    """The RLVR row for one input row: its fields kept (`source` set to "rlvr-if" when absent), `messages`
    replaced by one user turn holding the row's user text (`rows.user_text`) with the constraints'
    instructions appended, `ground_truth` (google_ifeval JSON), `dataset` ("google_ifeval") and
    `constraints` (instruction ids). Raises DataError naming `where` when the row has no usable prompt."""
    request = user_text(row, where).strip()
    if not request:
        raise DataError(f"{where}: the prompt is blank", "bad_prompt")
    made = make_if_prompt(request, sample_constraints(rng, min_constraints, max_constraints))
    out = {**row, "messages": [{"role": "user", "content": made.pop("prompt")}], **made}
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
    `counts["rows_out"]` the rows yielded."""
    skipped = counts.setdefault("rows_skipped", {})
    per_type = counts.setdefault("constraints", Counter())
    counts.setdefault("rows_out", 0)
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
        yield out
