"""Next-token log-probs straight from hidden states, without keeping float32 [B, T, V] logits alive.

Dimension legend: B batch, T time (token positions), C positions per chunk, D hidden, V vocabulary.

At Tülu 3's lengths the logits are the largest activation of a step: 4,096 positions x 128,256 Llama-3
tokens in float32 are 2.1 GB per sequence, and autodiff keeps that buffer (and the softmax made from it)
for the backward pass. `chunked_token_logps` runs the LM head and the log-softmax over C positions at a
time in a `lax.map` whose body is `jax.checkpoint`ed: the forward keeps only each chunk's [B, C] log-probs,
and the backward recomputes one chunk's logits at a time. Peak logits memory falls from B·T·V to B·C·V
floats for one extra head matmul per chunk in the backward pass (the remat trade, like `model.remat` for
the layers). The per-chunk arithmetic is `token_logps` on the same einsum as `Decoder`'s LM head, so
values and gradients equal the unchunked path to float32 rounding (the sums over chunks of the head's
gradient are accumulated in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tulu_jax.config import ModelConfig
from tulu_jax.losses.sft import token_logps

Array = jax.Array

# Positions per chunk: `model.logits_chunk`'s default (tulu_jax/config.py). 512 cuts the float32
# logits of a 4,096-token Llama-3 sequence 8x (2.1 GB -> 263 MB, times the rows per device) while each
# chunk's head matmul, [B·512, D] x [D, V], stays large enough to run at full rate on a GPU. Smaller chunks
# save little more (other buffers dominate then: XLA's plan for the 8B SFT step at one sequence per device
# needs the same temp memory at 512 and 1,024) and add per-chunk overhead: the loop, and a float32
# read-modify-write of the head's gradient (D·V floats) per chunk in the backward pass.
DEFAULT_LOGITS_CHUNK = ModelConfig().logits_chunk


def head_logits(hidden_BxTxD: Array, head_DxV: Array, dtype=None) -> Array:
    """float32 logits [B, T, V] = hidden @ head, with both operands cast to `dtype` (default: hidden's
    dtype) and float32 accumulation: the `Decoder`'s LM head (tulu_jax/models/decoder.py)."""
    dtype = hidden_BxTxD.dtype if dtype is None else dtype
    return jnp.einsum(
        "btd,dv->btv", hidden_BxTxD.astype(dtype), head_DxV.astype(dtype), preferred_element_type=jnp.float32
    )


def _chunk_logps(hidden_BxCxD: Array, head_DxV: Array, targets_BxC: Array, dtype, temperature: float = 1.0) -> Array:
    # The head is cast *inside* the chunk so that its gradient reaches the float32 parameter chunk by chunk
    # and is summed in float32, not rounded to `dtype` after every chunk.
    logits = head_logits(hidden_BxCxD, head_DxV, dtype)
    return token_logps(logits if temperature == 1.0 else logits / temperature, targets_BxC)


def chunked_token_logps(
    hidden_BxTxD: Array, head_DxV: Array, targets_BxT: Array, *, chunk_size: int, dtype=None, temperature: float = 1.0
) -> Array:
    """log softmax(hidden @ head)[target] per position -> float32 logps [B, T], C = `chunk_size` positions
    of every row at a time.

    hidden_BxTxD: final-normed hidden states (`Decoder(..., output="hidden")`), any float dtype.
    head_DxV: the LM head (`params["lm_head"]`, or `params["embed"].T` for tied embeddings), usually float32.
    targets_BxT: int token ids in [0, V) (ids outside give an undefined value; mask them with weights).
    dtype: matmul operand dtype (the model's compute dtype); default hidden's dtype. Accumulation, the
        log-softmax and the result are float32 whatever it is.
    chunk_size: positions per chunk; 0 or >= T computes all positions at once (the plain path, which
        materialises [B, T, V]). T need not be a multiple: the last T mod C positions form a smaller chunk.
    temperature: the logits are divided by it before the log-softmax (RL: the sampling temperature, so the
        log-probs are those of the distribution the responses were drawn from; a Python float > 0).

    Raises ValueError for a negative chunk_size or mismatched shapes. Equals `token_logps` of
    `head_logits(hidden, head, dtype)`, gradients included, to float32 rounding; only the memory differs.
    """
    checked = _check(hidden_BxTxD, head_DxV, targets_BxT, chunk_size)
    dtype = checked if dtype is None else dtype
    if chunk_size == 0 or chunk_size >= hidden_BxTxD.shape[1]:  # the plain path: no remat of the head
        return _chunk_logps(hidden_BxTxD, head_DxV, targets_BxT, dtype, temperature)
    body = jax.checkpoint(lambda h, y: _chunk_logps(h, head_DxV, y, dtype, temperature), prevent_cse=False)
    return _over_chunks(body, hidden_BxTxD, targets_BxT, chunk_size)


def _check(hidden_BxTxD: Array, head_DxV: Array, targets_BxT: Array, chunk_size: int):
    """The matmul dtype default (hidden's) after checking shapes and chunk_size (ValueError)."""
    b, t, d = hidden_BxTxD.shape
    if head_DxV.ndim != 2 or head_DxV.shape[0] != d:
        raise ValueError(f"head shape {head_DxV.shape} does not match hidden size {d} (expected [D, V])")
    if targets_BxT.shape != (b, t):
        raise ValueError(f"targets shape {targets_BxT.shape} != hidden's [B, T] = {(b, t)}")
    if chunk_size < 0:
        raise ValueError(f"logits chunk_size must be >= 0 (0 = unchunked), got {chunk_size}")
    return hidden_BxTxD.dtype


def _over_chunks(body, hidden_BxTxD: Array, targets_BxT: Array, chunk_size: int):
    """`body(hidden [B, C, D], targets [B, C]) -> pytree of [B, C]` over C positions at a time (all at once for
    chunk_size 0 or >= T), reassembled to [B, T] per leaf."""
    b, t, d = hidden_BxTxD.shape
    if chunk_size == 0 or chunk_size >= t:
        return body(hidden_BxTxD, targets_BxT)
    n, tail = divmod(t, chunk_size)
    full = n * chunk_size
    # [B, n·C, ...] -> [n, B, C, ...]: the mapped axis leads; rows keep their (batch) sharding.
    h_NxBxCxD = hidden_BxTxD[:, :full].reshape(b, n, chunk_size, d).swapaxes(0, 1)
    y_NxBxC = targets_BxT[:, :full].reshape(b, n, chunk_size).swapaxes(0, 1)
    out = jax.lax.map(lambda xs: body(*xs), (h_NxBxCxD, y_NxBxC))
    out = jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(b, full), out)
    if tail:
        rest = body(hidden_BxTxD[:, full:], targets_BxT[:, full:])
        out = jax.tree.map(lambda a, r: jnp.concatenate([a, r], axis=1), out, rest)
    return out


def chunked_logps_and_entropy(
    hidden_BxTxD: Array, head_DxV: Array, targets_BxT: Array, *, chunk_size: int, dtype=None, temperature: float = 1.0
) -> tuple[Array, Array]:
    """(logps [B, T], entropy [B, T]), both float32: `chunked_token_logps`'s log-probs plus the entropy
    −Σ_v p_v log p_v of each position's whole next-token distribution (logits / temperature), C positions at a
    time. For no-gradient passes (RL: the policy's log-probs of its rollouts, whose entropy is logged); same
    arguments and errors as `chunked_token_logps`."""
    from tulu_jax.rl.losses import entropy_from_logits

    checked = _check(hidden_BxTxD, head_DxV, targets_BxT, chunk_size)
    dtype = checked if dtype is None else dtype

    def body(h, y):
        logits = head_logits(h, head_DxV, dtype)
        logits = logits if temperature == 1.0 else logits / temperature
        return token_logps(logits, y), entropy_from_logits(logits)

    return _over_chunks(body, hidden_BxTxD, targets_BxT, chunk_size)
