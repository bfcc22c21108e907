"""Advantage estimators of RLVR: GAE for PPO, masked whitening, and group-relative advantages (GRPO family).

PPO with GAE as Tülu 3 §6 (RLVR) of Lambert et al. 2024 trains it (open-instruct's
`open_instruct/ppo_vllm_thread_ray_gtrl.py`); GRPO's group baseline as open-instruct's `grpo_fast.py`;
Dr. GRPO (Liu et al. 2025) drops the std division; DAPO (Yu et al. 2025) filters constant groups.

Dimension legend: B batch rows, T response positions, G groups (prompts), N samples per group.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def gae(rewards_BxT: Array, values_BxT: Array, mask_BxT: Array, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation: (advantages, returns), both float32 [B, T].

    A reverse `jax.lax.scan` over T with δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}, R_t = A_t + V_t
    and V_T = 0, A_T = 0. Rewards and values where mask == 0 count as 0, and advantages and returns are 0
    there. `mask_BxT` is the value mask of `tulu_jax.rl.rewards.response_masks` (1 up to one step past the
    last token), a contiguous prefix per row, so zeroing the masked positions is the same as open-instruct's
    loop over the whole width with masked values (`ppo_vllm_thread_ray_gtrl.py`). Whitening the advantages
    (over the policy mask) is `masked_whiten`, left to the caller.
    """
    mask_BxT = _f32(mask_BxT)
    on_BxT = mask_BxT > 0
    rewards_BxT = jnp.where(on_BxT, _f32(rewards_BxT), 0.0)
    values_BxT = jnp.where(on_BxT, _f32(values_BxT), 0.0)
    gamma, lam = _f32(gamma), _f32(lam)

    def step(carry, xs):
        next_value_B, next_adv_B = carry
        reward_B, value_B, on_B = xs
        delta_B = reward_B + gamma * next_value_B - value_B
        adv_B = jnp.where(on_B, delta_B + gamma * lam * next_adv_B, 0.0)
        return (value_B, adv_B), adv_B

    zeros_B = jnp.zeros(rewards_BxT.shape[:1], jnp.float32)
    _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_BxT.T, values_BxT.T, on_BxT.T), reverse=True)
    advantages_BxT = adv_TxB.T
    returns_BxT = jnp.where(on_BxT, advantages_BxT + values_BxT, 0.0)
    return advantages_BxT, returns_BxT


def masked_whiten(x_BxT: Array, mask_BxT: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """(x − μ)/sqrt(σ² + eps), float32 [B, T], with μ and σ² over all masked tokens of the batch.

    σ² is the unbiased variance (Bessel's n − 1, as open-instruct's `masked_var(unbiased=True)`); with one
    masked token (n − 1 = 0) it is taken as 0 (open-instruct raises there), and an empty mask gives all 0.
    shift_mean=False adds μ back after scaling (TRL's option). 0 where mask == 0.
    Source: `masked_whiten` in open-instruct's `ppo_vllm_thread_ray_gtrl.py`.
    """
    on_BxT = _f32(mask_BxT) > 0
    x_BxT = jnp.where(on_BxT, _f32(x_BxT), 0.0)
    count = jnp.sum(on_BxT, dtype=jnp.float32)
    mean = jnp.sum(x_BxT) / jnp.maximum(count, 1.0)
    centred_BxT = jnp.where(on_BxT, x_BxT - mean, 0.0)
    var = jnp.sum(jnp.square(centred_BxT)) / jnp.maximum(count - 1.0, 1.0)
    white_BxT = centred_BxT * jax.lax.rsqrt(var + _f32(eps))
    if not shift_mean:
        white_BxT = white_BxT + mean
    return jnp.where(on_BxT, white_BxT, 0.0)


def _grouped(scores_B: Array, group_size: int) -> Array:
    scores_B = _f32(scores_B)
    (batch,) = scores_B.shape
    if group_size < 1 or batch % group_size != 0:
        raise ValueError(f"group_size {group_size} must be ≥ 1 and divide the batch size {batch}")
    return scores_B.reshape(batch // group_size, group_size)


def group_advantages(scores_B: Array, group_size: int, *, normalize_std: bool = True, eps: float = 1e-8) -> Array:
    """Group-relative advantages, float32 [B]: each score minus its group's mean, divided by
    (group std + eps) when normalize_std.

    Rows are prompt-major groups: rows g·N … g·N + N − 1 are the N = group_size samples of prompt g.
    The std is the population std (ddof 0), as `grpo_fast.py` gets from numpy's default `std`.
    normalize_std=False is Dr. GRPO (Liu et al. 2025): no division, which removes the bias towards
    near-constant groups. Raises ValueError (at trace time) when group_size does not divide B.
    """
    scores_GxN = _grouped(scores_B, group_size)
    # Centre on the first sample before averaging: a group of equal scores then gives exactly 0 (its float32
    # mean need not round back to the score, and ±1 ulp would be blown up to ±1 by the std division).
    shifted_GxN = scores_GxN - scores_GxN[:, :1]
    centred_GxN = shifted_GxN - jnp.mean(shifted_GxN, axis=1, keepdims=True)
    if normalize_std:
        std_Gx1 = jnp.sqrt(jnp.mean(jnp.square(centred_GxN), axis=1, keepdims=True))
        centred_GxN = centred_GxN / (std_Gx1 + _f32(eps))
    return centred_GxN.reshape(-1)


def constant_groups(scores_B: Array, group_size: int) -> Array:
    """bool [G]: True where every sample of group g has the same score, so its group advantages are all 0
    and it carries no learning signal (DAPO's dynamic sampling, Yu et al. 2025, drops such groups).
    Grouping as in `group_advantages`; ValueError when group_size does not divide B."""
    scores_GxN = _grouped(scores_B, group_size)
    return jnp.all(scores_GxN == scores_GxN[:, :1], axis=1)
