"""Which verifier scores which dataset, and in-process verification (open-instruct
`ground_truth_utils.py`: the RLVR reward dispatches on the row's `dataset`; Tülu 3 §6).

`verify` has no deadline: use it in tests and inside the Scorer's worker processes, and the Scorer
everywhere else (a response can make sympy compute for minutes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from tulu_jax.rewards.gsm8k import check_gsm8k_ground_truth, verify_gsm8k
from tulu_jax.rewards.math_answer import verify_math
from tulu_jax.rewards.text import answer_text
from tulu_jax.rewards.verdict import Verdict


class UnknownDataset(ValueError):
    """A dataset name no verifier handles; the message lists the known names."""


def _gsm8k(answer: str, ground_truth: str, legacy: frozenset[str]) -> bool:
    return verify_gsm8k(answer, ground_truth)


def _math(answer: str, ground_truth: str, legacy: frozenset[str]) -> bool:
    return verify_math(answer, ground_truth)


def _ifeval(answer: str, ground_truth: str, legacy: frozenset[str]) -> bool:
    from tulu_jax.rewards.ifeval import verify_ifeval

    return verify_ifeval(answer, ground_truth, legacy)


def _google_ifeval(answer: str, ground_truth: str, legacy: frozenset[str]) -> tuple[bool, ...]:
    from tulu_jax.rewards.ifeval_google import check_instructions

    return tuple(check_instructions(answer, ground_truth))


# (answer text, ground truth, IF functions run with 2024 semantics) -> pass, or per-instruction passes.
VERIFIERS: dict[str, Callable[[str, str, frozenset[str]], bool | tuple[bool, ...]]] = {
    "gsm8k": _gsm8k,
    "math": _math,
    "ifeval": _ifeval,
    "google_ifeval": _google_ifeval,
}


def canonical_dataset(name: str) -> str:
    """The VERIFIERS key of a dataset name, case-insensitive (Tülu's rows say `gsm8k`, `MATH`, `ifeval`).
    Raises UnknownDataset listing the known names."""
    key = name.lower() if isinstance(name, str) else name
    if key not in VERIFIERS:
        raise UnknownDataset(f"unknown dataset {name!r}; known: {', '.join(sorted(VERIFIERS))}")
    return key


def verify(dataset: str, model_output: str, ground_truth: str | None, legacy: frozenset[str] = frozenset()) -> Verdict:
    """Scores one response in this process, without a deadline. `model_output` may hold the prompt: only
    the text after the last `<|assistant|>\\n` is checked. A None ground truth scores 0 (as in the
    reference). `legacy` names the IF functions run with 2024 semantics. Returns a Verdict with status
    "ok"; `details` holds google_ifeval's per-instruction results. Raises UnknownDataset; exceptions of
    a verifier propagate."""
    name = canonical_dataset(dataset)
    if ground_truth is None:
        return Verdict(0.0, name, "ok", None)
    result = VERIFIERS[name](answer_text(model_output), ground_truth, legacy)
    if isinstance(result, tuple):
        return Verdict(float(all(result)), name, "ok", tuple(bool(r) for r in result))
    return Verdict(float(bool(result)), name, "ok", None)


def _check_answer_text(ground_truth: str) -> None:
    if not ground_truth.strip():
        raise ValueError("must be a non-empty string (the reference answer)")


def _check_gsm8k(ground_truth: str) -> None:
    _check_answer_text(ground_truth)
    check_gsm8k_ground_truth(ground_truth)


def _check_ifeval(ground_truth: str) -> None:
    from tulu_jax.rewards.ifeval import parse_ground_truth

    parse_ground_truth(ground_truth)


def _check_google_ifeval(ground_truth: str) -> None:
    from tulu_jax.rewards.ifeval_google import check_ground_truth as check_google

    check_google(ground_truth)


# The same ValueError the dataset's verifier would raise on this ground truth, for any response.
_GROUND_TRUTH_CHECKS: dict[str, Callable[[str], None]] = {
    "gsm8k": _check_gsm8k,
    "math": _check_answer_text,
    "ifeval": _check_ifeval,
    "google_ifeval": _check_google_ifeval,
}


@functools.lru_cache(maxsize=1 << 16)
def _ground_truth_problem(name: str, ground_truth: str) -> str | None:
    # Cached: RLVR data repeats a few thousand ground truths over hundreds of thousands of rows.
    check = _GROUND_TRUTH_CHECKS.get(name)  # verifiers added by a plugin have none
    try:
        if check is not None:
            check(ground_truth)
    except ValueError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a checker tripping on odd kwargs is a bad ground truth, not a crash
        reason = " ".join(str(e).split())  # one line
        return f"ground truth breaks the {name} checks ({type(e).__name__}: {reason:.200})"
    return None


def check_ground_truth(dataset: str, ground_truth: str) -> None:
    """Raises ValueError (a one-line reason) when `ground_truth` is malformed for `dataset`'s verifier, so
    every response would score 0 with status "error" (or the same score whatever the response): gsm8k needs
    a number the extraction pattern can match (after `gsm8k.gsm8k_ground_truth`'s normalisation), math a
    non-empty string; ifeval the JSON
    `{"func_name": ..., **kwargs}` that `ifeval.parse_ground_truth` accepts; google_ifeval the JSON
    `{"instruction_id_list": [...], "kwargs": [{...}], "prompt": "..."}` that
    `ifeval_google.check_ground_truth` accepts. Pure and cached per distinct (dataset, ground_truth).
    Raises UnknownDataset (a ValueError) for an unknown dataset. Mirrors the validation of open-instruct
    `ground_truth_utils.py`'s verifiers, which would instead fail on every response."""
    name = canonical_dataset(dataset)
    if not isinstance(ground_truth, str):
        raise ValueError(f"must be a string, got {type(ground_truth).__name__}")
    problem = _ground_truth_problem(name, ground_truth)
    if problem is not None:
        raise ValueError(problem)
