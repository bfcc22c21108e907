"""Our decoder against Hugging Face transformers (PyTorch, CPU, float32) on the same weights, and the
model's own invariants (packing, causality, remat, jit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import FAMILIES, make_hf_model

from tulu_jax.models import hf
from tulu_jax.models.loading import build_model, load_params
from tulu_jax.score import score_text
from tulu_jax.sharding import make_mesh

TEXT = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42, and the answer is forty-two!"


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_model(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(request.param))
    return request.param, out, make_hf_model(request.param, out)


def _hf_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    logp = torch.log_softmax(logits, -1)[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp.numpy()


def test_score_matches_transformers(hf_model):
    family, path, model = hf_model
    out = score_text(path, TEXT)
    ref = _hf_logprobs(model, out["token_ids"])
    assert out["logprobs"][0] is None and len(out["logprobs"]) == len(out["token_ids"]) > 20
    err = np.abs(np.asarray(out["logprobs"][1:]) - ref).max()
    assert err < 1e-4, f"{family}: max |Δ logprob| = {err}"


def test_full_logits_match_transformers(hf_model):
    family, path, model = hf_model
    ids = np.random.default_rng(1).integers(0, 1024, (3, 48))
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids)).logits, -1).numpy()
    cfg = hf.load_hf_config(path)
    ours_model = build_model(cfg)
    params = load_params(path, ours_model, make_mesh(devices=jax.devices()[:1]))
    ours = jax.nn.log_softmax(ours_model.apply({"params": params}, jnp.asarray(ids)), -1)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def _tiny(path):
    cfg = hf.load_hf_config(path)
    model = build_model(cfg)
    return model, load_params(path, model, make_mesh(devices=jax.devices()[:1]))


def test_packed_equals_separate(hf_model):
    _, path, _ = hf_model
    model, params = _tiny(path)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 1024, 20), rng.integers(0, 1024, 12)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 20 + [2] * 12 + [0, 0]])
    pos = np.concatenate([np.arange(20), np.arange(12), [0, 0]])[None]
    out = model.apply({"params": params}, jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg))
    out_a = model.apply({"params": params}, jnp.asarray(a[None]))
    out_b = model.apply({"params": params}, jnp.asarray(b[None]))
    np.testing.assert_allclose(out[0, :20], out_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 20:32], out_b[0], atol=1e-5)


def test_causal(hf_model):
    _, path, _ = hf_model
    model, params = _tiny(path)
    ids = np.random.default_rng(3).integers(0, 1024, (1, 16))
    changed = ids.copy()
    changed[0, 10:] = (changed[0, 10:] + 1) % 1024
    x = model.apply({"params": params}, jnp.asarray(ids))
    y = model.apply({"params": params}, jnp.asarray(changed))
    np.testing.assert_allclose(x[0, :10], y[0, :10], atol=1e-6)
    assert np.abs(np.asarray(x[0, 10:] - y[0, 10:])).max() > 1e-3


def test_remat_and_jit_give_same_grads(hf_model):
    _, path, _ = hf_model
    model, params = _tiny(path)
    remat_model = build_model(model.cfg, remat=True)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 1024, (2, 16)))

    def loss(m):
        return lambda p: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, ids))[..., 0])

    g1 = jax.grad(loss(model))(params)
    g2 = jax.jit(jax.grad(loss(remat_model)))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_close_to_float32(hf_model):
    _, path, _ = hf_model
    model, params = _tiny(path)
    bf16 = build_model(model.cfg, dtype="bfloat16")
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 1024, (1, 32)))
    a = jax.nn.log_softmax(model.apply({"params": params}, ids))
    b = jax.nn.log_softmax(bf16.apply({"params": params}, ids))
    assert b.dtype == jnp.float32  # logits come back in float32 whatever the compute dtype
    assert 0 < float(jnp.abs(a - b).max()) < 0.1


@pytest.mark.parametrize("block", [8, 16])
def test_blocked_causal_attention_equals_full(hf_model, block):
    _, path, _ = hf_model
    model, params = _tiny(path)
    blocked = build_model(model.cfg, attention_block=block, scan_unroll=2)
    rng = np.random.default_rng(6)
    ids = jnp.asarray(rng.integers(0, 1024, (2, 48)))
    seg = jnp.asarray(np.repeat([[1] * 13 + [2] * 30 + [0] * 5], 2, 0))  # packed, with padding
    pos = jnp.asarray(np.repeat([list(range(13)) + list(range(30)) + [0] * 5], 2, 0))
    full = model.apply({"params": params}, ids, pos, seg)
    out = blocked.apply({"params": params}, ids, pos, seg)
    np.testing.assert_allclose(out, full, atol=1e-5)
    g_full = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, ids, pos, seg)[..., :3]))(params)
    g_blk = jax.grad(lambda p: jnp.sum(blocked.apply({"params": p}, ids, pos, seg)[..., :3]))(params)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_blk)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
