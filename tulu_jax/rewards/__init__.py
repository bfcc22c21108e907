"""RLVR verifiers (Tülu 3 §6; open-instruct `ground_truth_utils.py`): GSM8K, MATH and IF-constraint checks
of a response against its ground truth, and a process pool that runs them under a hard deadline."""

from tulu_jax.rewards.gsm8k import extract_gsm8k_answer, gsm8k_ground_truth, verify_gsm8k
from tulu_jax.rewards.math_answer import (
    hendrycks_is_equiv,
    math_candidates,
    normalize_final_answer,
    refusal_reason,
    strip_string,
    symbolic_equiv,
    verify_math,
)
from tulu_jax.rewards.registry import VERIFIERS, UnknownDataset, canonical_dataset, check_ground_truth, verify
from tulu_jax.rewards.scorer import Scorer, VerifyItem
from tulu_jax.rewards.text import answer_text
from tulu_jax.rewards.verdict import Verdict

__all__ = [
    "VERIFIERS",
    "Scorer",
    "UnknownDataset",
    "Verdict",
    "VerifyItem",
    "answer_text",
    "canonical_dataset",
    "check_ground_truth",
    "extract_gsm8k_answer",
    "gsm8k_ground_truth",
    "hendrycks_is_equiv",
    "math_candidates",
    "normalize_final_answer",
    "refusal_reason",
    "strip_string",
    "symbolic_equiv",
    "verify",
    "verify_gsm8k",
    "verify_math",
]
