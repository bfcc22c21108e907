"""The DPO-family train step (Tülu 3 §5; open-instruct `dpo_utils.py`, `dpo_tune_cache.py`): a pure
`(state, batch[, ref_params]) -> (state, metrics)`.

Batches hold pairs as [B, 2, T] arrays (0 = chosen, 1 = rejected); both sides go through the model in
one [2B, T] forward. The reference's summed log-probs come either with the batch (`ref_logps`, from the
cache) or from frozen reference parameters run alongside ("live"). The loss is the mean over the pairs of
the *global* batch, so accumulated micro-batches give the full batch's gradient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tulu_jax import sharding as shd
from tulu_jax.losses import PreferenceOutput, labelled_sums, preference_loss
from tulu_jax.models.decoder import Decoder
from tulu_jax.train.accumulate import accumulate_grads
from tulu_jax.train.batches import TOKEN_KEYS, batch_shardings
from tulu_jax.train.forward import next_token_logps
from tulu_jax.train.state import TrainState


class LossParams(NamedTuple):
    """What the preference loss needs (static under jit): `loss` names a function of
    `losses.PREFERENCE_LOSSES`; `beta` > 0; `label_smoothing` ε in [0, 0.5); SimPO's `gamma_beta_ratio`."""

    loss: str
    beta: float
    label_smoothing: float = 0.0
    gamma_beta_ratio: float = 0.3


def pair_logps(params, batch, *, model: Decoder, logits_chunk: int = 0):
    """(summed log-probs [B, 2], labelled-token counts [B, 2]), float32, of both sides of every pair of a
    [B, 2, T] token batch (TOKEN_KEYS), in one [2B, T] forward."""
    b, _, t = batch["input_ids"].shape
    flat = {k: batch[k].reshape(2 * b, t) for k in TOKEN_KEYS}
    token_logps = next_token_logps(
        model, params, flat["input_ids"], flat["positions"], flat["segment_ids"], chunk_size=logits_chunk
    )
    logps, counts = labelled_sums(token_logps, flat["input_ids"], flat["loss_mask"], flat["segment_ids"])
    return logps.reshape(b, 2), counts.reshape(b, 2)


def pair_loss(policy_logps_Bx2, ref_logps_Bx2, counts_Bx2, cfg: LossParams) -> PreferenceOutput:
    """The per-pair loss `cfg.loss` of summed policy/reference log-probs and token counts, all [B, 2]."""
    return preference_loss(
        cfg.loss,
        policy_logps_Bx2[:, 0],
        policy_logps_Bx2[:, 1],
        ref_logps_Bx2[:, 0],
        ref_logps_Bx2[:, 1],
        counts_Bx2[:, 0],
        counts_Bx2[:, 1],
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        gamma_beta_ratio=cfg.gamma_beta_ratio,
    )


def metric_sums(out: PreferenceOutput, weights_B) -> dict[str, jax.Array]:
    """Per-pair metrics summed with weights (1 per real pair); divide by the pair count for means.

    Accuracy is per pair (open-instruct's `dpo_tune_cache.py` takes it on micro-batch-mean rewards, which is
    the same only at one pair per device).
    """
    rc, rr = out.chosen_rewards, out.rejected_rewards
    per_pair = {
        "loss": out.losses,
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracy": (rc > rr).astype(jnp.float32),
        "rewards/margin": rc - rr,
        "logps/chosen": out.chosen_logps,
        "logps/rejected": out.rejected_logps,
    }
    return {k: jnp.sum(v * weights_B) for k, v in per_pair.items()}


def finish_means(sums: dict[str, jax.Array], num_pairs) -> dict[str, jax.Array]:
    means = {k: v / num_pairs for k, v in sums.items()}
    means["rewards/average"] = (means["rewards/chosen"] + means["rewards/rejected"]) / 2
    return means


def dpo_step(
    state: TrainState,
    batch,
    ref_params=None,
    *,
    model: Decoder,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: LossParams,
    accum_steps: int,
    logits_chunk: int = 0,
):
    """One optimizer step on [B, 2, T] pairs. `batch` carries `ref_logps` [B, 2] (summed reference log-probs,
    e.g. from the cache) unless `ref_params` are given (a live reference, any dtype, never updated). The
    loss is the mean over the pairs of the global batch; metrics (float32 scalars, TRL/open-instruct
    names): loss, rewards/{chosen,rejected,accuracy,margin,average}, logps/{chosen,rejected}, grad_norm,
    learning_rate, trained_tokens."""
    num_pairs = batch["input_ids"].shape[0]
    live = ref_params is not None

    def micro_loss(params, mb):
        logps, counts = pair_logps(params, mb, model=model, logits_chunk=logits_chunk)
        if live:
            ref = jax.lax.stop_gradient(pair_logps(ref_params, mb, model=model, logits_chunk=logits_chunk)[0])
        else:
            ref = mb["ref_logps"]
        out = pair_loss(logps, ref, counts, cfg)
        sums = metric_sums(out, jnp.ones_like(out.losses))
        sums["trained_tokens"] = jnp.sum(counts)
        return sums["loss"] / num_pairs, sums

    keys = TOKEN_KEYS if live else (*TOKEN_KEYS, "ref_logps")
    (_, sums), grads = accumulate_grads(micro_loss, state.params, {k: batch[k] for k in keys}, accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    tokens = sums.pop("trained_tokens")
    metrics = finish_means(sums, num_pairs)
    metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step), trained_tokens=tokens)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def step_keys(live: bool) -> tuple[str, ...]:
    """The batch keys of a DPO step: the token arrays, plus the cached `ref_logps` unless the reference is live."""
    return TOKEN_KEYS if live else (*TOKEN_KEYS, "ref_logps")


def jit_dpo_step(
    model: Decoder,
    tx,
    schedule,
    mesh: Mesh,
    state_shardings,
    *,
    cfg: LossParams,
    accum_steps: int,
    live: bool,
    logits_chunk: int = 0,
):
    """Compiled once for this mesh, state donated. Cached reference: `run(state, batch)` with
    `batch["ref_logps"]`; live: `run(state, batch, ref_params)` (sharded like the policy, never donated).
    Pairs are split over data+fsdp; each pair's chosen and rejected rows stay on one device."""
    step = functools.partial(
        dpo_step, model=model, tx=tx, schedule=schedule, cfg=cfg, accum_steps=accum_steps, logits_chunk=logits_chunk
    )
    in_shardings = (state_shardings, batch_shardings(mesh, step_keys(live)))
    if live:
        in_shardings += (state_shardings.params,)
    return shd.jit_on_mesh(
        step,
        mesh,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def jit_pair_logps(model: Decoder, mesh: Mesh, param_shardings, *, logits_chunk: int = 0):
    """Forward only: `run(params, batch) -> (logps [B, 2], counts [B, 2])`, replicated on every device."""
    rep = NamedSharding(mesh, P())
    return shd.jit_on_mesh(
        functools.partial(pair_logps, model=model, logits_chunk=logits_chunk),
        mesh,
        in_shardings=(param_shardings, batch_shardings(mesh)),
        out_shardings=(rep, rep),
    )


def eval_sums(params, batch, *, model: Decoder, cfg: LossParams, logits_chunk: int = 0):
    """Forward only over a batch with `ref_logps` and `valid` [B]: metric sums over the real pairs, plus the
    policy-only accuracy (length-normalized chosen log-prob above the rejected one)."""
    logps, counts = pair_logps(params, batch, model=model, logits_chunk=logits_chunk)
    out = pair_loss(logps, batch["ref_logps"], counts, cfg)
    valid = batch["valid"].astype(jnp.float32)
    sums = metric_sums(out, valid)
    avg = logps / jnp.maximum(counts, 1.0)
    sums["policy_accuracy"] = jnp.sum((avg[:, 0] > avg[:, 1]).astype(jnp.float32) * valid)
    sums["pairs"] = jnp.sum(valid)
    return sums


def jit_eval_sums(model: Decoder, mesh: Mesh, param_shardings, cfg: LossParams, *, logits_chunk: int = 0):
    return shd.jit_on_mesh(
        functools.partial(eval_sums, model=model, cfg=cfg, logits_chunk=logits_chunk),
        mesh,
        in_shardings=(param_shardings, batch_shardings(mesh, (*step_keys(live=False), "valid"))),
        out_shardings=NamedSharding(mesh, P()),
    )
