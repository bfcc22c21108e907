"""The reward-model train step (open-instruct `reward_modeling.py`): Bradley–Terry on the score at each
side's last real token."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tulu_jax import sharding as shd
from tulu_jax.losses import bradley_terry
from tulu_jax.models.reward import RewardModel, last_token_scores
from tulu_jax.train.accumulate import accumulate_grads
from tulu_jax.train.batches import TOKEN_KEYS, batch_shardings
from tulu_jax.train.state import TrainState


def pair_scores(params, batch, *, model: RewardModel):
    """Rewards [B, 2] float32 (chosen, rejected) of a [B, 2, T] pair batch: the score at the last real token
    of each side."""
    b, _, t = batch["input_ids"].shape
    flat = {k: batch[k].reshape(2 * b, t) for k in TOKEN_KEYS}
    scores = model.apply({"params": params}, flat["input_ids"], flat["positions"], flat["segment_ids"])
    return last_token_scores(scores, flat["segment_ids"]).reshape(b, 2)


def rm_sums(scores_Bx2, weights_B) -> dict[str, jax.Array]:
    """Per-pair loss and metrics summed with weights (1 per real pair); divide by the pair count."""
    losses, correct = bradley_terry(scores_Bx2[:, 0], scores_Bx2[:, 1])
    sg = jax.lax.stop_gradient
    per_pair = {
        "loss": losses,
        "accuracy": correct,
        "rewards/chosen": sg(scores_Bx2[:, 0]),
        "rewards/rejected": sg(scores_Bx2[:, 1]),
        "rewards/margin": sg(scores_Bx2[:, 0] - scores_Bx2[:, 1]),
    }
    return {k: jnp.sum(v * weights_B) for k, v in per_pair.items()}


def rm_step(state: TrainState, batch, *, model: RewardModel, tx, schedule, accum_steps: int):
    """One optimizer step: mean Bradley–Terry loss over the pairs of the global batch. Metrics (float32):
    loss, accuracy, rewards/{chosen,rejected,margin}, grad_norm, learning_rate."""
    num_pairs = batch["input_ids"].shape[0]

    def micro_loss(params, mb):
        scores = pair_scores(params, mb, model=model)
        sums = rm_sums(scores, jnp.ones(scores.shape[0], jnp.float32))
        return sums["loss"] / num_pairs, sums

    (_, sums), grads = accumulate_grads(micro_loss, state.params, {k: batch[k] for k in TOKEN_KEYS}, accum_steps)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v / num_pairs for k, v in sums.items()}
    metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_rm_step(model: RewardModel, tx, schedule, mesh: Mesh, state_shardings, *, accum_steps: int):
    step = functools.partial(rm_step, model=model, tx=tx, schedule=schedule, accum_steps=accum_steps)
    return shd.jit_on_mesh(
        step,
        mesh,
        in_shardings=(state_shardings, batch_shardings(mesh)),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def rm_eval_sums(params, batch, *, model: RewardModel):
    valid = batch["valid"].astype(jnp.float32)
    sums = rm_sums(pair_scores(params, batch, model=model), valid)
    sums["pairs"] = jnp.sum(valid)
    return sums


def jit_rm_eval(model: RewardModel, mesh: Mesh, param_shardings):
    shardings = batch_shardings(mesh, (*TOKEN_KEYS, "valid"))
    return shd.jit_on_mesh(
        functools.partial(rm_eval_sums, model=model),
        mesh,
        in_shardings=(param_shardings, shardings),
        out_shardings=NamedSharding(mesh, P()),
    )
