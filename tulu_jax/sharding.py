"""Device meshes and the one table that maps logical axis names to mesh axes.

Model code names its dimensions ("embed", "heads", ...); nothing else in the library writes a
PartitionSpec by hand. Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded
parameters and optimizer state), `tensor` (Megatron-style model parallel over heads/MLP/vocab).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters: embed over fsdp (ZeRO-3 style), heads/mlp/vocab over tensor.
# Activations: batch over data+fsdp, hidden features replicated, head/mlp/vocab features over tensor.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    # The input embedding keeps its vocab rows whole: a token lookup from a vocab-sharded table makes
    # XLA replicate and re-split the activations (it warns "involuntary full rematerialization").
    ("embed_vocab", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fills in at most one -1 with the remaining devices; the product must equal num_devices."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes (product {known})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are available")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) Mesh over `devices` (default: every device of the job, all processes'; their
    order is process-major, so each process holds a contiguous block of the data axis). At most one size
    may be -1 (the remaining devices); ValueError from `resolve_mesh_shape` when the sizes do not multiply
    to the device count."""
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    # Tensor-parallel neighbours should share the fastest links: keep it the innermost axis.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_sharding(logical_specs, mesh: Mesh):
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (the leading axis) split over the data and fsdp axes; the other axes whole on each device."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of `mesh` (scalars, RNG keys, small per-step values)."""
    return NamedSharding(mesh, P())


def check_divisible(abstract_tree, sharding_tree, what: str = "parameter") -> None:
    """Raises if a sharded dimension does not divide evenly: we never replicate silently."""
    flat_a = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_s = jax.tree_util.tree_leaves(sharding_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat_a, flat_s):
        spec = sharding.spec
        for dim, axes in enumerate(spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = math.prod(sharding.mesh.shape[a] for a in axes)
            if leaf.shape[dim] % n:
                name = jax.tree_util.keystr(path)
                raise ValueError(
                    f"{what} {name} of shape {leaf.shape}: dimension {dim} ({leaf.shape[dim]}) is not divisible by "
                    f"mesh axes {axes} (size {n}); choose another mesh.* shape"
                )


def _global_inputs(arg, shardings):
    """`arg` with every host (numpy) leaf made a global jax.Array of its `shardings` entry (a prefix tree of
    `arg`), assuming every process passes the same values: a multi-process jit refuses host inputs."""

    def place(sharding, sub):
        def one(x):
            if isinstance(x, jax.Array) or sharding is None:
                return x
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(one, sub)

    return jax.tree.map(place, shardings, arg, is_leaf=lambda s: s is None or isinstance(s, jax.sharding.Sharding))


def jit_on_mesh(fn, mesh: Mesh, *, in_shardings, out_shardings, donate_argnums=()):
    """`jax.jit` whose calls (and `.lower`) run under `mesh` and the logical rules table, so the
    model's logical constraints resolve to this mesh. In a multi-process job a host (numpy) argument must
    hold the SAME values on every process: it becomes a global array of its sharding. Rows that differ per
    process (a data slice) must arrive as global arrays already (`train.batches.to_device`)."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)

    def run(*args):
        if jax.process_count() > 1:  # host inputs must become global arrays first (every process holds the same)
            per_arg = in_shardings if isinstance(in_shardings, (tuple, list)) else (in_shardings,) * len(args)
            args = tuple(_global_inputs(a, s) for a, s in zip(args, per_arg))
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return jitted(*args)

    def lower(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return jitted.lower(*args)

    run.lower = lower
    return run
