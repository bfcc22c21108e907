"""Prefill and the decode loop as pure functions of (params, arrays): the sampler jits them on a mesh.

Prompts come left-padded to a common length P, so every row's next token goes to the same cache slot
and one decode step serves the whole batch. Positions are the exclusive cumsum of the prompt mask, so
left padding does not shift RoPE (the RLVR scoring pass uses the same positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tulu_jax.models.decoder import Decoder, KVCache
from tulu_jax.sampling.ops import sample_tokens

Array = jax.Array


def prompt_positions(mask_BxP: Array) -> Array:
    """Exclusive cumsum of the attention mask [B, P] -> int32 [B, P]: 0 for every pad and for each row's
    first token, so a left-padded row gets the same RoPE positions as the unpadded one."""
    mask_BxP = mask_BxP.astype(jnp.int32)
    return jnp.cumsum(mask_BxP, axis=1) - mask_BxP


def prefill(model: Decoder, params, prompt_BxP: Array, mask_BxP: Array, max_tokens: int) -> tuple[Array, KVCache]:
    """Runs the prompts through the model into a fresh cache of P + max_tokens slots.

    `prompt_BxP` int32 left-padded prompts, `mask_BxP` 1 on real tokens. -> (float32 logits of each row's
    next token [B, V], the cache in the model's compute dtype)."""
    b, p = prompt_BxP.shape
    cache = KVCache.empty(model.cfg, b, p + max_tokens, model.dtype).constrain()
    ids_BxP = jnp.where(mask_BxP != 0, prompt_BxP, 0)  # a pad id may lie outside the vocabulary
    logits_Bx1xV, cache = model.apply(
        {"params": params}, ids_BxP, prompt_positions(mask_BxP), mask_BxP.astype(jnp.int32), "last_logits", cache
    )
    return logits_Bx1xV[:, 0], cache


def decode(
    model: Decoder,
    params,
    logits_BxV: Array,
    cache: KVCache,
    prompt_lens_B: Array,
    key: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
    stop_ids_S: Array,
    pad_id: int,
    max_tokens: int,
) -> tuple[dict[str, Array], KVCache]:
    """Samples up to `max_tokens` tokens per row in one `lax.while_loop` that exits once every row has
    produced a stop token (`stop_ids_S`, EOS among them; the stop token is kept).

    `logits_BxV` are prefill's float32 next-token logits, `prompt_lens_B` int32 real prompt lengths (the
    first new token's position), `key` a PRNG key (folded with the step index), the three sampling knobs
    traced scalars (see `ops.sample_tokens`), `stop_ids_S` int32 [S].

    -> ({"tokens": int32 [B, M] (pad_id after a row ends), "logps": float32 [B, M] (0 there), "lengths":
    int32 [B] (tokens generated, stop included), "stopped": bool [B] (ended on a stop token), "steps": int32
    (decode iterations run)}, the final cache (returned so a caller can donate the input cache and have it
    updated in place))."""
    b = logits_BxV.shape[0]

    def cond(state):
        t, _, _, _, _, _, done_B = state
        return (t < max_tokens) & ~jnp.all(done_B)

    def body(state):
        t, logits_BxV, cache, tokens_BxM, logps_BxM, lengths_B, done_B = state
        tok_B, logp_B = sample_tokens(logits_BxV, jax.random.fold_in(key, t), temperature, top_k, top_p)
        tokens_BxM = tokens_BxM.at[:, t].set(jnp.where(done_B, pad_id, tok_B))
        logps_BxM = logps_BxM.at[:, t].set(jnp.where(done_B, 0.0, logp_B))
        lengths_B = lengths_B + (~done_B).astype(jnp.int32)
        done_B = done_B | jnp.any(tok_B[:, None] == stop_ids_S[None, :], axis=-1)
        # Finished rows keep stepping (the batch moves in lockstep) on a harmless in-vocabulary token.
        step_Bx1 = jnp.where(done_B, 0, tok_B)[:, None]
        logits_Bx1xV, cache = model.apply(
            {"params": params},
            step_Bx1,
            (prompt_lens_B + t)[:, None],
            jnp.ones_like(step_Bx1),
            "last_logits",
            cache,
        )
        return t + 1, logits_Bx1xV[:, 0], cache, tokens_BxM, logps_BxM, lengths_B, done_B

    state = (
        jnp.zeros((), jnp.int32),
        logits_BxV,
        cache,
        jnp.full((b, max_tokens), pad_id, jnp.int32),
        jnp.zeros((b, max_tokens), jnp.float32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b,), bool),
    )
    steps, _, cache, tokens_BxM, logps_BxM, lengths_B, done_B = jax.lax.while_loop(cond, body, state)
    out = {"tokens": tokens_BxM, "logps": logps_BxM, "lengths": lengths_B, "stopped": done_B, "steps": steps}
    return out, cache
