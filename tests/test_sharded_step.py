"""A sharded SFT step gives the single-device numbers, whatever the mesh; micro-batching (gradient
accumulation) gives the full-batch numbers. Needs 8 host devices (conftest sets XLA_FLAGS)."""

import jax
import numpy as np
import optax
import pytest

from tulu_jax.models.config import DecoderConfig
from tulu_jax.models.loading import build_model, init_params
from tulu_jax.sharding import make_mesh
from tulu_jax.train.optimizer import OptimConfig, make_optimizer
from tulu_jax.train.sft_step import jit_sft_step
from tulu_jax.train.state import create_state, state_layout

CFG = DecoderConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16
)


def _batch(rows=8, length=32, seed=0):
    rng = np.random.default_rng(seed)
    lens = [20, 10]  # two packed documents and two pad tokens per row
    seg = np.array([1] * lens[0] + [2] * lens[1] + [0] * (length - sum(lens)))
    pos = np.concatenate([np.arange(lens[0]), np.arange(lens[1]), np.zeros(length - sum(lens), int)])
    return {
        "input_ids": rng.integers(0, 256, (rows, length)).astype(np.int32),
        "loss_mask": (rng.random((rows, length)) < 0.6).astype(np.int32) * (seg > 0),
        "segment_ids": np.tile(seg, (rows, 1)).astype(np.int32),
        "positions": np.tile(pos, (rows, 1)).astype(np.int32),
    }


def _run(mesh_shape, accum=1, reduction="sum", steps=2, sgd=False, logits_chunk=0):
    n = int(np.prod(mesh_shape))
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:n])
    model = build_model(CFG)
    if sgd:  # plain SGD at lr 1 turns the parameter update into the exact negative gradient
        tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    else:
        tx, schedule = make_optimizer(OptimConfig(lr=1e-3, warmup_ratio=0.0), 10)
    _, shardings = state_layout(model, tx, mesh)
    state = create_state(init_params(model, mesh, jax.random.key(0)), tx, 0, shardings)
    start = jax.tree.map(np.asarray, jax.device_get(state.params))
    step = jit_sft_step(
        model, tx, schedule, mesh, shardings, reduction=reduction, accum_steps=accum, logits_chunk=logits_chunk
    )
    losses, norms = [], []
    for i in range(steps):
        state, m = step(state, _batch(seed=i))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    end = jax.tree.map(np.asarray, jax.device_get(state.params))
    if sgd:
        return np.array(losses), np.array(norms), jax.tree.map(lambda a, b: a - b, start, end)
    return np.array(losses), np.array(norms), end


@pytest.fixture(scope="module")
def single():
    return {r: _run((1, 1, 1), reduction=r, sgd=True, steps=1) for r in ("sum", "mean")}


MESHES = [(2, 2, 2), (1, 8, 1), (1, 2, 4), (8, 1, 1), (2, 1, 4)]


@pytest.mark.parametrize("mesh_shape,logits_chunk", [(m, 0) for m in MESHES] + [((2, 2, 2), 24)], ids=lambda x: str(x))
def test_sharded_loss_and_gradients_equal_single_device(single, mesh_shape, logits_chunk):
    """Sharded = single device; with a logits chunk that does not divide the length, the chunked LM head
    (the trainers' default path) gives the same numbers too."""
    losses, norms, grads = _run(mesh_shape, sgd=True, steps=1, logits_chunk=logits_chunk)
    ref_losses, ref_norms, ref_grads = single["sum"]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def single_adamw():
    """Three AdamW steps on one device: the reference every mesh's AdamW run is compared with."""
    return _run((1, 1, 1), steps=3)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_sharded_adamw_steps_track_single_device(single_adamw, mesh_shape):
    losses, _, params = _run(mesh_shape, steps=3)
    ref_losses, _, ref_params = single_adamw
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        # Adam divides by sqrt(v): near-zero gradients turn float32 rounding into ~1% of one lr-sized update.
        np.testing.assert_allclose(a, b, atol=5e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("accum,mesh_shape", [(4, (1, 1, 1)), (2, (2, 2, 2))])
def test_gradient_accumulation_equals_full_batch(single, reduction, accum, mesh_shape):
    losses, norms, params = _run(mesh_shape, accum=accum, reduction=reduction, sgd=True, steps=1)
    ref_losses, ref_norms, ref_params = single[reduction]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_indivisible_mesh_is_an_error():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = make_mesh(1, 1, 8)  # 4 KV heads cannot split 8 ways
    model = build_model(CFG)
    tx, _ = make_optimizer(OptimConfig(), 10)
    with pytest.raises(ValueError, match="not divisible"):
        state_layout(model, tx, mesh)
