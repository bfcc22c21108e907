"""The jitted pieces of an RLVR step (Tülu 3 §6; open-instruct `ppo_vllm_thread_ray_gtrl.py`, `grpo_fast.py`):
response log-probs and values from the trainer's models, advantages, and one minibatch update of the policy
(and of the value model, PPO). The RL math itself lives in `tulu_jax.rl`; this module only wires it to the
models and the mesh.

Dimension legend: N episodes, M episodes of a minibatch, P prompt width, T response width, L = P + T.
Batches are dicts of arrays split over the data+fsdp mesh axes (`tulu_jax.train.episodes` builds them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tulu_jax import sharding as shd
from tulu_jax.config import GRPOConfig, PolicyLossConfig, PPOConfig
from tulu_jax.rl.advantages import gae, group_advantages, masked_whiten
from tulu_jax.rl.losses import masked_mean, policy_loss, truncated_importance_weights, value_loss
from tulu_jax.rl.rewards import apply_non_stop_penalty, kl_penalty, response_masks, token_rewards
from tulu_jax.train.accumulate import accumulate_grads
from tulu_jax.train.batches import batch_shardings
from tulu_jax.train.episodes import SEQUENCE_KEYS
from tulu_jax.train.forward import next_token_logps, next_token_logps_and_entropy

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What every compiled piece needs to know about the rows: the prompt width P, the sampling temperature
    (log-probs are of logits / temperature, as the reference's), and the logits chunk."""

    width: int
    temperature: float
    logits_chunk: int


def response_logps(model, params, batch: dict, shapes: Shapes) -> Array:
    """float32 [N, T]: log p(response token t | prompt, tokens < t) under `params`, temperature applied.
    logits[j] predicts token j+1, so the response's T log-probs sit at columns P-1 .. P+T-2."""
    logps_NxL = next_token_logps(
        model, params, *_sequences(batch), chunk_size=shapes.logits_chunk, temperature=shapes.temperature
    )
    return response_columns(logps_NxL, shapes.width)


def _sequences(batch: dict) -> tuple[Array, Array, Array]:
    return batch["input_ids"], batch["positions"], batch["segment_ids"]


def response_columns(x_NxL: Array, width: int) -> Array:
    """[N, T] from [N, L = P + T]: columns P-1 .. L-2, the positions whose outputs concern response tokens
    0 .. T-1 (position j predicts token j+1; `width` = P)."""
    return x_NxL[:, width - 1 : -1]


def response_logps_and_entropy(model, params, batch: dict, shapes: Shapes) -> tuple[Array, Array]:
    """(`response_logps`, entropy [N, T] of each response position's whole next-token distribution at the
    sampling temperature), float32, forward only: the policy's pass over its own rollouts."""
    logps_NxL, entropy_NxL = next_token_logps_and_entropy(
        model, params, *_sequences(batch), chunk_size=shapes.logits_chunk, temperature=shapes.temperature
    )
    return response_columns(logps_NxL, shapes.width), response_columns(entropy_NxL, shapes.width)


def response_values(value_model, params, batch: dict, shapes: Shapes) -> Array:
    """float32 [N, T]: V_t, the value model's output at the position before response token t (the state in
    which token t is chosen), columns P-1 .. P+T-2."""
    values_NxL = value_model.apply({"params": params}, *_sequences(batch))
    return response_columns(values_NxL, shapes.width).astype(jnp.float32)


def jit_forward(fn, module, mesh: Mesh, param_shardings, shapes: Shapes):
    """`run(params, batch) -> [N, T]` (or a tuple of them) for `fn` = response_logps, response_values or
    response_logps_and_entropy, rows split over data+fsdp."""
    return shd.jit_on_mesh(
        lambda p, b: fn(module, p, b, shapes),
        mesh,
        in_shardings=(param_shardings, batch_shardings(mesh, SEQUENCE_KEYS)),
        out_shardings=shd.batch_sharding(mesh),
    )


# --- advantages -------------------------------------------------------------------------------------------


def rollout_stats(logps, ref_logps, scores, lengths, stopped, policy_mask, beta: float, kl_estimator: str) -> dict:
    """Per-batch figures with the reference's names: objective/kl, kl2, kl3 (Σ_t over the response, mean over
    episodes), objective/scores (after the non-stop penalty), objective/non_score_reward (−β Σ_t KL of the
    configured estimator), objective/rlhf_reward, val/sequence_lengths, val/stop_token_rate."""
    sums = {k: jnp.sum(kl_penalty(logps, ref_logps, k) * policy_mask, axis=1) for k in ("k1", "k2", "k3")}
    non_score = -beta * sums[kl_estimator]
    return {
        "objective/kl": jnp.mean(sums["k1"]),
        "objective/kl2": jnp.mean(sums["k2"]),
        "objective/kl3": jnp.mean(sums["k3"]),
        "objective/scores": jnp.mean(scores),
        "objective/non_score_reward": jnp.mean(non_score),
        "objective/rlhf_reward": jnp.mean(scores + non_score),
        "val/sequence_lengths": jnp.mean(lengths.astype(jnp.float32)),
        "val/stop_token_rate": jnp.mean(stopped.astype(jnp.float32)),
    }


def ppo_advantages(logps, ref_logps, values, scores, lengths, stopped, *, cfg: PPOConfig) -> tuple[dict, dict]:
    """Tülu 3's PPO targets from one rollout batch: KL-penalised per-token rewards with the score one position
    after EOS (replaced by the non-stop penalty when there is no EOS), GAE over the value mask, advantages
    whitened over the response tokens of the batch (returns from the raw ones).

    logps, ref_logps, values: float32 [N, T]; scores: float32 [N] verifier rewards; lengths: int32 [N];
    stopped: bool [N]. Returns (arrays: advantages, returns, old_values, policy_mask, value_mask [N, T];
    stats: rollout_stats plus val/explained_variance)."""
    t = logps.shape[1]
    policy_mask, value_mask = response_masks(lengths, t)
    scores = apply_non_stop_penalty(scores, stopped, cfg.non_stop_penalty)
    kl = kl_penalty(logps, ref_logps, cfg.kl_estimator) * policy_mask
    rewards = token_rewards(scores, kl, lengths, cfg.beta)
    values = values * value_mask
    advantages, returns = gae(rewards, values, value_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, policy_mask)
    advantages = advantages * policy_mask
    stats = rollout_stats(logps, ref_logps, scores, lengths, stopped, policy_mask, cfg.beta, cfg.kl_estimator)
    residual_var = masked_variance(returns - values, value_mask)
    stats["val/explained_variance"] = 1.0 - residual_var / jnp.maximum(masked_variance(returns, value_mask), 1e-8)
    arrays = {
        "advantages": advantages,
        "returns": returns,
        "old_values": values,
        "policy_mask": policy_mask,
        "value_mask": value_mask,
    }
    return arrays, stats


def grpo_advantages(logps, ref_logps, scores, lengths, stopped, *, cfg: GRPOConfig, group_size: int):
    """GRPO targets (open-instruct `grpo_fast.py`): each response's score minus its group's mean (divided by
    the group's std unless Dr. GRPO), the same advantage on every response token. Shapes as `ppo_advantages`;
    returns (arrays: advantages, policy_mask, value_mask; stats)."""
    t = logps.shape[1]
    policy_mask, value_mask = response_masks(lengths, t)
    scores = apply_non_stop_penalty(scores, stopped, cfg.non_stop_penalty)
    per_response = group_advantages(scores, group_size, normalize_std=cfg.normalize_std)
    arrays = {"advantages": per_response[:, None] * policy_mask, "policy_mask": policy_mask, "value_mask": value_mask}
    return arrays, rollout_stats(logps, ref_logps, scores, lengths, stopped, policy_mask, cfg.beta, cfg.kl_estimator)


def masked_variance(x, mask):
    """Population variance of `x` over `mask`'s tokens (float32 scalar; 0 for an empty mask)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def rollout_policy_stats(trainer_logps, sampler_logps, entropy, policy_mask, tis_cap: float) -> tuple[Array, dict]:
    """`sampler_gap` plus policy/entropy_avg, the mean entropy (nats) of the policy's next-token distribution
    over the response tokens."""
    weights, stats = sampler_gap(trainer_logps, sampler_logps, policy_mask, tis_cap)
    stats["policy/entropy_avg"] = masked_mean(entropy, policy_mask)
    return weights, stats


def sampler_gap(trainer_logps, sampler_logps, policy_mask, tis_cap: float) -> tuple[Array, dict]:
    """(importance weights [N, T], stats) for the sampler/trainer mismatch: rollout/logp_gap_mean and _max
    (|Δ| of the two log-probs of each sampled token), the ratio π_trainer/π_sampler's mean and 1st/99th
    percentiles, and the weights of truncated importance sampling (min(ratio, tis_cap); ones when off)."""
    gap = jnp.abs(trainer_logps - sampler_logps) * policy_mask
    ratio = jnp.exp(trainer_logps - sampler_logps)
    flat = jnp.where(policy_mask > 0, ratio, jnp.nan).reshape(-1)
    weights = truncated_importance_weights(trainer_logps, sampler_logps, tis_cap) if tis_cap > 0 else None
    stats = {
        "rollout/logp_gap_mean": masked_mean(gap, policy_mask),
        "rollout/logp_gap_max": jnp.max(gap),
        "rollout/ratio_mean": masked_mean(ratio, policy_mask),
        "rollout/ratio_p01": jnp.nanpercentile(flat, 1.0),
        "rollout/ratio_p99": jnp.nanpercentile(flat, 99.0),
    }
    if weights is not None:
        stats["rollout/tis_clipped_frac"] = masked_mean((ratio > tis_cap).astype(jnp.float32), policy_mask)
    return (jnp.ones_like(ratio) if weights is None else weights), stats


# --- updates ----------------------------------------------------------------------------------------------


def _apply(state, tx, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def policy_update(state, batch, *, model, tx, schedule, shapes: Shapes, cfg: PolicyLossConfig, kl_in_loss: bool, accum):
    """One optimizer step of the policy on a minibatch: the clipped surrogate over the response tokens
    (aggregated as `cfg.aggregation`; each micro-batch's loss weighs 1/accum, as DeepSpeed averages gradient
    accumulation steps), weighted by `tis_weights`, plus β·KL to the reference when `kl_in_loss` (GRPO).
    Metrics (reference names): loss/policy_avg, policy/clipfrac_avg, policy/approxkl_avg, val/ratio,
    val/ratio_var, policy/grad_norm, learning_rate; with kl_in_loss also loss/kl_avg."""

    def micro_loss(params, mb):
        logps = response_logps(model, params, mb, shapes)
        mask = mb["policy_mask"]
        loss, stats = policy_loss(
            logps,
            mb["old_logps"],
            mb["advantages"],
            mask,
            clip_low=cfg.clip,
            clip_high=cfg.clip_high,
            aggregation=cfg.aggregation,
            importance_weights_BxT=mb["tis_weights"],
        )
        aux = {
            "loss/policy_avg": loss,
            "policy/clipfrac_avg": stats["clipfrac"],
            "policy/approxkl_avg": stats["approxkl"],
            "val/ratio": stats["ratio"],
            "val/ratio_var": stats["ratio_var"],
        }
        if kl_in_loss:
            kl = masked_mean(kl_penalty(logps, mb["ref_logps"], cfg.kl_estimator), mask)
            aux["loss/kl_avg"] = kl
            loss = loss + cfg.beta * kl
        return loss / accum, jax.tree.map(lambda x: x / accum, aux)

    keys = ("old_logps", "advantages", "policy_mask", "tis_weights", *SEQUENCE_KEYS)
    keys += ("ref_logps",) if kl_in_loss else ()
    (_, aux), grads = accumulate_grads(micro_loss, state.params, {k: batch[k] for k in keys}, accum)
    aux.update({"policy/grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)})
    return _apply(state, tx, grads), aux


def value_update(state, batch, *, value_model, tx, shapes: Shapes, cfg: PPOConfig, accum):
    """One optimizer step of the value model on a minibatch: c1 · ½ max((V−R)², (V_clip−R)²) over the value
    mask (Tülu 3: c1 = 0.1, clip 0.2). Metrics: loss/value_avg (before c1), val/clipfrac_avg, val/grad_norm."""

    def micro_loss(params, mb):
        values = response_values(value_model, params, mb, shapes)
        loss, stats = value_loss(
            values, mb["old_values"], mb["returns"], mb["value_mask"], clip=cfg.value_clip, aggregation=cfg.aggregation
        )
        aux = {"loss/value_avg": loss, "val/clipfrac_avg": stats["clipfrac"]}
        return cfg.value_coef * loss / accum, jax.tree.map(lambda x: x / accum, aux)

    keys = ("old_values", "returns", "value_mask", *SEQUENCE_KEYS)
    (_, aux), grads = accumulate_grads(micro_loss, state.params, {k: batch[k] for k in keys}, accum)
    aux["val/grad_norm"] = optax.tree.norm(grads)
    return _apply(state, tx, grads), aux


def jit_update(fn, mesh: Mesh, state_shardings, keys, **kwargs):
    """`run(state, batch) -> (state, metrics)` for `fn` = policy_update or value_update, the state donated."""
    return shd.jit_on_mesh(
        functools.partial(fn, **kwargs),
        mesh,
        in_shardings=(state_shardings, batch_shardings(mesh, keys)),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
