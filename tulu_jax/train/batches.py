"""Batch layouts shared by every trainer: the key sets, their shardings, and host -> device feeding.

Dimension legend: B rows (or pairs) of the global batch, T tokens per row.

Token batches hold int32 `input_ids`, `loss_mask`, `segment_ids` (0 = padding) and `positions`, either
[B, T] (SFT) or [B, 2, T] (pairs: side 0 chosen, 1 rejected). Rows are split over the `data` and `fsdp`
mesh axes; a pair's two sides always stay on one device.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from tulu_jax import sharding as shd

TOKEN_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


def batch_shardings(mesh: Mesh, keys: Iterable[str] = TOKEN_KEYS) -> dict[str, NamedSharding]:
    """{key: rows split over data+fsdp} for every key (token arrays and per-row arrays alike)."""
    return {k: shd.batch_sharding(mesh) for k in keys}


def process_rows(batch: dict[str, np.ndarray], global_batch: int) -> dict[str, np.ndarray]:
    """This process's slice of a global host batch (every key is split along its first axis)."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return {k: v[start : start + per] for k, v in batch.items()}


def to_device(host_batch: dict[str, np.ndarray], mesh: Mesh, keys: Iterable[str]) -> dict[str, jax.Array]:
    """This process's rows of `keys` -> global arrays split over data+fsdp (multi-host: each process
    passes only its own rows)."""
    sharding = shd.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, host_batch[k]) for k in keys}


def whole_to_device(batch: dict[str, np.ndarray], mesh: Mesh, keys: Iterable[str]) -> dict[str, jax.Array]:
    """The WHOLE global batch of `keys`, the same on every process (e.g. RL episodes process 0 shared) ->
    global arrays split over data+fsdp; each process places only the rows of its own devices."""
    sharding = shd.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, batch[k], global_shape=batch[k].shape) for k in keys}


def real_tokens(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Host-side figures of one batch: `tokens` (non-padding tokens; the reporter turns it into tokens/s)."""
    return {"tokens": float(np.sum(batch["segment_ids"] > 0))}


def packed_tokens(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """`real_tokens` plus `packing_efficiency`, the share of the [B, T] slots holding a real token."""
    stats = real_tokens(batch)
    stats["packing_efficiency"] = stats["tokens"] / batch["segment_ids"].size
    return stats
