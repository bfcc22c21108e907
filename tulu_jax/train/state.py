"""The train state pytree and its shard-first creation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tulu_jax import sharding as shd
from tulu_jax.models.decoder import Decoder
from tulu_jax.models.loading import boxed_param_shapes, param_layout


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data, so checkpoints hold a plain array


def state_layout(model: Decoder, tx: optax.GradientTransformation, mesh: Mesh):
    """(abstract TrainState, its shardings). The optimizer is initialised on the *boxed* abstract
    parameters, so Adam's moments inherit each parameter's logical axes and hence its sharding."""
    boxed = boxed_param_shapes(model)
    abstract_params, param_shardings = param_layout(model, mesh)
    boxed_opt = jax.eval_shape(tx.init, boxed)
    opt_shardings = shd.logical_sharding(nn.get_partition_spec(boxed_opt), mesh)
    abstract_opt = nn.unbox(boxed_opt)
    shd.check_divisible(abstract_opt, opt_shardings, what="optimizer state")
    rep = shd.replicated(mesh)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=abstract_params,
        opt_state=abstract_opt,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)
    return abstract, shardings


def create_state(params, tx: optax.GradientTransformation, seed: int, shardings: TrainState) -> TrainState:
    """Wraps already-sharded params with a fresh optimizer state created in place."""

    def make(p):
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=jax.random.key_data(jax.random.key(seed))
        )

    return jax.jit(make, out_shardings=shardings, donate_argnums=0)(params)


def step_key(state: TrainState, purpose: int = 0) -> jax.Array:
    """The PRNG key of the step `state` is about to take, for stream `purpose` (e.g. 0 dropout, 1 rollouts).

    Everything random in a run derives from the checkpointed `state.rng` and the step counter, never from
    a counter kept outside the state, so a resumed run draws exactly the numbers of an uninterrupted one.
    Works inside jit (`state.step` may be traced)."""
    key = jax.random.wrap_key_data(state.rng)
    return jax.random.fold_in(jax.random.fold_in(key, state.step), purpose)
