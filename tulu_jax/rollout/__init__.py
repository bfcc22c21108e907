"""Rollouts: the generation interface shared by RLVR, data generation and eval, and its backends."""

from tulu_jax.rollout.types import Completion, RolloutBackend, SamplingParams

__all__ = ["Completion", "RolloutBackend", "SamplingParams"]
