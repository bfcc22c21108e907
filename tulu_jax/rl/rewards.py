"""Per-token rewards of RLVR: the KL penalty against the reference policy, the response masks, the
non-stop penalty and the sparse verifiable score placed after the last token.

Tülu 3 §6 (RLVR) of Lambert et al. 2024, as open-instruct's `open_instruct/ppo_vllm_thread_ray_gtrl.py`
builds `rewards` before GAE. KL estimators k1/k2/k3 from Schulman, "Approximating KL divergence" (2020).

Dimension legend: B batch rows (responses), T response positions.
Conventions: row b holds `lengths[b]` real tokens (the stop token included when the response stopped);
seq_len = lengths - 1 is the index of its last real token; positions t > seq_len are padding.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

KL_ESTIMATORS = ("k1", "k2", "k3")
K3_CLAMP = 40.0  # |log π − log π_ref| bound inside the k3 estimator


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def kl_penalty(logps_BxT: Array, ref_logps_BxT: Array, kind: str) -> Array:
    """Per-token estimate of KL(policy ‖ reference) from sampled tokens' log-probs, float32 [B, T].

    With Δ = logps − ref_logps (log of the policy/reference ratio at the sampled token):
    "k1": Δ (unbiased, can be negative); "k2": ½Δ² (low variance, biased); "k3": exp(−Δ) − 1 + Δ
    (unbiased and ≥ 0; computed as expm1(−Δ) + Δ so small Δ keeps its precision). Schulman,
    "Approximating KL divergence"; open-instruct uses k1 (`kl = logprobs - ref_logprobs`).

    Raises ValueError (at trace time) when `kind` is not one of KL_ESTIMATORS.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown kind {kind!r}; expected one of {KL_ESTIMATORS}")
    delta_BxT = _f32(logps_BxT) - _f32(ref_logps_BxT)
    if kind == "k1":
        return delta_BxT
    if kind == "k2":
        return 0.5 * jnp.square(delta_BxT)
    # exp(-Δ) overflows float32 below Δ ≈ -88, and inf·0 in the backward pass of a masked position is NaN;
    # grpo_fast.py clamps Δ to [-40, 40] for the same reason.
    delta_BxT = jnp.clip(delta_BxT, -K3_CLAMP, K3_CLAMP)
    return jnp.expm1(-delta_BxT) + delta_BxT


def response_masks(lengths_B: Array, width: int) -> tuple[Array, Array]:
    """(policy_mask, value_mask), both float32 [B, width], from the real-token counts `lengths_B` (int [B]).

    policy_mask is 1 at t ≤ seq_len (t < lengths): the tokens the policy loss trains on. value_mask is 1 at
    t ≤ seq_len + 1 (and t < width): the value head is also trained one step past the last token, where the
    score lands (`padding_mask_p1` in open-instruct's `ppo_vllm_thread_ray_gtrl.py`). Both are contiguous
    prefixes of each row.
    """
    t_1xT = jnp.arange(width)[None, :]
    lengths_Bx1 = jnp.asarray(lengths_B)[:, None]
    policy_mask_BxT = (t_1xT < lengths_Bx1).astype(jnp.float32)
    value_mask_BxT = (t_1xT <= lengths_Bx1).astype(jnp.float32)  # t < width holds for every t of arange(width)
    return policy_mask_BxT, value_mask_BxT


def apply_non_stop_penalty(scores_B: Array, stopped_B: Array, penalty: float | None) -> Array:
    """float32 [B] scores where a response that did not stop (stopped_B False: cut at the length limit) has
    its score REPLACED by `penalty`; penalty None returns the scores unchanged.

    open-instruct's `--non_stop_penalty` / `penalty_reward_value` (`ppo_vllm_thread_ray_gtrl.py`).
    """
    scores_B = _f32(scores_B)
    if penalty is None:
        return scores_B
    return jnp.where(jnp.asarray(stopped_B, bool), scores_B, jnp.float32(penalty))


def token_rewards(scores_B: Array, kl_BxT: Array, lengths_B: Array, beta: float) -> Array:
    """Per-token rewards, float32 [B, T]: r_t = −beta·kl_t at t < lengths (0 elsewhere), plus the score
    ADDED at index lengths (seq_len + 1, one after the last token) when lengths < T, else at T − 1.

    kl_BxT: a `kl_penalty` estimate; scores_B: the verifiable reward (after `apply_non_stop_penalty`);
    lengths_B: int [B] real-token counts. Reproduces open-instruct's `ppo_vllm_thread_ray_gtrl.py`
    (`actual_end = where(sequence_lengths_p1 < T, sequence_lengths_p1, sequence_lengths)`). Tülu 3 §6.
    """
    kl_BxT = _f32(kl_BxT)
    width = kl_BxT.shape[1]
    lengths_B = jnp.asarray(lengths_B)
    policy_mask_BxT, _ = response_masks(lengths_B, width)
    # where, not multiply: a non-finite kl on padding must not leak NaN into the row.
    rewards_BxT = jnp.where(policy_mask_BxT > 0, -_f32(beta) * kl_BxT, 0.0)
    end_B = jnp.where(lengths_B < width, lengths_B, width - 1)
    at_end_BxT = jnp.arange(width)[None, :] == end_B[:, None]
    return rewards_BxT + jnp.where(at_end_BxT, _f32(scores_B)[:, None], 0.0)
