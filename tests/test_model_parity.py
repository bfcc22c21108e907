"""Our decoder against Hugging Face transformers (PyTorch, CPU, float32) on the same weights, and the
model's own invariants (packing, causality, remat, jit).

Tolerances: two float32 evaluations that differ only in summation order agree to `f32_atol(scale, n)`, eps
times the summed reduction lengths n times the magnitude of the compared values (tests/hf_models.py); a
mistake (a wrong weight, mask or position) shows at the scale of the values themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import COMMON, FAMILIES, U_BF16, f32_atol, make_hf_model, model_reductions

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
    """(log-probs of ids[1:], max |logit|) from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    logp = torch.log_softmax(logits, -1)[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return logp.numpy(), float(logits.abs().max())


def _logp_atol(logit_scale, seq_len):
    # log_softmax subtracts a logsumexp over V: its error adds a V-length reduction, and doubles the logits'.
    return 2 * f32_atol(logit_scale, model_reductions(seq_len) + COMMON["vocab_size"])


def test_score_matches_transformers(hf_model):
    family, path, model = hf_model
    out = score_text(path, TEXT)
    ref, scale = _hf_logprobs(model, out["token_ids"])
    assert out["logprobs"][0] is None and len(out["logprobs"]) == len(out["token_ids"]) > 20
    err = np.abs(np.asarray(out["logprobs"][1:]) - ref).max()
    tol = _logp_atol(scale, len(out["token_ids"]))
    assert err < tol, f"{family}: max |Δ logprob| = {err} > {tol}"


def test_full_logits_match_transformers(hf_model):
    family, path, model = hf_model
    ids = np.random.default_rng(1).integers(0, 1024, (3, 48))
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits
    ref = torch.log_softmax(logits, -1).numpy()
    cfg = hf.load_hf_config(path)
    ours_model = build_model(cfg)
    params = load_params(path, ours_model, make_mesh(devices=jax.devices()[:1]))
    ours = jax.nn.log_softmax(ours_model.apply({"params": params}, jnp.asarray(ids)), -1)
    tol = _logp_atol(float(logits.abs().max()), ids.shape[1])
    np.testing.assert_allclose(np.asarray(ours), ref, atol=tol, rtol=0)


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
    tol = f32_atol(float(np.abs(out_a).max()), model_reductions(packed.shape[1]))
    np.testing.assert_allclose(out[0, :20], out_a[0], atol=tol)
    np.testing.assert_allclose(out[0, 20:32], out_b[0], atol=tol)


def test_causal(hf_model):
    _, path, _ = hf_model
    model, params = _tiny(path)
    ids = np.random.default_rng(3).integers(0, 1024, (1, 16))
    changed = ids.copy()
    changed[0, 10:] = (changed[0, 10:] + 1) % 1024
    x = model.apply({"params": params}, jnp.asarray(ids))
    y = model.apply({"params": params}, jnp.asarray(changed))
    tol = f32_atol(float(np.abs(x).max()), model_reductions(ids.shape[1]))
    np.testing.assert_allclose(x[0, :10], y[0, :10], atol=tol)
    assert np.abs(np.asarray(x[0, 10:] - y[0, 10:])).max() > 100 * tol  # the changed tokens do change the rest


def test_remat_and_jit_give_same_grads(hf_model):
    _, path, _ = hf_model
    model, params = _tiny(path)
    remat_model = build_model(model.cfg, remat=True)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 1024, (2, 16)))

    def loss(m):
        return lambda p: jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, ids))[..., 0])

    g1 = jax.grad(loss(model))(params)
    g2 = jax.jit(jax.grad(loss(remat_model)))(params)
    _assert_grads_close(g1, g2, ids.size, ids.shape[1])


def _assert_grads_close(g1, g2, tokens, seq_len):
    """Each leaf within f32_atol of its own largest entry, over the forward reductions plus the backward's
    sum over the batch's `tokens` (a weight gradient adds one term per token)."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2)):
        a = np.asarray(a)
        tol = f32_atol(float(np.abs(a).max()), model_reductions(seq_len) + tokens)
        np.testing.assert_allclose(a, b, atol=tol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_bf16_compute_close_to_float32(hf_model):
    _, path, _ = hf_model
    model, params = _tiny(path)
    bf16 = build_model(model.cfg, dtype="bfloat16")
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 1024, (1, 32)))
    a = model.apply({"params": params}, ids)
    b = bf16.apply({"params": params}, ids)
    assert b.dtype == jnp.float32  # logits come back in float32 whatever the compute dtype
    # bfloat16 keeps 8 significant bits: each cast of an activation to bf16 moves it by up to U_BF16 relative.
    # A layer rounds about 13 times (residual, norm, q/k/v, RoPE, probs, attention, o, residual, norm, gate/up,
    # SwiGLU product, down, residual); add the embedding, final norm and head input. The errors are relative
    # to the activations, which the RMSNorms keep at the logits' scale.
    stages = 13 * COMMON["num_hidden_layers"] + 3
    scale = float(jnp.abs(a).max())
    diff = float(jnp.abs(a - b).max())
    assert diff < stages * U_BF16 * scale, (diff, stages * U_BF16 * scale)
    assert diff > 10 * f32_atol(scale, model_reductions(ids.shape[1]))  # bf16 was really used


@pytest.mark.parametrize("block", [8, 16])
def test_blocked_causal_attention_equals_full(hf_model, block):
    _, path, _ = hf_model
    model, params = _tiny(path)
    blocked = build_model(model.cfg, attention_block=block, scan_unroll=2)
    rng = np.random.default_rng(6)
    ids = jnp.asarray(rng.integers(0, 1024, (2, 48)))
    seg = jnp.asarray(np.repeat([[1] * 13 + [2] * 30 + [0] * 5], 2, 0))  # packed, with padding
    pos = jnp.asarray(np.repeat([list(range(13)) + list(range(30)) + [0] * 5], 2, 0))
    full, g_full = _logits_and_grads(model, params, ids, pos, seg)
    out, g_blk = _logits_and_grads(blocked, params, ids, pos, seg)
    tol = f32_atol(float(jnp.abs(full).max()), model_reductions(ids.shape[1]))
    np.testing.assert_allclose(out, full, atol=tol, rtol=0)
    _assert_grads_close(g_full, g_blk, ids.size, ids.shape[1])


def _logits_and_grads(model, params, ids, pos, seg):
    """(logits, gradient of the sum of the first 3 logits of every token) in one jitted forward and backward:
    one compile instead of op-by-op dispatch through the attention blocks."""

    def f(p):
        logits = model.apply({"params": p}, ids, pos, seg)
        return jnp.sum(logits[..., :3]), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return logits, grads
