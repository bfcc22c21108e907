"""Gradient accumulation over micro-batches, shared by every train step.

Each micro-batch's loss must already be divided by the *global* denominator (sequences, tokens or
pairs of the whole batch), so the accumulated loss, aux sums and gradients equal the full batch's.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def split_micro(x, accum: int):
    # Strided split: micro-batch a takes rows a, a+A, a+2A... so every micro-batch stays spread over all
    # data-parallel devices instead of living on a slice of them.
    b = x.shape[0]
    return x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)


def accumulate_grads(loss_fn: Callable, params, batch: dict, accum_steps: int):
    """((loss, aux), grads) of `loss_fn(params, micro_batch) -> (loss, aux)` summed over micro-batches.

    `aux` is a pytree of arrays that add up across micro-batches (sums, not means).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        return grad_fn(params, batch)
    micro = {
        k: nn.with_logical_constraint(split_micro(v, accum_steps), (None, "batch") + (None,) * (v.ndim - 1))
        for k, v in batch.items()
    }

    def body(carry, mb):
        return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (loss_shape, _) = jax.eval_shape(grad_fn, params, first)
    zero = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), loss_shape), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(body, zero, micro)
    return total
