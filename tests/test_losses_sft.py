"""SFT losses vs. an independent float64 NumPy reference, hand-computed cases, gradients and accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.losses import cross_entropy_sums, reduce_sft, sft_loss, shift_for_next_token, token_logps

# --- float64 NumPy reference (written with loops / explicit formulas, not sharing code with the library) ---


def ref_log_softmax(logits):
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_shift(input_ids, loss_mask, segment_ids):
    B, T = input_ids.shape
    targets, weights = np.zeros((B, T), np.int64), np.zeros((B, T), np.float64)
    for b in range(B):
        for t in range(T - 1):
            targets[b, t] = input_ids[b, t + 1]
            seg, nxt = segment_ids[b, t], segment_ids[b, t + 1]
            weights[b, t] = float(bool(loss_mask[b, t + 1]) and seg != 0 and nxt == seg)
    return targets, weights


def ref_nll(logits, targets):
    logp = ref_log_softmax(logits)
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0]


def ref_loss_and_grad(logits, targets, weights, reduction, num_sequences):
    nll = ref_nll(logits, targets)
    total, count = (weights * nll).sum(), weights.sum()
    denom = num_sequences if reduction == "sum" else (count if count > 0 else np.inf)
    probs = np.exp(ref_log_softmax(logits))
    onehot = np.eye(logits.shape[-1])[targets]
    grad = weights[..., None] * (probs - onehot) / denom  # d(Σ w·NLL)/d logits = w·(softmax − onehot)
    return total / denom if np.isfinite(denom) else 0.0, grad


def random_batch(rng, B, T, V, scale=3.0):
    logits = rng.normal(size=(B, T, V)) * scale
    input_ids = rng.integers(0, V, size=(B, T))
    loss_mask = rng.random((B, T)) < 0.6
    # Packed rows: documents 1, 2, ... of random lengths, then padding (segment 0) at the end.
    segment_ids = np.zeros((B, T), np.int32)
    for b in range(B):
        t, seg = 0, 1
        end = rng.integers(T // 2, T + 1)
        while t < end:
            n = rng.integers(1, max(2, T // 3))
            segment_ids[b, t : min(t + n, end)] = seg
            t, seg = t + n, seg + 1
    return logits.astype(np.float32), input_ids, loss_mask, segment_ids


SHAPES = [(1, 5, 2), (2, 7, 3), (3, 16, 11), (4, 33, 64)]


# --- token_logps and shift ---------------------------------------------------------------------------


@pytest.mark.parametrize("B,T,V", SHAPES)
def test_token_logps_matches_reference(B, T, V):
    rng = np.random.default_rng(B * 100 + T)
    logits, ids, _, _ = random_batch(rng, B, T, V)
    got = token_logps(jnp.asarray(logits), jnp.asarray(ids))
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    np.testing.assert_allclose(got, -ref_nll(logits, ids), rtol=1e-5, atol=1e-5)


def test_token_logps_upcasts_bf16():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 4, 50)) * 5, jnp.bfloat16)
    ids = rng.integers(0, 50, size=(2, 4))
    got = token_logps(logits, jnp.asarray(ids))
    assert got.dtype == jnp.float32
    exact = -ref_nll(np.asarray(logits.astype(jnp.float32)), ids)  # reference on the same bf16 values
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,T,V", SHAPES)
def test_shift_matches_reference(B, T, V):
    rng = np.random.default_rng(T)
    _, ids, mask, seg = random_batch(rng, B, T, V)
    targets, weights = shift_for_next_token(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg))
    ref_t, ref_w = ref_shift(ids, mask, seg)
    assert weights.dtype == jnp.float32
    np.testing.assert_array_equal(targets, ref_t)
    np.testing.assert_array_equal(weights, ref_w)


def test_shift_hand_case_packed():
    # Two documents [10 11 12] [20 21] then one pad. Loss mask on 11, 12, 20, 21 and the pad.
    ids = jnp.array([[10, 11, 12, 20, 21, 0]])
    mask = jnp.array([[0, 1, 1, 1, 1, 1]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    targets, weights = shift_for_next_token(ids, mask, seg)
    np.testing.assert_array_equal(targets, [[11, 12, 20, 21, 0, 0]])
    # t=2 would predict 20 from document 1: cut. t=4 would predict the pad: cut. Last position: 0.
    np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0, 0]])


# --- hand-computed losses -------------------------------------------------------------------------------


def test_hand_computed_v3():
    # ids [0, 2, 1], mask on positions 1 and 2, one document -> targets [2, 1, 0], weights [1, 1, 0].
    logits = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -5.0, 0.0]]])
    targets, weights = shift_for_next_token(jnp.array([[0, 2, 1]]), jnp.array([[0, 1, 1]]), jnp.array([[1, 1, 1]]))
    nll0 = math.log(math.e + math.e**2 + math.e**3) - 3.0  # -log softmax([1,2,3])[2]
    nll1 = math.log(3.0)  # uniform over 3
    total, count = cross_entropy_sums(logits, targets, weights)
    assert float(total) == pytest.approx(nll0 + nll1, rel=1e-6) and float(count) == 2.0
    assert float(sft_loss(logits, targets, weights, reduction="sum", num_sequences=1)) == pytest.approx(
        nll0 + nll1, rel=1e-6
    )
    assert float(sft_loss(logits, targets, weights, reduction="sum", num_sequences=4)) == pytest.approx(
        (nll0 + nll1) / 4, rel=1e-6
    )
    assert float(sft_loss(logits, targets, weights, reduction="mean")) == pytest.approx((nll0 + nll1) / 2, rel=1e-6)


def test_hand_computed_v2_two_sequences():
    # Row 0: logits (0, log 3) -> p(1) = 3/4. Row 1: logits (2, 0) -> p(1) = 1/(1+e^2); weights pick 2 + 1 tokens.
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]], [[2.0, 0.0], [2.0, 0.0]]])
    targets = jnp.array([[1, 1], [1, 0]])
    weights = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    expected = 2 * -math.log(0.75) + math.log(1 + math.e**2)
    assert float(sft_loss(logits, targets, weights, reduction="sum", num_sequences=2)) == pytest.approx(
        expected / 2, rel=1e-6
    )
    assert float(sft_loss(logits, targets, weights, reduction="mean")) == pytest.approx(expected / 3, rel=1e-6)


# --- random inputs vs. reference: value and gradient ----------------------------------------------------


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("B,T,V", SHAPES)
def test_loss_and_grad_match_reference(B, T, V, reduction):
    rng = np.random.default_rng(B + T + V)
    logits, ids, mask, seg = random_batch(rng, B, T, V)
    targets, weights = ref_shift(ids, mask, seg)
    num_sequences = 2 * B  # e.g. this is half of the global batch
    loss_fn = jax.jit(sft_loss, static_argnames="reduction")
    grad_fn = jax.jit(jax.grad(sft_loss), static_argnames="reduction")
    args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    loss = loss_fn(*args, reduction=reduction, num_sequences=num_sequences)
    grad = grad_fn(*args, reduction=reduction, num_sequences=num_sequences)
    ref_loss, ref_grad = ref_loss_and_grad(logits, targets, weights, reduction, num_sequences)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_zero_token_mask_gives_zero_loss_and_grad(reduction):
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 7)), jnp.float32)
    targets, weights = jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5))
    loss = sft_loss(logits, targets, weights, reduction=reduction, num_sequences=2)
    grad = jax.grad(sft_loss)(logits, targets, weights, reduction=reduction, num_sequences=2)
    assert float(loss) == 0.0
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) == 0.0
    assert float(cross_entropy_sums(logits, targets, weights)[1]) == 0.0


def test_large_logits_are_stable():
    rng = np.random.default_rng(2)
    logits, ids, mask, seg = random_batch(rng, 3, 9, 17, scale=1e4)
    targets, weights = ref_shift(ids, mask, seg)
    args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    for reduction in ("sum", "mean"):
        loss = sft_loss(*args, reduction=reduction, num_sequences=3)
        grad = jax.grad(sft_loss)(*args, reduction=reduction, num_sequences=3)
        assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(grad)))
        ref_loss, ref_grad = ref_loss_and_grad(logits, targets, weights, reduction, 3)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(grad, ref_grad, atol=1e-5)
    logp = token_logps(jnp.full((1, 1, 4), 1e4), jnp.array([[0]]))
    assert float(logp[0, 0]) == pytest.approx(-math.log(4.0), rel=1e-6)


# --- micro-batch accumulation ---------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [[1, 1, 1, 1, 1, 1], [2, 4], [3, 3], [1, 5]])
def test_micro_batch_sums_equal_full_batch(splits):
    rng = np.random.default_rng(len(splits))
    logits, ids, mask, seg = random_batch(rng, 6, 12, 9)
    targets, weights = shift_for_next_token(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg))
    logits = jnp.asarray(logits)
    full_sum, full_count = cross_entropy_sums(logits, targets, weights)
    bounds = np.cumsum([0, *splits])
    parts = [cross_entropy_sums(logits[a:b], targets[a:b], weights[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_allclose(sum(p[0] for p in parts), full_sum, rtol=1e-5)
    assert float(sum(p[1] for p in parts)) == float(full_count)

    # Accumulated gradients equal the full-batch gradient, for the sum loss (global #sequences) and for the
    # token mean when each micro-batch divides by the global token count.
    def micro_loss(lg, t, w, reduction):
        nll_sum, _ = cross_entropy_sums(lg, t, w)
        return reduce_sft(nll_sum, full_count, reduction=reduction, num_sequences=6)

    for reduction in ("sum", "mean"):
        full_grad = jax.grad(sft_loss)(logits, targets, weights, reduction=reduction, num_sequences=6)
        micro_grads = [
            jax.grad(micro_loss)(logits[a:b], targets[a:b], weights[a:b], reduction)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        np.testing.assert_allclose(jnp.concatenate(micro_grads), full_grad, rtol=1e-5, atol=1e-7)


# --- API errors ----------------------------------------------------------------------------------------


def test_unknown_reduction_names_valid_ones():
    logits, targets, weights = jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2))
    with pytest.raises(ValueError, match=r"'max'.*mean, sum"):
        sft_loss(logits, targets, weights, reduction="max", num_sequences=1)
    with pytest.raises(ValueError, match="num_sequences"):
        sft_loss(logits, targets, weights, reduction="sum")
