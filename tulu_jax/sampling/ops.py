"""Sampling math on a batch of next-token logits [B, V]: pure functions, no model.

The order follows vLLM: divide by the temperature, keep the top-k, then keep the nucleus (top-p) of the
renormalised top-k distribution, draw. The reported log-prob is that of the chosen token under this
processed distribution (what vLLM reports with `--logprobs-mode processed_logprobs`), so a PPO ratio
starts at exactly 1. Greedy decoding (temperature 0) takes the argmax and reports the plain temperature-1
log-prob.

Ties are kept together: every token whose logit equals the k-th largest survives top-k, and top-p keeps a
token when the probability mass strictly above it is below p, so the kept set never depends on how a
sort orders equal values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def filter_logits(logits_BxV: Array, top_k: Array | int, top_p: Array | float) -> Array:
    """Logits [B, V] (float) with everything outside the top-k and then the top-p nucleus set to -inf;
    same shape and dtype.

    `top_k` 0 and `top_p` 1 switch each filter off; both may be traced scalars (no recompile per value).
    """
    v = logits_BxV.shape[-1]
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def keep(x_BxV):
        sorted_BxV = -jnp.sort(-x_BxV, axis=-1)  # descending
        kth_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.full((x_BxV.shape[0], 1), jnp.clip(top_k, 1, v) - 1), -1)
        cut_Bx1 = jnp.where(top_k > 0, kth_Bx1, -jnp.inf)
        sorted_BxV = jnp.where(sorted_BxV >= cut_Bx1, sorted_BxV, -jnp.inf)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Mass strictly before each sorted position; it only grows, so the nucleus is a prefix of length m.
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        m_Bx1 = jnp.sum(before_BxV < top_p, axis=-1, keepdims=True)  # >= 1: the first token has 0 before it
        last_Bx1 = jnp.take_along_axis(sorted_BxV, m_Bx1 - 1, -1)
        # p = 1 must be a no-op even where float cumsums reach 1 before the tail ends.
        cut_Bx1 = jnp.where(top_p < 1, jnp.maximum(cut_Bx1, last_Bx1), cut_Bx1)
        return jnp.where(x_BxV >= cut_Bx1, x_BxV, -jnp.inf)

    # The sort is the costly part at vocab 128k; skip it when no filter is on (the RLVR setting).
    return jax.lax.cond((top_k > 0) | (top_p < 1), keep, lambda x: x, logits_BxV)


def processed_logits(logits_BxV: Array, temperature, top_k=0, top_p=1.0) -> Array:
    """Temperature-scaled, filtered float32 logits [B, V]: log_softmax of these is the sampling distribution.
    `temperature` must be > 0 (greedy is handled by `sample_tokens`)."""
    scaled_BxV = logits_BxV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    return filter_logits(scaled_BxV, top_k, top_p)


def chosen_logps(logits_BxV: Array, tokens_B: Array) -> Array:
    """log_softmax(logits [B, V])[b, tokens_B[b]] -> float32 [B]."""
    logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    return jnp.take_along_axis(logp_BxV, tokens_B[:, None].astype(jnp.int32), -1)[:, 0]


def sample_tokens(logits_BxV: Array, key: Array, temperature, top_k=0, top_p=1.0) -> tuple[Array, Array]:
    """Draws one token per row of `logits_BxV` -> (tokens int32 [B], their float32 log-probs [B] under the
    processed distribution). Temperature 0 is greedy; all three knobs may be traced."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)

    def greedy(_):
        tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return tokens_B, chosen_logps(logits_BxV, tokens_B)

    def draw(_):
        processed_BxV = processed_logits(logits_BxV, temperature, top_k, top_p)
        tokens_B = jax.random.categorical(key, processed_BxV, axis=-1).astype(jnp.int32)
        return tokens_B, chosen_logps(processed_BxV, tokens_B)

    return jax.lax.cond(temperature == 0, greedy, draw, None)
