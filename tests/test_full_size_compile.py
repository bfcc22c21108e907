"""Full-size steps built from shapes alone and compiled ahead of time for a fake 8-device CPU mesh: a shape,
sharding or memory mistake shows here, not on a pod. No weights are allocated.

* 8B and 70B SFT and DPO steps as the Tülu 3 configs set them: parameters (and Adam state) really split.
* Per-device memory of the 8B SFT, DPO and reward-model steps and of the 8B local sampler (prefill and
  decode) at the reference's per-device batch: it must fit an 80 GB device (H100/A100-80GB, what
  open-instruct's 8B runs used). `compiled.memory_analysis()` gives per-device byte counts of XLA's buffer
  assignment: arguments + outputs - donated (aliased) outputs + temporaries is the peak it plans for.
  The CPU backend's plan is a proxy for a GPU's (fusion and layout choices differ), not a measurement.

Run with `-s` to see the figures (argument / output / alias / temp GB per device).
"""

import functools
import time

import jax
import numpy as np
import pytest

from tulu_jax import configlib
from tulu_jax.config import DPOConfig, SFTConfig
from tulu_jax.models.config import preset
from tulu_jax.models.loading import build_model
from tulu_jax.sharding import batch_sharding, make_mesh
from tulu_jax.train.optimizer import make_optimizer
from tulu_jax.train.state import state_layout

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
DEVICE_BYTES = 80e9  # one H100/A100 80 GB
ACCUM = 2  # micro-batches per step: enough to compile the accumulation loop and its gradient buffer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"),
]


def _shaped(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _n_params(abstract_params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params)))


def _load(cls, path: str, mesh_shape=None):
    """The config at `path` with its model's shape from a preset (no weights: `model.path` stays null), and
    the mesh it sets (or `mesh_shape`)."""
    size = "70b" if "70b" in path else "8b"
    cfg = configlib.load_config(cls, str(REPO / path), [f"model.preset=llama3.1-{size}"])
    shape = mesh_shape or (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return cfg, make_mesh(*shape)


def _model(cfg, module=None):
    """The configured model in bfloat16 compute (what `model.dtype: auto` picks on a GPU)."""
    m = cfg.model
    return build_model(
        preset(m.preset),
        dtype="bfloat16",
        param_dtype=m.param_dtype,
        remat=m.remat,
        scan_unroll=m.scan_unroll,
        attention_block=m.attention_block,
        **({} if module is None else {"module": module}),
    )


def _memory(compiled) -> dict[str, float] | None:
    """Per-device bytes of a compiled executable, or None where the backend does not report them."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    out = {
        "argument": mem.argument_size_in_bytes,
        "output": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _report(what: str, mem: dict[str, float], seconds: float) -> None:
    gb = {k: v / 1e9 for k, v in mem.items()}
    print(
        f"\n[memory] {what}: argument {gb['argument']:.2f} GB, output {gb['output']:.2f} GB, alias "
        f"{gb['alias']:.2f} GB, temp {gb['temp']:.2f} GB, total {gb['total']:.2f} GB per device "
        f"(compiled in {seconds:.0f} s)"
    )


def _compile(step, *args):
    t = time.time()
    compiled = step.lower(*args).compile()
    return compiled, time.time() - t


@functools.cache
def compile_sft(name: str, rows_per_device: int, mesh_shape: tuple[int, int, int] | None):
    """(compiled SFT step, abstract params, seconds) for configs/sft/tulu3_{name}.yaml at its max_seq_len, on
    `mesh_shape` or (None) the mesh the config sets. Cached: the tests that share a compile pass equal keys."""
    from tulu_jax.train.batches import TOKEN_KEYS
    from tulu_jax.train.sft_step import jit_sft_step

    cfg, mesh = _load(SFTConfig, f"configs/sft/tulu3_{name}.yaml", mesh_shape)
    model = _model(cfg)
    tx, schedule = make_optimizer(cfg.optim, 1000)
    abstract, shardings = state_layout(model, tx, mesh)
    rows = rows_per_device * mesh.size * ACCUM
    batch = {
        k: jax.ShapeDtypeStruct((rows, cfg.data.max_seq_len), np.int32, sharding=batch_sharding(mesh))
        for k in TOKEN_KEYS
    }
    step = jit_sft_step(
        model,
        tx,
        schedule,
        mesh,
        shardings,
        reduction=cfg.train.loss_reduction,
        accum_steps=ACCUM,
        logits_chunk=cfg.model.logits_chunk,
    )
    compiled, seconds = _compile(step, _shaped(abstract, shardings), batch)
    return compiled, abstract, shardings, seconds


@functools.cache
def compile_dpo(name: str, pairs_per_device: int, mesh_shape: tuple[int, int, int] | None):
    """(compiled DPO step, abstract state, seconds) for configs/dpo/tulu3_{name}.yaml as configured (live or
    cached reference), each side `data.max_seq_len` tokens, on `mesh_shape` or (None) the configured mesh."""
    from tulu_jax.train.batches import TOKEN_KEYS
    from tulu_jax.train.dpo_step import LossParams, jit_dpo_step

    cfg, mesh = _load(DPOConfig, f"configs/dpo/tulu3_{name}.yaml", mesh_shape)
    live = cfg.dpo.reference == "live"
    model = _model(cfg)
    tx, schedule = make_optimizer(cfg.optim, 1000)
    abstract, shardings = state_layout(model, tx, mesh)
    pairs, rows = pairs_per_device * mesh.size * ACCUM, batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((pairs, 2, cfg.data.max_seq_len), np.int32, sharding=rows) for k in TOKEN_KEYS}
    args = (_shaped(abstract, shardings), batch)
    if live:
        args += (_shaped(abstract.params, shardings.params),)
    else:
        batch["ref_logps"] = jax.ShapeDtypeStruct((pairs, 2), np.float32, sharding=rows)
    d = cfg.dpo
    loss = LossParams(d.loss, d.beta, d.label_smoothing, d.gamma_beta_ratio)
    chunk = cfg.model.logits_chunk
    step = jit_dpo_step(
        model, tx, schedule, mesh, shardings, cfg=loss, accum_steps=ACCUM, live=live, logits_chunk=chunk
    )
    compiled, seconds = _compile(step, *args)
    return compiled, abstract, live, seconds


# 8B on its configured mesh (fsdp over all 8 devices: the compile the 80 GB test below reuses), 70B with
# tensor parallelism in the mesh: both kinds of split, one full-size compile each.
MESHES = [("8b", None), ("70b", (1, 2, 4))]


@pytest.mark.parametrize("name,mesh_shape", MESHES)
def test_full_size_sft_step_splits_parameters(name, mesh_shape):
    """Tülu 3's 8B and 70B SFT steps (4,096 tokens): parameters and Adam state split over all 8 devices,
    by fsdp alone (8B) and by fsdp x tensor (70B)."""
    compiled, abstract, shardings, _ = compile_sft(name, 1, mesh_shape)
    n_params = _n_params(abstract.params)
    dcfg = preset(f"llama3.1-{name}")
    assert abs(n_params - dcfg.num_params) / n_params < 1e-6
    assert n_params > {"8b": 8.0e9, "70b": 70.5e9}[name]
    # The params are split, not replicated: each device holds 1/(fsdp*tensor) of the big matrices.
    up = shardings.params["layers"]["mlp"]["up_kernel"]
    shard = up.shard_shape(abstract.params["layers"]["mlp"]["up_kernel"].shape)
    assert np.prod(shard) * 8 == np.prod(abstract.params["layers"]["mlp"]["up_kernel"].shape)
    mem = _memory(compiled)
    if mem is not None:  # parameters + Adam moments dominate the arguments
        expected = 3 * 4 * n_params / 8  # float32 params, mu, nu split over 8 devices
        assert 0.9 * expected < mem["argument"] < 1.3 * expected


@pytest.mark.parametrize("name,mesh_shape,live", [(*m, live) for m, live in zip(MESHES, (True, False))])
def test_full_size_dpo_step_splits_parameters(name, mesh_shape, live):
    """Tülu 3's DPO steps as configured (8B: live reference; 70B: cached reference log-probs), 2,048 tokens
    per side: the reference parameters, when live, are sharded like the policy's (the same sharding tree,
    so the 70B case's tensor split covers them too)."""
    compiled, abstract, is_live, _ = compile_dpo(name, 1, mesh_shape)
    assert is_live == live
    mem = _memory(compiled)
    if mem is not None:
        expected = (3 + live) * 4 * _n_params(abstract.params) / 8  # params, mu, nu (+ live reference) / 8
        assert 0.9 * expected < mem["argument"] < 1.3 * expected


def _assert_fits(what: str, mem: dict[str, float] | None, seconds: float, state_bytes: float):
    if mem is None:
        pytest.skip("this backend reports no memory analysis")
    _report(what, mem, seconds)
    # Sanity of the figures themselves: the sharded state is an argument, and the step needs scratch space.
    assert mem["argument"] >= state_bytes
    assert mem["temp"] > 0
    assert mem["total"] < DEVICE_BYTES, f"{what} needs {mem['total'] / 1e9:.1f} GB per device"


def test_8b_sft_step_fits_80gb():
    """One 4,096-token sequence per device and micro-batch (the reference: 64 GPUs x 1 x accumulation 2),
    remat on as configs/sft/tulu3_8b.yaml sets, ZeRO-3-like mesh (fsdp over all 8 devices)."""
    compiled, abstract, _, seconds = compile_sft("8b", 1, None)
    _assert_fits("8B SFT step, 1 x 4096 tokens/device", _memory(compiled), seconds, 12 * _n_params(abstract.params) / 8)


def test_8b_dpo_step_fits_80gb():
    """One pair (2 x 2,048 tokens) per device and micro-batch, live reference, remat on (configs/dpo)."""
    compiled, abstract, live, seconds = compile_dpo("8b", 1, None)
    state = (12 + 4 * live) * _n_params(abstract.params) / 8
    _assert_fits("8B DPO step (live ref), 1 pair x 2 x 2048 tokens/device", _memory(compiled), seconds, state)


def test_8b_rm_step_fits_80gb():
    """The reward-model step of configs/rm/tulu3_8b.yaml: one pair (2 x 2,048 tokens) per device."""
    from tulu_jax.config import RMConfig
    from tulu_jax.models.reward import RewardModel
    from tulu_jax.train.batches import TOKEN_KEYS
    from tulu_jax.train.rm_step import jit_rm_step

    cfg, mesh = _load(RMConfig, "configs/rm/tulu3_8b.yaml")
    model = _model(cfg, module=RewardModel)
    tx, schedule = make_optimizer(cfg.optim, 1000)
    abstract, shardings = state_layout(model, tx, mesh)
    pairs = mesh.size * ACCUM
    rows = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((pairs, 2, cfg.data.max_seq_len), np.int32, sharding=rows) for k in TOKEN_KEYS}
    step = jit_rm_step(model, tx, schedule, mesh, shardings, accum_steps=ACCUM, pad_token_id=0)  # any id
    compiled, seconds = _compile(step, _shaped(abstract, shardings), batch)
    state = 12 * _n_params(abstract.params) / 8
    _assert_fits("8B RM step, 1 pair x 2 x 2048 tokens/device", _memory(compiled), seconds, state)


def test_8b_local_sampler_fits_80gb():
    """The local sampler's prefill and decode for Llama-3.1-8B (the sampler's own bfloat16 copy of the
    weights, bfloat16 KV cache), 8 rows per device, 2,048-token prompts and 2,048 new tokens (Tülu 3's
    RLVR lengths, Table 16 of the paper). The jitted functions are the sampler's own (`_compiled`)."""
    from tulu_jax.models.decoder import KVCache
    from tulu_jax.models.loading import param_layout
    from tulu_jax.sampling.sampler import LocalSampler
    from tulu_jax.sharding import logical_sharding

    mesh = make_mesh(1, 8, 1)
    model = build_model(preset("llama3.1-8b"), dtype="bfloat16", param_dtype="float32")
    abstract, param_shardings = param_layout(model, mesh)
    # The sampler without weights: only what `_compiled` reads is set, so its jit wrappers are the real ones.
    sampler = LocalSampler.__new__(LocalSampler)
    sampler.model, sampler.mesh, sampler.pad_token_id = model, mesh, 0
    sampler._param_shardings, sampler._jitted = param_shardings, {}
    sampler._cache_shardings = logical_sharding(KVCache.logical_axes(), mesh)
    rows, prompt, new = 8 * mesh.size, 2048, 2048
    prefill, decode = sampler._compiled(new)
    params = _shaped(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, model.dtype), abstract), param_shardings)
    ids = jax.ShapeDtypeStruct((rows, prompt), np.int32, sharding=batch_sharding(mesh))
    compiled, seconds = _compile(prefill, params, ids, ids)
    param_bytes = 2 * _n_params(abstract) / 8
    _assert_fits("8B sampler prefill, 8 x 2048 tokens/device", _memory(compiled), seconds, param_bytes)

    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    logits = jax.ShapeDtypeStruct((rows, model.cfg.vocab_size), np.float32, sharding=batch_sharding(mesh))
    cache = _shaped(jax.eval_shape(lambda: KVCache.empty(model.cfg, rows, prompt + new, model.dtype)),
                    sampler._cache_shardings)  # fmt: skip
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        params,
        logits,
        cache,
        jax.ShapeDtypeStruct((rows,), np.int32, sharding=batch_sharding(mesh)),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
        scalar(np.float32),
        scalar(np.int32),
        scalar(np.float32),
        jax.ShapeDtypeStruct((2,), np.int32, sharding=rep),
    )
    compiled, seconds = _compile(decode, *args)
    _assert_fits(f"8B sampler decode, 8 rows x {prompt + new} slots/device", _memory(compiled), seconds, param_bytes)


def test_8b_ppo_update_fits_80gb():
    """Tülu 3 8B PPO (configs/rlvr/tulu3_8b.yaml): the policy update, the value-model update and the frozen
    bf16 reference's forward pass, compiled from shapes on the configured mesh at the reference's per-device
    micro-batch (2 episodes of 2,048 prompt + 2,048 response tokens). Each fits 80 GB on its own, and so do
    the three resident models plus the largest step's scratch space."""
    from tulu_jax.config import RLVRConfig
    from tulu_jax.models.reward import RewardModel
    from tulu_jax.train.episodes import SEQUENCE_KEYS
    from tulu_jax.train.rlvr import POLICY_KEYS, VALUE_KEYS
    from tulu_jax.train.rlvr_step import Shapes, jit_forward, jit_update, policy_update, response_logps, value_update

    overrides = ["model.preset=llama3.1-8b", "rollout.servers=[http://localhost:1]"]
    cfg = configlib.load_config(RLVRConfig, str(REPO / "configs/rlvr/tulu3_8b.yaml"), overrides)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    width, t = cfg.data.max_seq_len, cfg.rollout.max_tokens
    shapes = Shapes(width=width, temperature=cfg.rollout.temperature, logits_chunk=cfg.model.logits_chunk)
    rows, sh = 2 * mesh.size * ACCUM, batch_sharding(mesh)
    seq = {k: jax.ShapeDtypeStruct((rows, width + t), np.int32, sharding=sh) for k in SEQUENCE_KEYS}
    per_token = {k: jax.ShapeDtypeStruct((rows, t), np.float32, sharding=sh) for k in (*POLICY_KEYS, *VALUE_KEYS)}
    batch = {**per_token, **seq}

    policy = _model(cfg)
    tx, schedule = make_optimizer(cfg.optim, 1000)
    p_abstract, p_shardings = state_layout(policy, tx, mesh)
    step = jit_update(
        policy_update,
        mesh,
        p_shardings,
        POLICY_KEYS,
        model=policy,
        tx=tx,
        schedule=schedule,
        shapes=shapes,
        cfg=cfg.ppo,
        kl_in_loss=False,
        accum=ACCUM,
    )
    p_compiled, p_seconds = _compile(step, _shaped(p_abstract, p_shardings), {k: batch[k] for k in POLICY_KEYS})
    n = _n_params(p_abstract.params)
    _assert_fits("8B PPO policy update, 2 x 4096 tokens/device", _memory(p_compiled), p_seconds, 12 * n / 8)

    value = _model(cfg, module=RewardModel)
    v_abstract, v_shardings = state_layout(value, tx, mesh)
    vstep = jit_update(
        value_update, mesh, v_shardings, VALUE_KEYS, value_model=value, tx=tx, shapes=shapes, cfg=cfg.ppo, accum=ACCUM
    )
    v_compiled, v_seconds = _compile(vstep, _shaped(v_abstract, v_shardings), {k: batch[k] for k in VALUE_KEYS})
    nv = _n_params(v_abstract.params)  # the decoder and a score head: no LM head
    _assert_fits("8B PPO value update, 2 x 4096 tokens/device", _memory(v_compiled), v_seconds, 12 * nv / 8)

    ref_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jax.numpy.bfloat16), p_abstract.params)
    forward = jit_forward(response_logps, policy, mesh, p_shardings.params, shapes)
    ref_rows = {k: jax.ShapeDtypeStruct((rows // ACCUM, width + t), np.int32, sharding=sh) for k in SEQUENCE_KEYS}
    r_compiled, r_seconds = _compile(forward, _shaped(ref_params, p_shardings.params), ref_rows)
    r_mem = _memory(r_compiled)
    _assert_fits("8B reference log-probs (bf16), 2 x 4096 tokens/device", r_mem, r_seconds, 2 * n / 8)

    # Resident together: policy and value states (float32 masters + AdamW: 12 bytes/param), the bf16
    # reference (2 bytes/param), all split over the 8 devices, plus the largest step's scratch space.
    temps = [m["temp"] for m in (_memory(p_compiled), _memory(v_compiled), r_mem)]
    resident = (12 * n + 12 * nv + 2 * n) / 8 + max(temps)
    print(f"\n[memory] 8B PPO resident: {resident / 1e9:.2f} GB per device")
    assert resident < DEVICE_BYTES
