"""Shard-first parameter creation: shapes come from `jax.eval_shape`, shardings from the rules table,
and parameters are born (random init) or loaded (Hugging Face) directly in their sharded layout.

The layout and init helpers take any module with a `cfg` that is called as `model(input_ids)` (the Decoder,
the RewardModel)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tulu_jax import sharding as shd
from tulu_jax.models import hf
from tulu_jax.models.config import DecoderConfig
from tulu_jax.models.decoder import Decoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str) -> jnp.dtype:
    """'auto' is bfloat16 on accelerators (GPU/TPU) and float32 on the CPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def _init_fn(model: nn.Module):
    def init(rng):
        ids = jnp.zeros((1, 8), jnp.int32)
        return model.init(rng, ids)["params"]

    return init


def boxed_param_shapes(model: nn.Module):
    """Parameter shapes still wrapped in their logical-axis metadata (nothing allocated)."""
    return jax.eval_shape(_init_fn(model), jax.random.key(0))


def param_layout(model: nn.Module, mesh: Mesh):
    """(abstract params, their NamedShardings) without allocating anything."""
    boxed = boxed_param_shapes(model)
    shardings = shd.logical_sharding(nn.get_partition_spec(boxed), mesh)
    abstract = nn.unbox(boxed)
    shd.check_divisible(abstract, shardings)
    return abstract, shardings


def init_params(model: nn.Module, mesh: Mesh, rng):
    """Random parameters, each created directly on its shards."""
    _, shardings = param_layout(model, mesh)
    init = jax.jit(lambda r: nn.unbox(_init_fn(model)(r)), out_shardings=shardings)
    return init(rng)


def init_param_subtree(model: nn.Module, mesh: Mesh, rng, key: str):
    """`init_params(model, mesh, rng)[key]` without the rest: XLA drops the unused part of the init, so only
    this subtree is ever allocated, on its shards, with the same values a full init would give."""
    _, shardings = param_layout(model, mesh)
    init = jax.jit(lambda r: nn.unbox(_init_fn(model)(r))[key], out_shardings=shardings[key])
    return init(rng)


def load_params(model_dir: str, model: Decoder, mesh: Mesh, dtype=None):
    """The Hugging Face weights in `model_dir`, each placed directly on its shards, in `dtype` (default: the
    model's parameter dtype; a frozen model can load straight into its compute dtype)."""
    abstract, shardings = param_layout(model, mesh)
    return hf.load_hf_params(model_dir, model.cfg, abstract, shardings, dtype=dtype or abstract_dtype(abstract))


def abstract_dtype(abstract):
    return jax.tree_util.tree_leaves(abstract)[0].dtype


def build_model(
    cfg: DecoderConfig,
    *,
    dtype="float32",
    param_dtype="float32",
    remat=False,
    scan_unroll: int = 1,
    attention_block: int = 0,
    module: type[nn.Module] = Decoder,
) -> nn.Module:
    """`module` (the Decoder, or a head on it such as the RewardModel) with dtypes resolved by name."""
    return module(
        cfg,
        dtype=resolve_dtype(dtype),
        param_dtype=resolve_dtype(param_dtype),
        remat=remat,
        scan_unroll=scan_unroll,
        attention_block=attention_block,
    )
