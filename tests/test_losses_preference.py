"""Preference losses vs. an independent float64 NumPy reference, hand-computed pairs, gradients and stability."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.losses import (
    DEFAULT_BETA,
    PREFERENCE_LOSSES,
    bradley_terry,
    dpo,
    dpo_norm,
    ipo,
    preference_loss,
    sequence_logps,
    simpo,
    wpo,
)

NAMES = ["dpo", "dpo_norm", "simpo", "ipo", "wpo"]

# --- float64 NumPy reference, from the formulas of the DPO, SimPO, IPO and WPO papers and Tülu 3 §5 -------


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def reference(name, pc, pr, qc, qr, nc, nr, beta, eps, gbr):
    """Per-pair (losses, chosen rewards, rejected rewards, chosen logps, rejected logps) and the analytic
    derivatives dL/d(pc, pr, qc, qr). p = policy sums, q = reference sums, n = labelled-token counts."""
    pc, pr, qc, qr = (np.asarray(a, np.float64) for a in (pc, pr, qc, qr))
    nc, nr = np.maximum(np.asarray(nc, np.float64), 1), np.maximum(np.asarray(nr, np.float64), 1)
    avg_pc, avg_pr, avg_qc, avg_qr = pc / nc, pr / nr, qc / nc, qr / nr

    def smoothed(z):  # value and dL/dz of −(1−ε)·log σ(βz) − ε·log σ(−βz)
        value = -(1 - eps) * np_log_sigmoid(beta * z) - eps * np_log_sigmoid(-beta * z)
        return value, -(1 - eps) * beta * np_sigmoid(-beta * z) + eps * beta * np_sigmoid(beta * z)

    zero = np.zeros_like(pc)
    if name in ("dpo", "wpo"):
        loss, dz = smoothed((pc - pr) - (qc - qr))
        grads = [dz, -dz, -dz, dz]
        metrics = [beta * (pc - qc), beta * (pr - qr), pc, pr]
        if name == "wpo":  # the weight is a constant: it scales the loss and its gradient alike
            w = np.exp(avg_pc + avg_pr)
            loss, grads = w * loss, [w * g for g in grads]
    elif name == "dpo_norm":
        loss, dz = smoothed((avg_pc - avg_pr) - (avg_qc - avg_qr))
        grads = [dz / nc, -dz / nr, -dz / nc, dz / nr]
        metrics = [beta * (avg_pc - avg_qc), beta * (avg_pr - avg_qr), avg_pc, avg_pr]
    elif name == "simpo":
        loss, dz = smoothed(avg_pc - avg_pr - gbr)
        grads = [dz / nc, -dz / nr, zero, zero]
        metrics = [beta * avg_pc, beta * avg_pr, avg_pc, avg_pr]
    elif name == "ipo":
        gap = (avg_pc - avg_qc) - (avg_pr - avg_qr) - 1 / (2 * beta)
        loss, dz = gap**2, 2 * gap
        grads = [dz / nc, -dz / nr, -dz / nc, dz / nr]
        metrics = [beta * (avg_pc - avg_qc), beta * (avg_pr - avg_qr), avg_pc, avg_pr]
    return [loss, *metrics], grads


def random_pairs(seed, B=16):
    """float32 summed log-probs and int32 lengths 1..50; the reference stays close to the policy."""
    rng = np.random.default_rng(seed)
    nc, nr = rng.integers(1, 51, B), rng.integers(1, 51, B)
    pc, pr = -nc * rng.uniform(0.2, 2.5, B), -nr * rng.uniform(0.2, 2.5, B)
    qc, qr = pc + nc * rng.normal(0, 0.1, B), pr + nr * rng.normal(0, 0.1, B)
    logps = [a.astype(np.float32) for a in (pc, pr, qc, qr)]
    return (*logps, nc.astype(np.int32), nr.astype(np.int32))


def _summed_loss(name):
    return lambda *args, **kw: jnp.sum(PREFERENCE_LOSSES[name](*args, **kw).losses)


JIT_LOSS = {name: jax.jit(fn) for name, fn in PREFERENCE_LOSSES.items()}
JIT_GRAD = {name: jax.jit(jax.grad(_summed_loss(name), argnums=(0, 1, 2, 3))) for name in NAMES}


# --- random inputs vs. reference: values and gradients ------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name, seed, eps):
    args = random_pairs(seed)
    beta, gbr = DEFAULT_BETA[name], 0.3 if seed else 0.5
    out = JIT_LOSS[name](*map(jnp.asarray, args), beta=beta, label_smoothing=eps, gamma_beta_ratio=gbr)
    ref_eps = 0.0 if name == "ipo" else eps  # IPO ignores label smoothing
    expected, _ = reference(name, *args, beta, ref_eps, gbr)
    for got, want in zip(out, expected):
        assert got.dtype == jnp.float32 and got.shape == (16,)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_analytic(name, seed, eps):
    args = random_pairs(seed)
    beta = DEFAULT_BETA[name]
    grads = JIT_GRAD[name](*map(jnp.asarray, args), beta=beta, label_smoothing=eps)
    _, expected = reference(name, *args, beta, 0.0 if name == "ipo" else eps, 0.3)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max() + 1e-12)


@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "simpo", "ipo"])
def test_reference_gradients_match_finite_differences(name):
    # Checks the analytic derivatives that the test above trusts.
    args = [np.asarray(a, np.float64) for a in random_pairs(5)]
    _, analytic = reference(name, *args, DEFAULT_BETA[name], 0.1, 0.3)
    h = 1e-5
    for i in range(4):
        up, down = list(args), list(args)
        up[i], down[i] = args[i] + h, args[i] - h
        fd = (
            reference(name, *up, DEFAULT_BETA[name], 0.1, 0.3)[0][0]
            - reference(name, *down, DEFAULT_BETA[name], 0.1, 0.3)[0][0]
        ) / (2 * h)
        np.testing.assert_allclose(analytic[i], fd, rtol=1e-6, atol=1e-9)


def test_wpo_weight_carries_no_gradient():
    args = random_pairs(6)
    beta = DEFAULT_BETA["wpo"]
    g_pc, g_pr, g_qc, g_qr = JIT_GRAD["wpo"](*map(jnp.asarray, args), beta=beta)
    # Differentiating the weight too would add loss/len to the policy derivatives (d w / d pc = w / nc).
    (loss, *_), _ = reference("wpo", *args, beta, 0.0, 0.3)
    nc, nr = args[4].astype(np.float64), args[5].astype(np.float64)
    _, (d_pc, d_pr, d_qc, d_qr) = reference("wpo", *args, beta, 0.0, 0.3)
    np.testing.assert_allclose(g_pc, d_pc, rtol=1e-5)
    np.testing.assert_allclose(g_pr, d_pr, rtol=1e-5)
    assert not np.allclose(g_pc, d_pc + loss / nc, rtol=1e-3)
    assert not np.allclose(g_pr, d_pr + loss / nr, rtol=1e-3)
    # ...and the weighted gradient is exactly w times the dpo gradient.
    dpo_grads = JIT_GRAD["dpo"](*map(jnp.asarray, args), beta=beta)
    w = np.exp(args[0] / nc + args[1] / nr)
    for got, base in zip((g_pc, g_pr, g_qc, g_qr), dpo_grads):
        np.testing.assert_allclose(got, w * np.asarray(base), rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_metrics_carry_no_gradient(name):
    args = tuple(map(jnp.asarray, random_pairs(7, B=4)))
    for field in range(1, 5):

        def metric(*a, field=field):
            return jnp.sum(PREFERENCE_LOSSES[name](*a, beta=1.0)[field])

        grads = jax.grad(metric, argnums=(0, 1, 2, 3))(*args)
        assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


# --- one hand-computed pair -----------------------------------------------------------------------------

# Chosen token log-probs π = [−1, −2], ref = [−1.5, −2]; rejected π = [−2, −2, −2], ref = [−1.8, −2, −2].
HAND_PAIR = tuple(jnp.array([v]) for v in (-3.0, -6.0, -3.5, -5.8, 2, 3))


def test_hand_pair_dpo():
    out = dpo(*HAND_PAIR, beta=0.1)  # z = (−3 + 6) − (−3.5 + 5.8) = 0.7
    assert float(out.losses[0]) == pytest.approx(0.658760, abs=1e-6)
    assert float(out.chosen_rewards[0]) == pytest.approx(0.05, rel=1e-6)
    assert float(out.rejected_rewards[0]) == pytest.approx(-0.02, rel=1e-5)
    assert (float(out.chosen_logps[0]), float(out.rejected_logps[0])) == (-3.0, -6.0)


def test_hand_pair_dpo_norm():
    out = dpo_norm(*HAND_PAIR, beta=5.0)  # z = (−1.5 + 2) − (−1.75 + 1.933333) = 0.316667
    assert float(out.losses[0]) == pytest.approx(0.186720, abs=1e-6)
    assert float(out.chosen_rewards[0]) == pytest.approx(1.25, rel=1e-6)
    assert float(out.rejected_rewards[0]) == pytest.approx(-0.333333, rel=1e-5)
    assert float(out.chosen_logps[0]) == pytest.approx(-1.5) and float(out.rejected_logps[0]) == pytest.approx(-2.0)


def test_hand_pair_simpo():
    out = simpo(*HAND_PAIR, beta=2.0, gamma_beta_ratio=0.3)  # z = −1.5 + 2 − 0.3 = 0.2, L = log(1 + e^−0.4)
    assert float(out.losses[0]) == pytest.approx(0.513015, abs=1e-6)
    assert float(out.chosen_rewards[0]) == pytest.approx(-3.0) and float(out.rejected_rewards[0]) == pytest.approx(-4.0)


def test_hand_pair_wpo_paper():
    # Paper WPO: w = exp(ℓ̄π_c + ℓ̄π_r) = exp(−3/2 − 6/3) = e^−3.5 = 0.0301973834;
    # dpo loss on sums (β = 0.1): log(1 + e^−0.07) = 0.6587595555; L = 0.0301973834 · 0.6587595555 = 0.0198928149.
    # (open_instruct/dpo_utils.py's wpo_loss weights with sums, e^−9, which would give 8.13e−5.)
    out = wpo(*HAND_PAIR, beta=0.1)
    assert float(out.losses[0]) == pytest.approx(0.0198928149, rel=1e-6)
    assert float(out.chosen_rewards[0]) == pytest.approx(0.05, rel=1e-6)


def test_hand_pair_ipo():
    # Averaged log-ratios: chosen (−3 + 3.5)/2 = 0.25, rejected (−6 + 5.8)/3 = −0.0666667, z = 0.3166667.
    # β = 0.1: 1/(2β) = 5, L = (0.3166667 − 5)² = (−4.6833333)² = 21.9336111. Rewards 0.025 and −0.00666667.
    out = ipo(*HAND_PAIR, beta=0.1)
    assert float(out.losses[0]) == pytest.approx(21.9336111, rel=1e-6)
    assert float(out.chosen_rewards[0]) == pytest.approx(0.025, rel=1e-5)
    assert float(out.rejected_rewards[0]) == pytest.approx(-0.00666667, rel=1e-5)


# --- label smoothing, clamping, stability ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "wpo"])
def test_label_smoothing_mixes_with_the_flipped_pair(name):
    pc, pr, qc, qr, nc, nr = map(jnp.asarray, random_pairs(8))
    fn, beta = PREFERENCE_LOSSES[name], DEFAULT_BETA[name]
    plain = fn(pc, pr, qc, qr, nc, nr, beta=beta, label_smoothing=0.0).losses
    flipped = fn(pr, pc, qr, qc, nr, nc, beta=beta, label_smoothing=0.0).losses
    smoothed = fn(pc, pr, qc, qr, nc, nr, beta=beta, label_smoothing=0.1).losses
    np.testing.assert_allclose(smoothed, 0.9 * plain + 0.1 * flipped, rtol=1e-6)
    # ε = 0 is plain −log σ(βz) = log(1 + e^−βz).
    if name == "dpo":
        z = np.float64(pc - qc) - np.float64(pr - qr)
        np.testing.assert_allclose(plain, np.logaddexp(0.0, -beta * z), rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_zero_lengths_are_clamped(name):
    args = [jnp.array([0.0, -4.0]), jnp.array([-2.0, 0.0]), jnp.array([0.0, -3.0]), jnp.array([-1.0, 0.0])]
    zero_len = PREFERENCE_LOSSES[name](*args, jnp.array([0, 2]), jnp.array([1, 0]), beta=1.0)
    one_len = PREFERENCE_LOSSES[name](*args, jnp.array([1, 2]), jnp.array([1, 1]), beta=1.0)
    for got, want in zip(zero_len, one_len):
        assert bool(jnp.all(jnp.isfinite(got)))
        np.testing.assert_allclose(got, want)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "simpo", "wpo"])
def test_huge_margins_are_stable(name, eps):
    # |β·z| = 1e4 both ways, where log(sigmoid(x)) would give −inf.
    pc, pr = jnp.array([0.0, -1e5]), jnp.array([-1e5, 0.0])
    q, n = jnp.zeros(2), jnp.ones(2, jnp.int32)
    args = (pc, pr, q, q, n, n)
    out = PREFERENCE_LOSSES[name](*args, beta=0.1, label_smoothing=eps, gamma_beta_ratio=0.0)
    grads = JIT_GRAD[name](*args, beta=0.1, label_smoothing=eps, gamma_beta_ratio=0.0)
    expected, _ = reference(name, *args, 0.1, eps, 0.0)
    np.testing.assert_allclose(out.losses, expected[0], rtol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    if name != "wpo":  # wpo's weight exp(−1e5) is 0 here
        assert float(out.losses[1]) == pytest.approx((1 - eps) * 1e4, rel=1e-6)


# --- sequence_logps -------------------------------------------------------------------------------------


def np_sequence_logps(logits, ids, mask, seg):
    logits = np.asarray(logits, np.float64)
    B, T, _ = logits.shape
    sums, counts = np.zeros(B), np.zeros(B)
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t + 1] and seg[b, t] != 0 and seg[b, t + 1] == seg[b, t]:
                row = logits[b, t]
                m = row.max()
                sums[b] += row[ids[b, t + 1]] - m - np.log(np.exp(row - m).sum())
                counts[b] += 1
    return sums, counts


def random_rows(seed, B=3, T=14, V=11, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
    ids = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) < 0.7).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):  # two documents, then padding
        cut, end = rng.integers(2, T // 2), rng.integers(T // 2 + 2, T + 1)
        seg[b, :cut], seg[b, cut:end] = 1, 2
    return logits, ids, mask, seg


@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_sequence_logps_matches_reference(scale):
    logits, ids, mask, seg = random_rows(int(scale), scale=scale)
    fn = jax.jit(sequence_logps)
    got_sum, got_count = fn(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg))
    want_sum, want_count = np_sequence_logps(logits, ids, mask, seg)
    assert got_sum.dtype == jnp.float32 and got_sum.shape == (3,)
    np.testing.assert_array_equal(got_count, want_count)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5, atol=1e-4)
    grad = jax.grad(lambda lg: jnp.sum(sequence_logps(lg, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg))[0]))(
        jnp.asarray(logits)
    )
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_sequence_logps_without_segments_is_one_document():
    logits, ids, mask, _ = random_rows(9)
    got_sum, got_count = sequence_logps(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    want_sum, want_count = np_sequence_logps(logits, ids, mask, np.ones_like(ids))
    np.testing.assert_array_equal(got_count, want_count)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)


def test_sequence_logps_hand_case():
    # Uniform logits over 4 tokens: every labelled target has log-prob −log 4. Row [5 6 7 | 8 9] with the mask
    # on 6, 7, 8, 9: 8 starts document 2 so it is not predicted from 7 -> 3 labelled tokens.
    ids, mask, seg = jnp.array([[1, 2, 3, 0, 1]]), jnp.array([[0, 1, 1, 1, 1]]), jnp.array([[1, 1, 1, 2, 2]])
    total, count = sequence_logps(jnp.zeros((1, 5, 4)), ids, mask, seg)
    assert float(count[0]) == 3.0 and float(total[0]) == pytest.approx(-3 * math.log(4.0), rel=1e-6)


# --- reward model, dispatch -----------------------------------------------------------------------------


def test_bradley_terry_hand_cases():
    losses, correct = bradley_terry(jnp.array([1.0, 0.0, 0.5, -1e4]), jnp.array([0.0, 1.0, 0.5, 0.0]))
    np.testing.assert_allclose(losses, [math.log1p(math.e**-1), math.log1p(math.e), math.log(2.0), 1e4], rtol=1e-6)
    np.testing.assert_array_equal(correct, [1.0, 0.0, 0.0, 0.0])
    grad = jax.grad(lambda c: jnp.sum(bradley_terry(c, jnp.zeros(2))[0]))(jnp.array([1.0, -1e4]))
    np.testing.assert_allclose(grad, [-1 / (1 + math.e), -1.0], rtol=1e-6)  # −σ(−margin)


def test_dispatch_by_name():
    assert set(PREFERENCE_LOSSES) == set(DEFAULT_BETA) == set(NAMES)
    args = tuple(map(jnp.asarray, random_pairs(10, B=4)))
    for name in NAMES:
        direct = PREFERENCE_LOSSES[name](*args, beta=DEFAULT_BETA[name])
        for got, want in zip(preference_loss(name, *args, beta=DEFAULT_BETA[name]), direct):
            np.testing.assert_array_equal(got, want)


def test_unknown_name_lists_known_losses():
    with pytest.raises(ValueError, match=r"'orpo'.*dpo, dpo_norm, ipo, simpo, wpo"):
        preference_loss("orpo", *HAND_PAIR, beta=0.1)
