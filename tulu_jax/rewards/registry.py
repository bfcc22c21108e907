"""Which verifier scores which dataset, and in-process verification (open-instruct
`ground_truth_utils.py`: the RLVR reward dispatches on the row's `dataset`; Tülu 3 §6).

`verify` has no deadline: use it in tests and inside the Scorer's worker processes, and the Scorer
everywhere else (a response can make sympy compute for minutes).
"""

from __future__ import annotations

from collections.abc import Callable

from tulu_jax.rewards.gsm8k import verify_gsm8k
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
