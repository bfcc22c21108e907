"""SFT next-token loss as pure JAX functions: Tülu 3 §4 (supervised finetuning) of Lambert et al. 2024,
as `open_instruct/finetune.py` computes it (`--reduce_loss sum` or `mean`).

Dimension legend: B batch, T time (token positions), V vocabulary.

Losses return (sum, denominator) pairs so that gradient accumulation over micro-batches gives exactly the
token- or sequence-weighted result of the full batch, never a mean of means.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def token_logps(logits_BxTxV: Array, targets_BxT: Array) -> Array:
    """log softmax(logits)[target] per position: float32 [B, T] from logits [B, T, V] (any float dtype) and
    int targets [B, T] in [0, V). Reused by DPO, RLVR scoring and, per chunk, by `chunked_token_logps`."""
    # bf16 logits lose too much in the softmax normaliser, so work in float32. Subtracting the row max
    # *before* gathering keeps exp() finite and makes (target - max) exact even for logits ~1e4, where
    # float32 `logit - logsumexp` would lose ~1e-3. The max cancels in the value, so it carries no gradient.
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    shifted_BxTxV = logits_BxTxV - jax.lax.stop_gradient(jnp.max(logits_BxTxV, axis=-1, keepdims=True))
    log_norm_BxT = jnp.log(jnp.sum(jnp.exp(shifted_BxTxV), axis=-1))
    picked_BxT = jnp.take_along_axis(shifted_BxTxV, targets_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked_BxT - log_norm_BxT


def shift_for_next_token(input_ids_BxT: Array, loss_mask_BxT: Array, segment_ids_BxT: Array) -> tuple[Array, Array]:
    """Targets and float32 weights so that logits at position t predict token t+1 of the same document.

    targets[t] = input_ids[t+1]; weight[t] = loss_mask[t+1] and segment_ids[t+1] == segment_ids[t] != 0.
    The last position has target 0 and weight 0. Segment id 0 marks padding; packed documents never
    predict across their boundary.
    """
    next_ids_BxT = input_ids_BxT[:, 1:]
    same_doc_BxT = (segment_ids_BxT[:, 1:] == segment_ids_BxT[:, :-1]) & (segment_ids_BxT[:, :-1] != 0)
    weights_BxT = (loss_mask_BxT[:, 1:] != 0) & same_doc_BxT
    targets_BxT = jnp.pad(next_ids_BxT, ((0, 0), (0, 1)))
    weights_BxT = jnp.pad(weights_BxT, ((0, 0), (0, 1))).astype(jnp.float32)
    return targets_BxT, weights_BxT


def cross_entropy_sums(logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array) -> tuple[Array, Array]:
    """(Σ weights·NLL, Σ weights), both float32 scalars, from logits [B, T, V], int targets [B, T] and
    weights [B, T] (`shift_for_next_token`'s)."""
    weights_BxT = weights_BxT.astype(jnp.float32)
    nll_BxT = -token_logps(logits_BxTxV, targets_BxT)
    return jnp.sum(weights_BxT * nll_BxT), jnp.sum(weights_BxT)


def _reduce_sum(nll_sum: Array, token_count: Array, num_sequences: Array | int | None) -> Array:
    # Tülu 3's `--reduce_loss sum`: every token of the global batch weighs the same, divisor = #sequences.
    if num_sequences is None:
        raise ValueError("reduction 'sum' needs num_sequences (sequences in the global batch)")
    return nll_sum / num_sequences


def _reduce_mean(nll_sum: Array, token_count: Array, num_sequences: Array | int | None) -> Array:
    # Per-token mean; an all-masked batch gives 0 (double `where` keeps the gradient NaN-free too).
    has_tokens = token_count > 0
    return jnp.where(has_tokens, nll_sum / jnp.where(has_tokens, token_count, 1.0), 0.0)


REDUCTIONS: dict[str, Callable[[Array, Array, Array | int | None], Array]] = {
    "sum": _reduce_sum,
    "mean": _reduce_mean,
}


def reduce_sft(
    nll_sum: Array, token_count: Array, *, reduction: str, num_sequences: Array | int | None = None
) -> Array:
    """Turns (nll_sum, token_count) float32 scalars into the loss. With micro-batching pass the *global*
    count/sequences. Raises ValueError for an unknown reduction, or "sum" without num_sequences."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown SFT reduction {reduction!r}; valid: {', '.join(sorted(REDUCTIONS))}")
    return REDUCTIONS[reduction](nll_sum, token_count, num_sequences)


def sft_loss(
    logits_BxTxV: Array,
    targets_BxT: Array,
    weights_BxT: Array,
    *,
    reduction: str,
    num_sequences: Array | int | None = None,
) -> Array:
    """Scalar SFT loss. "sum": Σ w·NLL / num_sequences (finetune.py's
    `--reduce_loss sum`); "mean": Σ w·NLL / Σ w (0 if no tokens).

    `reduction` is static under jit; `num_sequences` is the number of sequences in the global batch.
    """
    nll_sum, token_count = cross_entropy_sums(logits_BxTxV, targets_BxT, weights_BxT)
    return reduce_sft(nll_sum, token_count, reduction=reduction, num_sequences=num_sequences)
