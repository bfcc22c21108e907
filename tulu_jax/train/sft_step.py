"""The SFT train step (Tülu 3 §4; open-instruct `finetune.py`): a pure `(state, batch) -> (state, metrics)`,
jitted once with explicit shardings.

Each micro-batch contributes the gradient of its *sum* of token losses divided by the *global*
denominator (sequences for Tülu 3's sum reduction, trained tokens for the mean), so accumulated and
full-batch gradients are the same number (`accumulate.accumulate_grads`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tulu_jax import sharding as shd
from tulu_jax.losses import reduce_sft, shift_for_next_token
from tulu_jax.models.decoder import Decoder
from tulu_jax.train.accumulate import accumulate_grads
from tulu_jax.train.batches import TOKEN_KEYS, batch_shardings
from tulu_jax.train.forward import next_token_logps
from tulu_jax.train.state import TrainState


def count_sequences(batch) -> jax.Array:
    """Documents in a (possibly packed) batch: each starts where its position is 0 on a real token."""
    return jnp.sum((batch["positions"] == 0) & (batch["segment_ids"] > 0)).astype(jnp.float32)


def sft_step(
    state: TrainState,
    batch,
    *,
    model: Decoder,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    reduction: str,
    accum_steps: int,
    logits_chunk: int = 0,
):
    """One optimizer step on a [B, T] token batch (TOKEN_KEYS, int32). Metrics (float32 scalars): loss
    (`reduction`: "sum" = summed token NLL / sequences of the global batch, Tülu 3's; "mean" = per token),
    nll_per_token, grad_norm, learning_rate, trained_tokens, sequences. `accum_steps` micro-batches give
    the full batch's gradient exactly. `logits_chunk` > 0 computes log-probs that many positions at a time."""
    _, weights_BxT = shift_for_next_token(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
    num_tokens = jnp.sum(weights_BxT)
    num_seqs = count_sequences(batch)

    def micro_loss(params, mb):
        # Chunked LM head: the float32 [B, T, V] logits never exist whole (tulu_jax/losses/logps.py).
        logps = next_token_logps(
            model, params, mb["input_ids"], mb["positions"], mb["segment_ids"], chunk_size=logits_chunk
        )
        _, weights = shift_for_next_token(mb["input_ids"], mb["loss_mask"], mb["segment_ids"])
        nll_sum = -jnp.sum(weights * logps)
        # The *global* denominators: micro-batch losses then add up to the full-batch loss exactly.
        return reduce_sft(nll_sum, num_tokens, reduction=reduction, num_sequences=jnp.maximum(num_seqs, 1.0)), nll_sum

    batch = {k: batch[k] for k in TOKEN_KEYS}
    (loss, nll_sum), grads = accumulate_grads(micro_loss, state.params, batch, accum_steps)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "nll_per_token": nll_sum / jnp.maximum(num_tokens, 1.0),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "trained_tokens": num_tokens,
        "sequences": num_seqs,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_sft_step(
    model: Decoder,
    tx,
    schedule,
    mesh: Mesh,
    state_shardings: TrainState,
    *,
    reduction: str,
    accum_steps: int,
    logits_chunk: int = 0,
):
    """Compiles `sft_step` once for this mesh: state donated, batch sharded over data+fsdp."""
    step = functools.partial(
        sft_step,
        model=model,
        tx=tx,
        schedule=schedule,
        reduction=reduction,
        accum_steps=accum_steps,
        logits_chunk=logits_chunk,
    )
    rep = NamedSharding(mesh, P())
    return shd.jit_on_mesh(
        step,
        mesh,
        in_shardings=(state_shardings, batch_shardings(mesh)),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )


def sft_eval_sums(params, batch, *, model: Decoder, logits_chunk: int = 0):
    """Forward only: (summed NLL of trained tokens, trained tokens, sequences) of one [B, T] batch, float32
    scalars. Rows with segment ids all 0 (fillers) contribute nothing."""
    logps = next_token_logps(
        model, params, batch["input_ids"], batch["positions"], batch["segment_ids"], chunk_size=logits_chunk
    )
    _, weights = shift_for_next_token(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
    nll_sum, count = -jnp.sum(weights * logps), jnp.sum(weights)
    return nll_sum, count, count_sequences(batch)


def jit_sft_eval(model: Decoder, mesh: Mesh, param_shardings, *, logits_chunk: int = 0):
    return shd.jit_on_mesh(
        functools.partial(sft_eval_sums, model=model, logits_chunk=logits_chunk),
        mesh,
        in_shardings=(param_shardings, batch_shardings(mesh)),
        out_shardings=NamedSharding(mesh, P()),
    )
