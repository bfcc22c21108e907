"""Rollouts: the generation interface shared by RLVR, data generation and eval, and its backends."""

from tulu_jax.rollout.types import (
    FINISH_CODES,
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    RolloutBackend,
    RolloutBatch,
    SamplingParams,
    batch_completions,
)

__all__ = [
    "FINISH_CODES",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Completion",
    "RolloutBackend",
    "RolloutBatch",
    "SamplingParams",
    "batch_completions",
]
