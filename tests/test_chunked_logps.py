"""`chunked_token_logps` (tulu_jax/losses/logps.py) and `next_token_logps` (tulu_jax/train/forward.py) against
a float64 NumPy reference and against the plain path (full logits -> `token_logps`), values and gradients.

Tolerances are float32 rounding bounds of the computation: a length-n dot product is off by at most
n·ε·Σ|a_i b_i| (ε = 2^-24 per rounding, written with float32's machine epsilon 2^-23 for margin), a
log-softmax adds a few ε times log V on top of its logits' error δ, and the softmax gradient (onehot - p)
moves by at most 2δ per unit of cotangent.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.losses.logps import chunked_token_logps, head_logits
from tulu_jax.losses.sft import shift_for_next_token, token_logps

EPS = float(np.finfo(np.float32).eps)


def np_logps_and_grads(h, w, y, g):
    """float64 logps [B, T] and the gradients of Σ g·logps with respect to h [B, T, D] and w [D, V]."""
    h, w, g = (np.asarray(a, np.float64) for a in (h, w, g))
    logits = h @ w
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    logps = np.take_along_axis(logits, y[..., None], -1)[..., 0] - lse
    p = np.exp(logits - lse[..., None])
    onehot = np.eye(w.shape[1])[y]
    dlogits = g[..., None] * (onehot - p)
    return logps, dlogits @ w.T, np.einsum("btd,btv->dv", h, dlogits)


def bounds(h, w, g):
    """Float32 error bounds (logps, dh, dw) for the shapes and magnitudes of these inputs."""
    b, t, d = h.shape
    v = w.shape[1]
    dot_abs = np.abs(h.astype(np.float64)) @ np.abs(w.astype(np.float64))  # Σ_d |h_d w_dv| per logit
    delta = (d + 2) * EPS * dot_abs.max()  # the logits' error
    logps_tol = delta * 2 + 8 * EPS * (np.log(v) + np.abs(dot_abs).max())
    gmax, wmax, hmax = np.abs(g).max(), np.abs(w).max(), np.abs(h).max()
    # dh_d = Σ_v dlogits_v w_dv with Σ_v |dlogits_v| <= 2|g|: error from δ in p, plus V roundings.
    dh_tol = gmax * wmax * (4 * delta + 2 * (v + 2) * EPS)
    # dw_dv = Σ_{b,t} h_d dlogits_v: up to B·T terms, each of size <= |h||g|(p + onehot).
    dw_tol = b * t * hmax * gmax * (4 * delta + 2 * (b * t + 2) * EPS)
    return logps_tol, dh_tol, dw_tol


def make_inputs(b, t, d, v, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    h = (scale * rng.standard_normal((b, t, d))).astype(np.float32)
    w = rng.standard_normal((d, v)).astype(np.float32) / np.sqrt(d)
    y = rng.integers(0, v, (b, t)).astype(np.int32)
    g = rng.standard_normal((b, t)).astype(np.float32)
    return h, w, y, g


def chunked_value_and_grads(h, w, y, g, chunk_size):
    def f(h, w):
        logps = chunked_token_logps(h, w, jnp.asarray(y), chunk_size=chunk_size)
        return jnp.sum(jnp.asarray(g) * logps), logps

    (_, logps), (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(jnp.asarray(h), jnp.asarray(w))
    return np.asarray(logps), np.asarray(dh), np.asarray(dw)


def plain_value_and_grads(h, w, y, g):
    def f(h, w):
        logps = token_logps(head_logits(h, w), jnp.asarray(y))
        return jnp.sum(jnp.asarray(g) * logps), logps

    (_, logps), (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(jnp.asarray(h), jnp.asarray(w))
    return np.asarray(logps), np.asarray(dh), np.asarray(dw)


# T = 37 is a prime: chunk 8 leaves a tail of 5, chunk 37 and 64 are >= T (one chunk), 0 is unchunked.
@pytest.mark.parametrize("chunk_size", [1, 8, 16, 37, 64, 0])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_chunked_matches_float64_reference(chunk_size, scale):
    h, w, y, g = make_inputs(3, 37, 24, 101, seed=chunk_size, scale=scale)
    logps, dh, dw = chunked_value_and_grads(h, w, y, g, chunk_size)
    want_logps, want_dh, want_dw = np_logps_and_grads(h, w, y, g)
    logps_tol, dh_tol, dw_tol = bounds(h, w, g)
    assert logps.dtype == np.float32 and logps.shape == (3, 37)
    np.testing.assert_allclose(logps, want_logps, rtol=0, atol=logps_tol)
    np.testing.assert_allclose(dh, want_dh, rtol=0, atol=dh_tol)
    np.testing.assert_allclose(dw, want_dw, rtol=0, atol=dw_tol)


@pytest.mark.parametrize("chunk_size", [5, 16, 40])
def test_chunked_matches_plain_path(chunk_size):
    """Against today's path (full float32 logits, `token_logps`), each compared with the same bound."""
    h, w, y, g = make_inputs(2, 40, 32, 64, seed=7)
    got = chunked_value_and_grads(h, w, y, g, chunk_size)
    want = plain_value_and_grads(h, w, y, g)
    for a, b, tol in zip(got, want, bounds(h, w, g)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * tol)


def test_hand_case_uniform_logits():
    """Zero hidden states give uniform logits: every log-prob is -log V, whatever the chunking."""
    h = jnp.zeros((2, 7, 4))
    w = jnp.ones((4, 10))
    y = jnp.arange(14).reshape(2, 7) % 10
    for c in (0, 3, 7):
        np.testing.assert_allclose(chunked_token_logps(h, w, y, chunk_size=c), np.full((2, 7), -np.log(10)), 1e-6)


def test_large_logits_stay_exact():
    """Logits ~1e4 (the max-shift of `token_logps` applies per chunk): target at the max -> log-prob 0."""
    h = jnp.full((1, 4, 1), 1e4)
    w = jnp.array([[1.0, 0.0, -1.0]])
    got = chunked_token_logps(h, w, jnp.zeros((1, 4), jnp.int32), chunk_size=3)
    np.testing.assert_array_equal(np.asarray(got), np.zeros((1, 4), np.float32))


def test_bfloat16_compute_matches_unchunked():
    """bf16 operands, float32 accumulation: chunking changes no operand, so the values equal the plain
    path's up to the float32 rounding of accumulating |logits| ~ sqrt(D) over D bf16 products."""
    h, w, y, _ = make_inputs(2, 33, 32, 50, seed=3)
    hb = jnp.asarray(h, jnp.bfloat16)
    got = chunked_token_logps(hb, jnp.asarray(w), jnp.asarray(y), chunk_size=8, dtype=jnp.bfloat16)
    want = token_logps(head_logits(hb, jnp.asarray(w), jnp.bfloat16), jnp.asarray(y))
    assert got.dtype == jnp.float32
    dot_abs = np.abs(np.asarray(hb, np.float64)) @ np.abs(np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64))
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * (32 + 2) * EPS * dot_abs.max())


def test_bad_arguments_raise():
    h, w, y = jnp.zeros((1, 4, 3)), jnp.zeros((3, 5)), jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="chunk_size must be >= 0"):
        chunked_token_logps(h, w, y, chunk_size=-1)
    with pytest.raises(ValueError, match="head shape"):
        chunked_token_logps(h, w.T, y, chunk_size=2)
    with pytest.raises(ValueError, match="targets shape"):
        chunked_token_logps(h, w, y[:, :3], chunk_size=2)


def _temp_bytes(fn, *args) -> int | None:
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    return None if mem is None else mem.temp_size_in_bytes


def test_gradient_never_holds_full_logits():
    """The compiled gradient of the chunked path needs less scratch than one float32 [B, T, V] buffer, which
    the plain path must hold (its temp is at least that): a chunk is T/16 of it, so even several
    chunk-sized buffers at once stay below half of it."""
    b, t, d, v = 2, 512, 16, 2048
    h, w, y, _ = make_inputs(b, t, d, v, seed=0)
    full_logits = b * t * v * 4

    def loss(chunk):
        return jax.grad(lambda h, w: jnp.sum(chunked_token_logps(h, w, jnp.asarray(y), chunk_size=chunk)), (0, 1))

    plain = _temp_bytes(loss(0), h, w)
    chunked = _temp_bytes(loss(t // 16), h, w)
    if plain is None:
        pytest.skip("this backend reports no memory analysis")
    assert plain >= full_logits
    assert chunked < full_logits / 2


# --- next_token_logps on the Decoder ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_decoder(request):
    from tulu_jax.models.config import preset
    from tulu_jax.models.loading import build_model

    cfg = preset("tiny", tie_embeddings=request.param, num_layers=1)
    model = build_model(cfg, dtype="float32")
    ids = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(request.param), ids)["params"])
    assert ("lm_head" in params) != request.param
    return model, params


def _batch(vocab, b=2, t=37, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, 20:] = 2  # two packed documents in row 0
    seg[1, 30:] = 0  # padding at the end of row 1
    pos = np.concatenate([np.arange(20), np.arange(t - 20)])[None].repeat(b, 0).astype(np.int32)
    pos[1] = np.arange(t)
    mask = (rng.random((b, t)) < 0.7).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in dict(input_ids=ids, positions=pos, segment_ids=seg, loss_mask=mask).items()}


def _weighted_sum(logps_fn, model, batch):
    _, weights = shift_for_next_token(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])

    def f(params):
        logps = logps_fn(params)
        return jnp.sum(weights * logps), logps

    return f


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_next_token_logps_matches_model_logits(tiny_decoder, chunk_size):
    """Against `token_logps(model.apply(...), shift_for_next_token targets)`, gradients with respect to
    every parameter included, for tied and untied heads. Both run the same layers; they differ only in how
    the LM head's matmul (D = 256 products) and the head gradient's sum over B·T positions are blocked, so
    each leaf agrees to (D + B·T)·ε of its largest entry."""
    from tulu_jax.train.forward import next_token_logps

    model, params = tiny_decoder
    batch = _batch(model.cfg.vocab_size)
    ids, pos, seg = batch["input_ids"], batch["positions"], batch["segment_ids"]
    targets, _ = shift_for_next_token(ids, batch["loss_mask"], seg)

    plain = _weighted_sum(lambda p: token_logps(model.apply({"params": p}, ids, pos, seg), targets), model, batch)
    chunked = _weighted_sum(lambda p: next_token_logps(model, p, ids, pos, seg, chunk_size=chunk_size), model, batch)
    (want_sum, want), want_g = jax.jit(jax.value_and_grad(plain, has_aux=True))(params)
    (got_sum, got), got_g = jax.jit(jax.value_and_grad(chunked, has_aux=True))(params)
    b, t = ids.shape
    k = (model.cfg.hidden_size + b * t) * EPS
    np.testing.assert_allclose(got, want, rtol=0, atol=k * np.abs(np.asarray(want)).max())
    np.testing.assert_allclose(got_sum, want_sum, rtol=k)
    for path, g_want in jax.tree_util.tree_flatten_with_path(want_g)[0]:
        g_got = got_g
        for p in path:
            g_got = g_got[p.key]
        scale = np.abs(np.asarray(g_want)).max()
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g_got, g_want, rtol=0, atol=k * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("chunk_size,temperature", [(0, 1.0), (4, 1.0), (5, 0.7), (64, 1.3)])
def test_logps_and_entropy_match_float64(chunk_size, temperature):
    """`chunked_logps_and_entropy` (the RL rollout pass): log-probs equal `chunked_token_logps`'s, and the
    entropy -Σ p log p of softmax(h @ w / temperature) equals a float64 NumPy computation, for whole, even
    and uneven chunks (T = 11)."""
    from tulu_jax.losses.logps import chunked_logps_and_entropy

    h, w, y, _ = make_inputs(2, 11, 16, 37, seed=7, scale=2.0)
    logps, entropy = chunked_logps_and_entropy(
        jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), chunk_size=chunk_size, temperature=temperature
    )
    logits = (h.astype(np.float64) @ w.astype(np.float64)) / temperature
    z = logits - logits.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np_entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    np_logps = np.take_along_axis(logp_all, y[..., None], -1)[..., 0]
    tol, _, _ = bounds(h, w / temperature, np.ones((2, 11), np.float32))
    np.testing.assert_allclose(np.asarray(logps), np_logps, rtol=0, atol=tol)
    # Entropy = Σ p·(-log p): the same per-logit error, weighted by probabilities that sum to 1, plus V roundings.
    np.testing.assert_allclose(np.asarray(entropy), np_entropy, rtol=0, atol=2 * tol + 37 * EPS * np.log(37))
    same = chunked_token_logps(
        jnp.asarray(h), jnp.asarray(w), jnp.asarray(y), chunk_size=chunk_size, temperature=temperature
    )
    np.testing.assert_allclose(np.asarray(logps), np.asarray(same), rtol=0, atol=tol)
