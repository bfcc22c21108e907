"""Preference losses (DPO, length-normalized DPO, SimPO, IPO, WPO) and the reward-model loss, as pure JAX
functions: Tülu 3 §5 (preference tuning) of Lambert et al. 2024, as open-instruct implements it in
`open_instruct/dpo_utils.py` (losses) and `open_instruct/reward_modeling.py` (Bradley-Terry).

Dimension legend: B batch (pairs), T time (token positions), V vocabulary.

Every preference loss takes summed log-probs of the labelled tokens (policy and reference, chosen and
rejected) plus the labelled-token counts, and returns per-pair losses in a PreferenceOutput. The trainer
takes the mean over pairs (as `dpo_tune_cache.py` does). They share one signature so a trainer can pick
one by name from PREFERENCE_LOSSES. Averaging the sums happens in here, so a reference-log-prob cache can
always store sums and counts, whatever the loss.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tulu_jax.config import DEFAULT_BETA  # noqa: F401  (re-exported: each loss's default β)
from tulu_jax.losses.sft import shift_for_next_token, token_logps

Array = jax.Array
Scalar = Array | float


def labelled_sums(
    token_logps_BxT: Array, input_ids_BxT: Array, loss_mask_BxT: Array, segment_ids_BxT: Array | None = None
) -> tuple[Array, Array]:
    """(Σ logps of the labelled tokens, number of labelled tokens) per row, both float32 [B].

    token_logps_BxT: float32 log p(input_ids[t+1]) at position t (`token_logps` of the logits against the
    shifted ids, or `tulu_jax.train.forward.next_token_logps`). A target counts where loss_mask is 1 at the
    *target* position and the target lies in the same non-zero segment as the position predicting it
    (`shift_for_next_token`'s weights). Without segment_ids the whole row is one document, so padding has to
    be masked out through loss_mask. The reference's `_get_batch_logps` (open_instruct/dpo_utils.py).
    """
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
    _, weights_BxT = shift_for_next_token(input_ids_BxT, loss_mask_BxT, segment_ids_BxT)
    return jnp.sum(weights_BxT * token_logps_BxT, axis=-1), jnp.sum(weights_BxT, axis=-1)


def sequence_logps(
    logits_BxTxV: Array, input_ids_BxT: Array, loss_mask_BxT: Array, segment_ids_BxT: Array | None = None
) -> tuple[Array, Array]:
    """`labelled_sums` from full logits [B, T, V] (any float dtype; logits[t] predicts input_ids[t+1]):
    (Σ log p of the labelled tokens, number of labelled tokens) per row, both float32 [B]."""
    targets_BxT = jnp.pad(input_ids_BxT[:, 1:], ((0, 0), (0, 1)))
    return labelled_sums(token_logps(logits_BxTxV, targets_BxT), input_ids_BxT, loss_mask_BxT, segment_ids_BxT)


class PreferenceOutput(NamedTuple):
    """Per-pair results, all float32 [B].

    chosen_logps / rejected_logps are the policy log-probs as the loss uses them (length-averaged for dpo_norm,
    simpo and ipo; sums for dpo and wpo): open-instruct's `logps/chosen` and `logps/rejected` metrics
    (`dpo_tune_cache.py`). Rewards and logps are metrics and carry no gradient; only `losses` does.
    """

    losses: Array
    chosen_rewards: Array
    rejected_rewards: Array
    chosen_logps: Array
    rejected_logps: Array


def _f32(x: Array | float) -> Array:
    return jnp.asarray(x, jnp.float32)


def _per_token(logps_B: Array, lengths_B: Array) -> Array:
    # An empty side would otherwise divide by zero; its sum is 0 then, so the average is 0 too.
    return _f32(logps_B) / jnp.maximum(_f32(lengths_B), 1.0)


def _smoothed_sigmoid_loss(margin_B: Array, beta: Scalar, label_smoothing: Scalar) -> Array:
    # Conservative DPO: with probability ε the preference label is flipped. log_sigmoid is a stable softplus,
    # so the loss and its gradient stay finite for |β·z| ~ 1e4 where log(sigmoid(x)) would give -inf.
    logits_B = beta * margin_B
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits_B) - label_smoothing * jax.nn.log_sigmoid(-logits_B)


def _output(losses_B: Array, chosen_rewards_B: Array, rejected_rewards_B: Array, chosen_B: Array, rejected_B: Array):
    sg = jax.lax.stop_gradient
    return PreferenceOutput(losses_B, sg(chosen_rewards_B), sg(rejected_rewards_B), sg(chosen_B), sg(rejected_B))


def dpo(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: Scalar,
    label_smoothing: Scalar = 0.0,
    gamma_beta_ratio: Scalar = 0.3,
) -> PreferenceOutput:
    """Sigmoid DPO on summed log-probs: L = −(1−ε)·log σ(βz) − ε·log σ(−βz), z = Δπ − Δref (Rafailov et al.
    2023; `dpo_loss` in open_instruct/dpo_utils.py).

    Rewards are β·(ℓπ − ℓref) on sums. Lengths and gamma_beta_ratio are ignored.
    """
    # Taking the log-ratio per side first subtracts numbers of similar size (exact in float32), so z keeps
    # its precision even when the sums are in the hundreds.
    chosen_ratio_B = _f32(policy_chosen_logps) - _f32(ref_chosen_logps)
    rejected_ratio_B = _f32(policy_rejected_logps) - _f32(ref_rejected_logps)
    losses_B = _smoothed_sigmoid_loss(chosen_ratio_B - rejected_ratio_B, beta, label_smoothing)
    return _output(
        losses_B,
        beta * chosen_ratio_B,
        beta * rejected_ratio_B,
        _f32(policy_chosen_logps),
        _f32(policy_rejected_logps),
    )


def dpo_norm(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: Scalar,
    label_smoothing: Scalar = 0.0,
    gamma_beta_ratio: Scalar = 0.3,
) -> PreferenceOutput:
    """Tülu 3's length-normalized DPO: dpo with per-token averages ℓ/len for policy and reference
    (Tülu 3 §5; `dpo_loss` on averaged log-probs in open_instruct/dpo_utils.py).

    Rewards are β·(ℓ̄π − ℓ̄ref). Lengths are clamped to ≥ 1. gamma_beta_ratio is ignored.
    """
    # Both sides share a length, so ℓ̄π − ℓ̄ref = (ℓπ − ℓref)/len; dividing the difference loses less.
    chosen_ratio_B = _per_token(_f32(policy_chosen_logps) - _f32(ref_chosen_logps), chosen_lengths)
    rejected_ratio_B = _per_token(_f32(policy_rejected_logps) - _f32(ref_rejected_logps), rejected_lengths)
    losses_B = _smoothed_sigmoid_loss(chosen_ratio_B - rejected_ratio_B, beta, label_smoothing)
    return _output(
        losses_B,
        beta * chosen_ratio_B,
        beta * rejected_ratio_B,
        _per_token(policy_chosen_logps, chosen_lengths),
        _per_token(policy_rejected_logps, rejected_lengths),
    )


def simpo(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: Scalar,
    label_smoothing: Scalar = 0.0,
    gamma_beta_ratio: Scalar = 0.3,
) -> PreferenceOutput:
    """SimPO (reference-free): z = ℓ̄π_c − ℓ̄π_r − γ/β, L = −(1−ε)·log σ(βz) − ε·log σ(−βz) (Meng et
    al. 2024; `simpo_loss` in open_instruct/dpo_utils.py).

    Rewards are β·ℓ̄π. The reference log-probs are ignored. Lengths are clamped to ≥ 1.
    """
    chosen_avg_B = _per_token(policy_chosen_logps, chosen_lengths)
    rejected_avg_B = _per_token(policy_rejected_logps, rejected_lengths)
    losses_B = _smoothed_sigmoid_loss(chosen_avg_B - rejected_avg_B - gamma_beta_ratio, beta, label_smoothing)
    return _output(losses_B, beta * chosen_avg_B, beta * rejected_avg_B, chosen_avg_B, rejected_avg_B)


def ipo(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: Scalar,
    label_smoothing: Scalar = 0.0,
    gamma_beta_ratio: Scalar = 0.3,
) -> PreferenceOutput:
    """IPO (Azar et al. 2023): L = (z − 1/(2β))², z = (ℓ̄π_c − ℓ̄ref_c) − (ℓ̄π_r − ℓ̄ref_r).

    The paper writes z on sequence log-probs; like TRL we use per-token averages, which keeps the target
    margin 1/(2β) independent of response length. β here is the paper's τ. Rewards are β·(ℓ̄π − ℓ̄ref).
    Lengths are clamped to ≥ 1. label_smoothing and gamma_beta_ratio are ignored.
    """
    chosen_ratio_B = _per_token(_f32(policy_chosen_logps) - _f32(ref_chosen_logps), chosen_lengths)
    rejected_ratio_B = _per_token(_f32(policy_rejected_logps) - _f32(ref_rejected_logps), rejected_lengths)
    losses_B = jnp.square(chosen_ratio_B - rejected_ratio_B - 1.0 / (2.0 * beta))
    return _output(
        losses_B,
        beta * chosen_ratio_B,
        beta * rejected_ratio_B,
        _per_token(policy_chosen_logps, chosen_lengths),
        _per_token(policy_rejected_logps, rejected_lengths),
    )


def wpo(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: Scalar,
    label_smoothing: Scalar = 0.0,
    gamma_beta_ratio: Scalar = 0.3,
) -> PreferenceOutput:
    """WPO (Zhou et al. 2024): the dpo loss on sums times w = exp(ℓ̄π_c + ℓ̄π_r), a constant (no gradient).

    This follows the paper, not open_instruct/dpo_utils.py's `wpo_loss`, whose weight uses sums (w ≈ 0) and
    is not detached. ℓ̄π are the policy's per-token averages, so w ∈ (0, 1] and up-weights pairs that are likely
    under the current policy. The paper's "sampling-aligned" weight, which divides each token probability by
    Σ_v p(v)², needs full-vocabulary probabilities per token and is not implemented. Rewards and logps are
    those of dpo (sums). Lengths are clamped to ≥ 1. gamma_beta_ratio is ignored.
    """
    dpo_out = dpo(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    log_weight_B = _per_token(policy_chosen_logps, chosen_lengths) + _per_token(policy_rejected_logps, rejected_lengths)
    weight_B = jax.lax.stop_gradient(jnp.exp(log_weight_B))
    return dpo_out._replace(losses=weight_B * dpo_out.losses)


def bradley_terry(chosen_scores_B: Array, rejected_scores_B: Array) -> tuple[Array, Array]:
    """Reward-model loss −log σ(r_c − r_r) per pair and accuracy (1.0 where r_c > r_r), float32 [B]
    (`reward_modeling.py` in open-instruct; Ouyang et al. 2022)."""
    margin_B = _f32(chosen_scores_B) - _f32(rejected_scores_B)
    return -jax.nn.log_sigmoid(margin_B), (margin_B > 0).astype(jnp.float32)


PreferenceLoss = Callable[..., PreferenceOutput]

PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": dpo,
    "dpo_norm": dpo_norm,
    "simpo": simpo,
    "ipo": ipo,
    "wpo": wpo,
}


def preference_loss(name: str, *args, **kwargs) -> PreferenceOutput:
    """Calls PREFERENCE_LOSSES[name](*args, **kwargs); `name` is static under jit. Raises ValueError for a
    name not in PREFERENCE_LOSSES."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid: {', '.join(sorted(PREFERENCE_LOSSES))}")
    return PREFERENCE_LOSSES[name](*args, **kwargs)
