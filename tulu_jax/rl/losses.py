"""RLVR losses: the clipped PPO/GRPO policy loss, the clipped value loss, their token aggregations,
truncated importance weights and the entropy of the policy's logits.

PPO as Tülu 3 §6 (RLVR) of Lambert et al. 2024 trains it (open-instruct's
`open_instruct/ppo_vllm_thread_ray_gtrl.py`); GRPO as open-instruct's `grpo_fast.py`. Clip-higher and
token-level aggregation from DAPO (Yu et al. 2025); constant-normalised aggregation from Dr. GRPO (Liu et al.
2025); truncated importance sampling from Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training".

Dimension legend: B batch rows, T response positions, V vocabulary. Masks are float32 0/1 [B, T].
Per-token values at masked-out positions never reach a result, even when they are inf or NaN.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

AGGREGATIONS = ("token", "sequence", "constant")


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _masked(x_BxT: Array, mask_BxT: Array) -> Array:
    # where, not multiply: 0 · inf is NaN.
    return jnp.where(mask_BxT > 0, _f32(x_BxT) * mask_BxT, 0.0)


def masked_mean(x: Array, mask: Array) -> Array:
    """Σ x·m / max(Σ m, 1) over all elements, a float32 scalar (0 for an empty mask). `masked_mean` of
    open-instruct's `ppo_vllm_thread_ray_gtrl.py`, guarded against division by zero."""
    mask = _f32(mask)
    return jnp.sum(_masked(x, mask)) / jnp.maximum(jnp.sum(mask), 1.0)


def aggregate(per_token_BxT: Array, mask_BxT: Array, mode: str, *, max_length: int | None = None) -> Array:
    """Reduce per-token losses [B, T] to a float32 scalar.

    "token": Σ x·m / Σ m over the whole batch (`masked_mean` of open-instruct; DAPO's token-level loss, every
    token weighs the same). "sequence": the mean, over rows with at least one masked token, of each row's
    masked mean (the original GRPO; every response weighs the same). "constant": Σ x·m / (B · max_length),
    max_length defaulting to T (Dr. GRPO: a constant normaliser, no length bias). An empty mask gives 0.
    Raises ValueError (at trace time) for a mode not in AGGREGATIONS.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {AGGREGATIONS}")
    mask_BxT = _f32(mask_BxT)
    x_BxT = _masked(per_token_BxT, mask_BxT)
    if mode == "token":
        return jnp.sum(x_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)
    if mode == "sequence":
        count_B = jnp.sum(mask_BxT, axis=1)
        row_means_B = jnp.sum(x_BxT, axis=1) / jnp.maximum(count_B, 1.0)
        rows = jnp.sum(count_B > 0, dtype=jnp.float32)
        return jnp.sum(row_means_B) / jnp.maximum(rows, 1.0)  # empty rows have mean 0 and are not counted
    batch, width = mask_BxT.shape
    return jnp.sum(x_BxT) / jnp.float32(batch * (width if max_length is None else max_length))


def policy_loss(
    logps_BxT: Array,
    old_logps_BxT: Array,
    advantages_BxT: Array,
    mask_BxT: Array,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: str = "token",
    importance_weights_BxT: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Clipped surrogate policy loss (PPO/GRPO): (loss float32 scalar, stats dict of float32 scalars).

    ρ = exp(logps − old_logps); per token max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)), times
    `importance_weights_BxT` when given (truncated IS weights, see `truncated_importance_weights`; treated as
    constants), reduced by `aggregate(…, aggregation)`. clip_high None means clip_low; a larger clip_high is
    DAPO's clip-higher. Inputs [B, T] float32; advantages broadcast per token (GRPO: the row's advantage).

    stats: "clipfrac" (share of masked tokens where the clipped term is strictly the larger, the reference's
    `(pg_losses2 > pg_losses)` masked mean), "approxkl" (½ masked mean of (logps − old_logps)²), "ratio"
    (masked mean of ρ), "ratio_var" (masked population variance of ρ). Stats carry no gradient.
    Raises ValueError (at trace time) for an aggregation not in AGGREGATIONS.
    Source: open-instruct's `ppo_vllm_thread_ray_gtrl.py` and `grpo_fast.py`.
    """
    mask_BxT = _f32(mask_BxT)
    on_BxT = mask_BxT > 0
    clip_high = clip_low if clip_high is None else clip_high
    # Padding log-probs may be anything; exp of their difference must not overflow into the loss or its grad.
    log_ratio_BxT = jnp.where(on_BxT, _f32(logps_BxT) - _f32(old_logps_BxT), 0.0)
    ratio_BxT = jnp.exp(log_ratio_BxT)
    advantages_BxT = _f32(advantages_BxT)
    unclipped_BxT = -advantages_BxT * ratio_BxT
    clipped_BxT = -advantages_BxT * jnp.clip(ratio_BxT, 1.0 - clip_low, 1.0 + clip_high)
    per_token_BxT = jnp.maximum(unclipped_BxT, clipped_BxT)
    if importance_weights_BxT is not None:
        per_token_BxT = per_token_BxT * jax.lax.stop_gradient(_f32(importance_weights_BxT))
    loss = aggregate(per_token_BxT, mask_BxT, aggregation)

    ratio_BxT = jax.lax.stop_gradient(ratio_BxT)
    log_ratio_BxT = jax.lax.stop_gradient(log_ratio_BxT)
    mean_ratio = masked_mean(ratio_BxT, mask_BxT)
    stats = {
        "clipfrac": masked_mean(jax.lax.stop_gradient(clipped_BxT > unclipped_BxT), mask_BxT),
        "approxkl": 0.5 * masked_mean(jnp.square(log_ratio_BxT), mask_BxT),
        "ratio": mean_ratio,
        "ratio_var": masked_mean(jnp.square(ratio_BxT - mean_ratio), mask_BxT),
    }
    return loss, stats


def value_loss(
    values_BxT: Array,
    old_values_BxT: Array,
    returns_BxT: Array,
    mask_BxT: Array,
    *,
    clip: float = 0.2,
    aggregation: str = "token",
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss: (loss float32 scalar, stats dict of float32 scalars).

    V' = old + clip(values − old, −clip, clip); loss = ½ · aggregate(max((V − R)², (V' − R)²)). Inputs
    [B, T] float32; `mask_BxT` is the value mask. stats "clipfrac": share of masked tokens where the clipped
    error is strictly the larger (`vf_clipfrac` of open-instruct's `ppo_vllm_thread_ray_gtrl.py`).
    Raises ValueError (at trace time) for an aggregation not in AGGREGATIONS.
    """
    values_BxT, old_values_BxT, returns_BxT = _f32(values_BxT), _f32(old_values_BxT), _f32(returns_BxT)
    clipped_values_BxT = old_values_BxT + jnp.clip(values_BxT - old_values_BxT, -clip, clip)
    unclipped_err_BxT = jnp.square(values_BxT - returns_BxT)
    clipped_err_BxT = jnp.square(clipped_values_BxT - returns_BxT)
    loss = 0.5 * aggregate(jnp.maximum(unclipped_err_BxT, clipped_err_BxT), mask_BxT, aggregation)
    clipfrac = masked_mean(jax.lax.stop_gradient(clipped_err_BxT > unclipped_err_BxT), mask_BxT)
    return loss, {"clipfrac": clipfrac}


def truncated_importance_weights(trainer_logps_BxT: Array, sampler_logps_BxT: Array, cap: float) -> Array:
    """min(exp(trainer_logps − sampler_logps), cap), float32 [B, T], without gradient.

    Corrects for the mismatch between the sampler's (vLLM's) and the trainer's probabilities of the same
    tokens: truncated importance sampling (TIS) of Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training". Pass the result as `policy_loss(importance_weights_BxT=…)`.
    """
    ratio_BxT = jnp.exp(_f32(trainer_logps_BxT) - _f32(sampler_logps_BxT))
    return jax.lax.stop_gradient(jnp.minimum(ratio_BxT, jnp.float32(cap)))


def entropy_from_logits(logits_BxTxV: Array) -> Array:
    """Entropy −Σ_v p_v·log p_v of softmax(logits) per position, float32 [B, T] from logits [B, T, V] of any
    float dtype (computed in float32). log_softmax keeps large logits finite, and vocabulary entries with
    probability 0 (−inf logits) add 0. The `entropy` statistic of open-instruct's `grpo_fast.py`."""
    logps_BxTxV = jax.nn.log_softmax(_f32(logits_BxTxV), axis=-1)
    probs_BxTxV = jnp.exp(logps_BxTxV)
    return -jnp.sum(jnp.where(probs_BxTxV > 0, probs_BxTxV * logps_BxTxV, 0.0), axis=-1)
