"""The 8B and 70B SFT steps, built from shapes alone and compiled ahead of time for a fake 8-device CPU
mesh: a shape or sharding mistake shows here, not on a pod. No weights are allocated."""

import time

import jax
import numpy as np
import pytest

from tulu_jax import configlib
from tulu_jax.config import SFTConfig
from tulu_jax.models.config import preset
from tulu_jax.models.loading import build_model
from tulu_jax.sharding import batch_sharding, make_mesh
from tulu_jax.train.optimizer import make_optimizer
from tulu_jax.train.sft_step import BATCH_KEYS, jit_sft_step
from tulu_jax.train.state import state_layout

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name,mesh_shape", [("8b", (1, 4, 2)), ("70b", (1, 2, 4))])
def test_full_size_step_compiles_from_shapes(name, mesh_shape):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = configlib.load_config(SFTConfig, str(REPO / f"configs/sft/tulu3_{name}.yaml"), [])
    dcfg = preset(cfg.model.preset)
    model = build_model(dcfg, dtype="bfloat16", param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
    mesh = make_mesh(*mesh_shape)
    tx, schedule = make_optimizer(cfg.optim, 1000)
    abstract, shardings = state_layout(model, tx, mesh)
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    assert abs(n_params - dcfg.num_params) / n_params < 1e-6
    assert n_params > {"8b": 8.0e9, "70b": 70.5e9}[name]
    # The params are split, not replicated: each device holds 1/(fsdp*tensor) of the big matrices.
    up = shardings.params["layers"]["mlp"]["up_kernel"]
    shard = up.shard_shape(abstract.params["layers"]["mlp"]["up_kernel"].shape)
    assert np.prod(shard) * 8 == np.prod(abstract.params["layers"]["mlp"]["up_kernel"].shape)

    rows, seq = 8, 4096
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = {k: jax.ShapeDtypeStruct((rows, seq), np.int32, sharding=batch_sharding(mesh)) for k in BATCH_KEYS}
    step = jit_sft_step(model, tx, schedule, mesh, shardings, reduction=cfg.train.loss_reduction, accum_steps=2)
    t = time.time()
    compiled = step.lower(state, batch).compile()
    assert time.time() - t < 300
    mem = compiled.memory_analysis()
    if mem is not None:  # per-device bytes: parameters + Adam moments dominate
        per_device = mem.argument_size_in_bytes
        expected = 3 * 4 * n_params / 8  # float32 params, mu, nu split over 8 devices
        assert 0.9 * expected < per_device < 1.3 * expected


@pytest.mark.parametrize("name,mesh_shape,live", [("8b", (1, 4, 2), True), ("70b", (1, 2, 4), False)])
def test_full_size_dpo_step_compiles_from_shapes(name, mesh_shape, live):
    """Tülu 3's DPO steps as configured (8B: live reference; 70B: cached reference log-probs), 2,048 tokens
    per side: the reference parameters, when live, are sharded like the policy's."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from tulu_jax.config import DPOConfig
    from tulu_jax.train.dpo_step import PAIR_KEYS, jit_dpo_step

    cfg = configlib.load_config(DPOConfig, str(REPO / f"configs/dpo/tulu3_{name}.yaml"), [])
    assert (cfg.dpo.reference == "live") == live
    dcfg = preset(cfg.model.preset)
    model = build_model(dcfg, dtype="bfloat16", param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
    mesh = make_mesh(*mesh_shape)
    tx, schedule = make_optimizer(cfg.optim, 1000)
    abstract, shardings = state_layout(model, tx, mesh)
    shaped = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(shaped, abstract, shardings)
    pairs, seq = 8, cfg.data.max_seq_len
    batch = {k: jax.ShapeDtypeStruct((pairs, 2, seq), np.int32, sharding=batch_sharding(mesh)) for k in PAIR_KEYS}
    args = (state, batch)
    if live:
        args += (jax.tree.map(shaped, abstract.params, shardings.params),)
    else:
        batch["ref_logps"] = jax.ShapeDtypeStruct((pairs, 2), np.float32, sharding=batch_sharding(mesh))
    step = jit_dpo_step(model, tx, schedule, mesh, shardings, cfg=cfg.dpo, accum_steps=2, live=live)
    mem = step.lower(*args).compile().memory_analysis()
    if mem is not None:
        n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params))
        expected = (3 + live) * 4 * n_params / 8  # params, mu, nu (+ the live reference), split over 8 devices
        assert 0.9 * expected < mem.argument_size_in_bytes < 1.3 * expected
