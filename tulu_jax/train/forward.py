"""Model glue for the memory-bounded next-token log-probs that SFT, DPO, RM and RLVR scoring share.

`next_token_logps` runs the `Decoder` to its final-normed hidden states and hands them, with the LM head,
to `tulu_jax.losses.logps.chunked_token_logps`, so the float32 [B, T, V] logits never exist whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tulu_jax.losses.logps import chunked_logps_and_entropy, chunked_token_logps
from tulu_jax.models.decoder import Decoder

Array = jax.Array


def lm_head(model: Decoder, params) -> Array:
    """The LM head [D, V] in the parameters' dtype: `embed`ᵀ for tied embeddings, else `lm_head`."""
    return params["embed"].T if model.cfg.tie_embeddings else params["lm_head"]


def next_targets(input_ids_BxT: Array) -> Array:
    """targets[t] = input_ids[t+1], 0 at the last position: the targets of `shift_for_next_token`."""
    return jnp.pad(input_ids_BxT[:, 1:], ((0, 0), (0, 1)))


def next_token_logps(
    model: Decoder,
    params,
    input_ids_BxT: Array,
    positions_BxT: Array,
    segment_ids_BxT: Array,
    *,
    chunk_size: int,
    temperature: float = 1.0,
) -> Array:
    """float32 logps [B, T]: log p(input_ids[t+1] | tokens ≤ t) at position t (the last position predicts
    token 0; weight it out, as `tulu_jax.losses.shift_for_next_token`'s weights do, together with padding
    and document boundaries).

    `params` are the Decoder's (tied or untied head); `chunk_size` positions at a time go through the LM head
    (0 = all at once, see `chunked_token_logps`); `temperature` divides the logits first (RL log-probs of the
    sampling distribution). Equal to `token_logps(model.apply(...), targets)`, with
    gradients, to float32 rounding.
    """
    return chunked_token_logps(
        *_head_inputs(model, params, input_ids_BxT, positions_BxT, segment_ids_BxT),
        chunk_size=chunk_size,
        dtype=model.dtype,
        temperature=temperature,
    )


def _head_inputs(model: Decoder, params, input_ids_BxT, positions_BxT, segment_ids_BxT):
    """(final-normed hidden states [B, T, D], LM head [D, V], next-token targets [B, T]) of one forward pass."""
    hidden_BxTxD = model.apply({"params": params}, input_ids_BxT, positions_BxT, segment_ids_BxT, output="hidden")
    return hidden_BxTxD, lm_head(model, params), next_targets(input_ids_BxT)


def next_token_logps_and_entropy(
    model: Decoder,
    params,
    input_ids_BxT: Array,
    positions_BxT: Array,
    segment_ids_BxT: Array,
    *,
    chunk_size: int,
    temperature: float = 1.0,
) -> tuple[Array, Array]:
    """`next_token_logps` plus the entropy of every position's next-token distribution (float32 [B, T] each),
    for forward-only passes (`chunked_logps_and_entropy`)."""
    return chunked_logps_and_entropy(
        *_head_inputs(model, params, input_ids_BxT, positions_BxT, segment_ids_BxT),
        chunk_size=chunk_size,
        dtype=model.dtype,
        temperature=temperature,
    )
