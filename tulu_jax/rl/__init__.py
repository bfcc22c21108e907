"""The pure math of RLVR (Tülu 3 §6): per-token rewards and KL estimators, GAE and group advantages, and the
clipped policy/value losses of PPO and the GRPO family. All functions are jit-able jax.numpy on float32."""

from tulu_jax.rl.advantages import constant_groups, gae, group_advantages, masked_whiten
from tulu_jax.rl.losses import (
    AGGREGATIONS,
    aggregate,
    entropy_from_logits,
    masked_mean,
    policy_loss,
    truncated_importance_weights,
    value_loss,
)
from tulu_jax.rl.rewards import KL_ESTIMATORS, apply_non_stop_penalty, kl_penalty, response_masks, token_rewards

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "aggregate",
    "apply_non_stop_penalty",
    "constant_groups",
    "entropy_from_logits",
    "gae",
    "group_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "response_masks",
    "token_rewards",
    "truncated_importance_weights",
    "value_loss",
]
