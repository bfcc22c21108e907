"""The RLVR math of tulu_jax.rl against plain float64 NumPy loop references and hand-computed vectors.

Tolerances: every float32 operation rounds to within EPS/2 of its result, and XLA's exp/log/expm1 are within
a couple of ulps, so a value built from terms of magnitude `scale` through a reduction of length n is within
about n·EPS·scale of the exact result; `assert_f32` allows 4·(n + 2)·EPS·scale. `scale` is derived per check
from the magnitudes of the terms that enter it (it is never a number read off one machine).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tulu_jax.rl import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    aggregate,
    apply_non_stop_penalty,
    constant_groups,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    response_masks,
    token_rewards,
    truncated_importance_weights,
    value_loss,
)

EPS = float(np.finfo(np.float32).eps)
B, T = 4, 7
SEEDS = (0, 1, 2)
# Real-token counts per row: full rows, length-1 rows, an empty row among others, mixed, and all rows empty.
LENGTHS = {
    "full": [T, T, T, T],
    "length1": [1, 1, 1, 1],
    "empty_row": [0, 3, T, 5],
    "mixed": [2, T, 1, 4],
    "all_empty": [0, 0, 0, 0],
}


def assert_f32(actual, expected, scale, n=1):
    """float32 `actual` within 4·(n + 2)·EPS·scale of the float64 `expected` (see the module docstring)."""
    actual = np.asarray(actual)
    assert actual.dtype == np.float32, actual.dtype
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = 4.0 * (n + 2) * EPS * np.asarray(scale, np.float64)
    err = np.abs(actual.astype(np.float64) - expected)
    assert np.all(err <= bound), f"max error {err.max():.3g}, bound {np.min(bound):.3g}\n{actual}\n{expected}"


def f32(rng, *shape, scale=1.0):
    """Random float32 normal values; the references get these exact values as float64."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------ float64 loop references


def ref_masks(lengths, width):
    policy = np.zeros((len(lengths), width))
    value = np.zeros((len(lengths), width))
    for b, n in enumerate(lengths):
        for t in range(width):
            policy[b, t] = 1.0 if t <= n - 1 else 0.0
            value[b, t] = 1.0 if t <= n else 0.0
    return policy, value


def ref_kl(logps, ref_logps, kind):
    out = np.zeros(logps.shape)
    for b in range(logps.shape[0]):
        for t in range(logps.shape[1]):
            d = float(logps[b, t]) - float(ref_logps[b, t])
            out[b, t] = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1.0 + d}[kind]
    return out


def ref_token_rewards(scores, kl, lengths, beta):
    rows, width = kl.shape
    out = np.zeros((rows, width))
    for b in range(rows):
        for t in range(lengths[b]):
            out[b, t] = -beta * float(kl[b, t])
        end = lengths[b] if lengths[b] < width else width - 1
        out[b, end] += float(scores[b])
    return out


def ref_gae(rewards, values, mask, gamma, lam):
    rows, width = rewards.shape
    adv = np.zeros((rows, width))
    ret = np.zeros((rows, width))
    for b in range(rows):
        last, next_value = 0.0, 0.0
        for t in reversed(range(width)):
            if mask[b, t] == 0:
                last, next_value = 0.0, 0.0
                continue
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + float(values[b, t])
            next_value = float(values[b, t])
    return adv, ret


def ref_whiten(x, mask, shift_mean=True, eps=1e-8):
    picked = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    out = np.zeros(x.shape)
    if not picked:
        return out, 0.0, 1.0
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / max(len(picked) - 1, 1)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (float(x[b, t]) - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out, mean, math.sqrt(var + eps)


def ref_group_advantages(scores, n, normalize_std=True, eps=1e-8):
    out = np.zeros(len(scores))
    stds = []
    for g in range(len(scores) // n):
        group = [float(s) for s in scores[g * n : (g + 1) * n]]
        mean = sum(group) / n
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / n)
        stds.append(std)
        for i, s in enumerate(group):
            out[g * n + i] = (s - mean) / (std + eps) if normalize_std else s - mean
    return out, stds


def ref_aggregate(x, mask, mode, max_length=None):
    rows, width = x.shape
    total, count, row_means = 0.0, 0.0, []
    for b in range(rows):
        row_total, row_count = 0.0, 0.0
        for t in range(width):
            if mask[b, t]:
                row_total += float(x[b, t])
                row_count += 1.0
        total += row_total
        count += row_count
        if row_count > 0:
            row_means.append(row_total / row_count)
    if mode == "token":
        return total / count if count else 0.0
    if mode == "sequence":
        return sum(row_means) / len(row_means) if row_means else 0.0
    return total / (rows * (width if max_length is None else max_length))


def ref_policy_loss(logps, old, adv, mask, clip_low, clip_high, aggregation, weights):
    """(loss, stats, d loss / d logps, per-token aggregation weight) in float64. The gradient is the analytic
    −A·ρ·w·(aggregation weight) where the unclipped term is the larger, and 0 where the clipped one is (ρ lies
    outside the clip range there, so the clipped term is constant)."""
    rows, width = logps.shape
    clip_high = clip_low if clip_high is None else clip_high
    per_token = np.zeros((rows, width))
    ratio = np.zeros((rows, width))
    clipped_wins = np.zeros((rows, width))
    slope = np.zeros((rows, width))  # d per_token / d logps
    for b in range(rows):
        for t in range(width):
            if not mask[b, t]:
                continue
            rho = math.exp(float(logps[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            w = 1.0 if weights is None else float(weights[b, t])
            unclipped = -a * rho
            clipped = -a * min(max(rho, 1.0 - clip_low), 1.0 + clip_high)
            ratio[b, t] = rho
            clipped_wins[b, t] = 1.0 if clipped > unclipped else 0.0
            per_token[b, t] = max(unclipped, clipped) * w
            slope[b, t] = 0.0 if clipped > unclipped else -a * rho * w
    loss = ref_aggregate(per_token, mask, aggregation)
    rows_used = sum(1 for b in range(rows) if mask[b].sum() > 0)
    agg_weight = np.zeros((rows, width))  # d loss / d per_token
    for b in range(rows):
        for t in range(width):
            if mask[b, t]:
                agg_weight[b, t] = {
                    "token": 1.0 / mask.sum(),
                    "sequence": 1.0 / (mask[b].sum() * rows_used),
                    "constant": 1.0 / (rows * width),
                }[aggregation]
    log_ratio = np.where(mask > 0, logps.astype(np.float64) - old, 0.0)
    mean_ratio = ref_aggregate(ratio, mask, "token")
    stats = {
        "clipfrac": ref_aggregate(clipped_wins, mask, "token"),
        "approxkl": 0.5 * ref_aggregate(log_ratio**2, mask, "token"),
        "ratio": mean_ratio,
        "ratio_var": ref_aggregate((ratio - mean_ratio) ** 2, mask, "token"),
    }
    return loss, stats, slope * agg_weight, agg_weight


def ref_value_loss(values, old, returns, mask, clip, aggregation):
    """(loss, clipfrac) in float64."""
    rows, width = values.shape
    err, wins = np.zeros((rows, width)), np.zeros((rows, width))
    for b in range(rows):
        for t in range(width):
            v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            clipped = o + min(max(v - o, -clip), clip)
            e1, e2 = (v - r) ** 2, (clipped - r) ** 2
            err[b, t], wins[b, t] = max(e1, e2), float(e2 > e1)
    return 0.5 * ref_aggregate(err, mask, aggregation), ref_aggregate(wins, mask, "token")


def ref_entropy(logits):
    rows, width, vocab = logits.shape
    out = np.zeros((rows, width))
    for b in range(rows):
        for t in range(width):
            z = [float(v) for v in logits[b, t]]
            top = max(z)
            lse = top + math.log(sum(math.exp(v - top) for v in z))
            out[b, t] = -sum(math.exp(v - lse) * (v - lse) for v in z)
    return out


# ------------------------------------------------------------------ hand-computed vectors


def test_hand_vector_token_rewards_gae_and_whitening():
    # T=6, one response of 3 real tokens (EOS at index 2), beta 0.05, score 10.
    # kl = logps - ref = [.2, -.1, 0] on the response, 0 beyond (masked);
    # r = -0.05·kl = [-.01, .005, 0] and the score lands one past EOS, at index 3.
    logps = jnp.array([[-0.5, -1.0, -0.2, -3.0, -2.0, -1.0]])
    ref = jnp.array([[-0.7, -0.9, -0.2, -0.1, -0.5, -4.0]])
    lengths = jnp.array([3])
    kl = kl_penalty(logps, ref, "k1")
    assert_f32(kl[:, :3], [[0.2, -0.1, 0.0]], scale=1.0)
    rewards = token_rewards(jnp.array([10.0]), kl, lengths, 0.05)
    assert_f32(rewards, [[-0.01, 0.005, 0.0, 10.0, 0.0, 0.0]], scale=10.0)
    policy_mask, value_mask = response_masks(lengths, 6)
    np.testing.assert_array_equal(policy_mask, [[1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(value_mask, [[1, 1, 1, 1, 0, 0]])
    # γ=1, λ=.95, V=[1,2,3,4] (the 9s lie beyond the value mask):
    # t=3: δ=10+0-4=6, A=6; t=2: δ=0+4-3=1, A=1+.95·6=6.7; t=1: δ=.005+3-2=1.005, A=1.005+.95·6.7=7.37;
    # t=0: δ=-.01+2-1=.99, A=.99+.95·7.37=7.9915; R = A + V.
    values = jnp.array([[1.0, 2.0, 3.0, 4.0, 9.0, 9.0]])
    adv, ret = gae(rewards, values, value_mask, 1.0, 0.95)
    assert_f32(adv, [[7.9915, 7.37, 6.7, 6.0, 0.0, 0.0]], scale=30.0, n=6)
    assert_f32(ret, [[8.9915, 9.37, 9.7, 10.0, 0.0, 0.0]], scale=30.0, n=6)
    # Whitening over the policy mask (tokens 0..2): μ = 7.353833, unbiased σ² = 0.417194, σ = 0.645906.
    white = masked_whiten(adv, policy_mask)
    # tolerance: half a unit of the 5th decimal given, plus the float32 bound of test_masked_whiten_random
    # (max|A|/σ·(1 + |w|) ≈ 8/0.646·2 ≈ 25 over 3 tokens)
    atol = 5e-6 + 4 * (3 + 2) * EPS * 25
    np.testing.assert_allclose(np.asarray(white)[0, :3], [0.98725, 0.02503, -1.01228], rtol=0, atol=atol)
    np.testing.assert_array_equal(np.asarray(white)[0, 3:], 0.0)


def test_gae_hand_discounted():
    # γ=λ=.5, r=[1,1], V=[2,4], full mask: t=1: δ=1-4=-3, A=-3; t=0: δ=1+.5·4-2=1, A=1+.25·(-3)=.25.
    adv, ret = gae(jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 4.0]]), jnp.ones((1, 2)), 0.5, 0.5)
    assert_f32(adv, [[0.25, -3.0]], scale=8.0, n=2)
    assert_f32(ret, [[2.25, 1.0]], scale=8.0, n=2)


def test_kl_estimators_by_hand():
    zero = jnp.zeros((1, 1))
    for kind in KL_ESTIMATORS:  # every estimator is 0 where the policy equals the reference
        np.testing.assert_array_equal(kl_penalty(zero, zero, kind), [[0.0]])
    # Δ = ln 2: k1 = ln 2, k2 = ½ ln²2, k3 = e^{-ln 2} - 1 + ln 2 = ln 2 - ½.
    ln2 = math.log(2.0)
    d = jnp.array([[ln2]])
    assert_f32(kl_penalty(d, zero, "k1"), [[ln2]], scale=1.0)
    assert_f32(kl_penalty(d, zero, "k2"), [[0.5 * ln2 * ln2]], scale=1.0)
    assert_f32(kl_penalty(d, zero, "k3"), [[ln2 - 0.5]], scale=1.0)
    # Small Δ: k3 ≈ Δ²/2 = 5e-7 at Δ = 1e-3, while exp(-Δ) - 1 in float32 alone would err by ~EPS ≈ 1e-7 (20%);
    # the bound below (terms |expm1(-Δ)| + |Δ| ≈ 2e-3) allows under 1%.
    small = np.float32(1e-3)
    want = math.expm1(-float(small)) + float(small)
    assert_f32(kl_penalty(jnp.full((1, 1), small), zero, "k3"), [[want]], scale=2 * float(small))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(d, zero, "k4")


def test_response_masks_and_reward_placement_by_hand():
    policy, value = response_masks(jnp.array([0, 2, 4]), 4)
    assert policy.dtype == value.dtype == jnp.float32
    np.testing.assert_array_equal(policy, [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(value, [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    # lengths == T: the score goes on the last token (T-1); lengths == 0: at index 0 with no KL term.
    # beta .5: row 0 = [-.5, -1, -1.5 + 10]; row 1 = [20, 0, 0] (its kl is padding).
    kl = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, jnp.inf]])
    rewards = token_rewards(jnp.array([10.0, 20.0]), kl, jnp.array([3, 0]), 0.5)
    assert_f32(rewards, [[-0.5, -1.0, 8.5], [20.0, 0.0, 0.0]], scale=20.0)


def test_non_stop_penalty_replaces_only_unstopped():
    scores = jnp.array([1.0, 2.0, 3.0])
    stopped = jnp.array([True, False, True])
    np.testing.assert_array_equal(apply_non_stop_penalty(scores, stopped, -10.0), [1.0, -10.0, 3.0])
    np.testing.assert_array_equal(apply_non_stop_penalty(scores, stopped, 0.0), [1.0, 0.0, 3.0])  # 0 is a penalty
    np.testing.assert_array_equal(apply_non_stop_penalty(scores, stopped, None), [1.0, 2.0, 3.0])


# (ρ, A, clip_low, clip_high, per-token loss, clipped term wins, d loss / d logps):
# ρ=1.5, A=+1: -1.5 vs -clip → -1.2; the clipped term wins, no gradient.
# ρ=1.5, A=-1: 1.5 vs 1.2 → 1.5 unclipped, gradient -Aρ = 1.5.
# ρ=.5, A=+1: -.5 vs -.8 → -.5 unclipped, gradient -.5.   ρ=.5, A=-1: .5 vs .8 → .8 clipped.
# clip-higher .28: ρ=1.25 stays inside [.8, 1.28] → -1.25, gradient -1.25; with the symmetric .2 it is cut to -1.2.
# ρ=.7, A=+1 with clip-higher: the low side still clips at .8: -.7 vs -.8 → -.7.
POLICY_CASES = [
    (1.5, 1.0, 0.2, None, -1.2, 1.0, 0.0),
    (1.5, -1.0, 0.2, None, 1.5, 0.0, 1.5),
    (0.5, 1.0, 0.2, None, -0.5, 0.0, -0.5),
    (0.5, -1.0, 0.2, None, 0.8, 1.0, 0.0),
    (1.25, 1.0, 0.2, 0.28, -1.25, 0.0, -1.25),
    (1.25, 1.0, 0.2, None, -1.2, 1.0, 0.0),
    (0.7, 1.0, 0.2, 0.28, -0.7, 0.0, -0.7),
]


@pytest.mark.parametrize("rho,adv,clip_low,clip_high,want,clipfrac,grad", POLICY_CASES)
def test_policy_clipping_by_hand(rho, adv, clip_low, clip_high, want, clipfrac, grad):
    logps = jnp.array([[math.log(rho)]], jnp.float32)
    kwargs = dict(clip_low=clip_low, clip_high=clip_high)
    args = (jnp.zeros((1, 1)), jnp.full((1, 1), adv), jnp.ones((1, 1)))
    loss, stats = policy_loss(logps, *args, **kwargs)
    assert_f32(loss, want, scale=2.0)
    assert float(stats["clipfrac"]) == clipfrac
    g = jax.grad(lambda lp: policy_loss(lp, *args, **kwargs)[0])(logps)
    assert_f32(g, [[grad]], scale=2.0)


def test_value_loss_clipping_by_hand():
    # old=1, V=1.5, clip .2 → V'=1.2. R=2: (V-R)²=.25 < (V'-R)²=.64 → ½·.64 = .32, clipped wins.
    # R=1: .25 > .04 → ½·.25 = .125, unclipped wins. Token mean of the two: (.32+.125)/2 = .2225, clipfrac ½.
    loss, stats = value_loss(jnp.array([[1.5, 1.5]]), jnp.ones((1, 2)), jnp.array([[2.0, 1.0]]), jnp.ones((1, 2)))
    assert_f32(loss, 0.2225, scale=1.0, n=2)
    assert float(stats["clipfrac"]) == 0.5


def test_aggregations_by_hand_and_non_finite_padding():
    x = jnp.array([[1.0, 2.0, 3.0, jnp.inf], [10.0, jnp.nan, 0.0, 0.0], [jnp.nan] * 4])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4])
    # token: (1+2+3+10)/4 = 4; sequence: mean of the non-empty rows' means (2, 10) = 6;
    # constant: 16/(3·4) = 4/3, or 16/(3·8) = 2/3 with max_length 8.
    assert_f32(aggregate(x, mask, "token"), 4.0, scale=4.0, n=4)
    assert_f32(aggregate(x, mask, "sequence"), 6.0, scale=10.0, n=4)
    assert_f32(aggregate(x, mask, "constant"), 4.0 / 3.0, scale=2.0, n=4)
    assert_f32(aggregate(x, mask, "constant", max_length=8), 2.0 / 3.0, scale=1.0, n=4)
    assert_f32(masked_mean(x, mask), 4.0, scale=4.0, n=4)
    for mode in AGGREGATIONS:  # an empty mask gives 0, not NaN
        assert float(aggregate(x, jnp.zeros_like(mask), mode)) == 0.0
    with pytest.raises(ValueError, match="mean"):
        aggregate(x, mask, "mean")


def test_group_advantages_by_hand():
    # Groups of 2: [1,0] → mean .5, population std .5 → ±1; [0,1] → ∓1; [2,2] → 0 and a constant group.
    scores = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
    assert_f32(group_advantages(scores, 2), [1.0, -1.0, -1.0, 1.0, 0.0, 0.0], scale=2.0, n=2)
    assert_f32(group_advantages(scores, 2, normalize_std=False), [0.5, -0.5, -0.5, 0.5, 0, 0], scale=2.0, n=2)
    np.testing.assert_array_equal(constant_groups(scores, 2), [False, False, True])
    np.testing.assert_array_equal(constant_groups(scores, 6), [False])
    for bad in (4, 0):
        with pytest.raises(ValueError, match="group_size"):
            group_advantages(scores, bad)
        with pytest.raises(ValueError, match="group_size"):
            constant_groups(scores, bad)


def test_whiten_edges_by_hand():
    # x=[1,3]: μ=2, unbiased σ²=2 → ∓1/√2; shift_mean=False adds μ back: 2 ∓ 1/√2.
    x = jnp.array([[1.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    h = 1.0 / math.sqrt(2.0)
    assert_f32(masked_whiten(x, mask), [[-h, h, 0.0]], scale=2.0, n=2)
    assert_f32(masked_whiten(x, mask, shift_mean=False), [[2 - h, 2 + h, 0.0]], scale=4.0, n=2)
    # One masked token: σ² is taken as 0, so it whitens to 0; an empty mask gives all 0.
    np.testing.assert_array_equal(masked_whiten(x, jnp.array([[0.0, 1.0, 0.0]])), [[0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(masked_whiten(x, jnp.zeros_like(mask)), [[0.0, 0.0, 0.0]])


def test_truncated_importance_weights_by_hand():
    # exp(ln 2) = 2 is capped at 1.5; exp(ln .5) = .5 stays; an overflowing ratio is capped too; no gradient.
    trainer = jnp.array([[math.log(2.0), math.log(0.5), 200.0]])
    weights = truncated_importance_weights(trainer, jnp.zeros((1, 3)), 1.5)
    assert_f32(weights, [[1.5, 0.5, 1.5]], scale=2.0)
    g = jax.grad(lambda lp: jnp.sum(truncated_importance_weights(lp, jnp.zeros((1, 3)), 1.5)))(trainer)
    np.testing.assert_array_equal(g, 0.0)


def test_entropy_by_hand():
    # Uniform over 5 → ln 5; one logit 1e4 above the rest → 0 (finite); a -inf entry adds nothing: [0,0,-inf] → ln 2.
    logits = jnp.array([[[0.0] * 5, [1e4, 0, 0, 0, 0], [0.0, 0.0, -jnp.inf, -jnp.inf, -jnp.inf]]])
    assert_f32(entropy_from_logits(logits), [[math.log(5), 0.0, math.log(2)]], scale=3.0, n=5)
    assert entropy_from_logits(logits.astype(jnp.bfloat16)).dtype == jnp.float32


# ------------------------------------------------------------------ random inputs against the loop references


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_kl_penalty_random(seed, kind):
    rng = np.random.default_rng(seed)
    logps, ref = f32(rng, B, T, scale=2.0), f32(rng, B, T, scale=2.0)
    delta = logps.astype(np.float64) - ref
    scale = np.abs(delta) + np.abs(np.expm1(-delta)) + delta**2
    assert_f32(kl_penalty(logps, ref, kind), ref_kl(logps, ref, kind), scale=scale)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", LENGTHS)
def test_masks_and_token_rewards_random(seed, case):
    rng = np.random.default_rng(seed)
    lengths = np.array(LENGTHS[case])
    policy, value = response_masks(jnp.asarray(lengths), T)
    want_policy, want_value = ref_masks(lengths, T)
    np.testing.assert_array_equal(policy, want_policy)
    np.testing.assert_array_equal(value, want_value)
    kl, scores, beta = f32(rng, B, T), f32(rng, B, scale=5.0), 0.05
    want = ref_token_rewards(scores, kl, lengths, beta)
    scale = beta * np.abs(kl) + np.abs(scores)[:, None]
    assert_f32(token_rewards(scores, kl, lengths, beta), want, scale=scale, n=2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", LENGTHS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5)])
def test_gae_random(seed, case, gamma, lam):
    rng = np.random.default_rng(seed)
    _, value_mask = ref_masks(LENGTHS[case], T)
    rewards, values = f32(rng, B, T), f32(rng, B, T, scale=3.0)
    adv, ret = gae(rewards, values, value_mask.astype(np.float32), gamma, lam)
    want_adv, want_ret = ref_gae(rewards, values, value_mask, gamma, lam)
    # every A_t is a discounted (γ, λ ≤ 1) sum of the row's rewards and values: bound by their absolute sum
    scale = np.sum(np.abs(rewards) + 2 * np.abs(values), axis=1, keepdims=True) * np.ones((1, T))
    assert_f32(adv, want_adv, scale=scale, n=T)
    assert_f32(ret, want_ret, scale=scale, n=T)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", LENGTHS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_random(seed, case, shift_mean):
    rng = np.random.default_rng(seed)
    policy_mask, _ = ref_masks(LENGTHS[case], T)
    x = f32(rng, B, T, scale=4.0) + 1.0
    want, mean, std = ref_whiten(x, policy_mask, shift_mean)
    got = masked_whiten(x, policy_mask.astype(np.float32), shift_mean=shift_mean)
    # the error of μ (≈ n·EPS·max|x|) is divided by σ and carried into σ: relative to the whitened value
    white = np.abs(want - (0.0 if shift_mean else mean))
    scale = np.max(np.abs(x)) / std * (1.0 + white) + white + abs(mean)
    assert_f32(got, want, scale=scale, n=B * T)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", [1, 3, 4])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_random(seed, group_size, normalize_std):
    rng = np.random.default_rng(seed)
    scores = f32(rng, 12, scale=2.0)
    scores[:group_size] = scores[0]  # the first group is constant: advantages exactly 0
    got = group_advantages(scores, group_size, normalize_std=normalize_std)
    want, stds = ref_group_advantages(scores, group_size, normalize_std)
    std_B = np.repeat(stds, group_size) + 1e-8
    top = np.max(np.abs(scores))
    scale = top / std_B * (1.0 + np.abs(want)) + np.abs(want) if normalize_std else top * np.ones(12)
    assert_f32(got, want, scale=scale, n=group_size)
    np.testing.assert_array_equal(np.asarray(got)[:group_size], 0.0)
    want_constant = [len(set(scores[g : g + group_size].tolist())) == 1 for g in range(0, 12, group_size)]
    np.testing.assert_array_equal(constant_groups(scores, group_size), want_constant)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", LENGTHS)
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_random(seed, case, mode):
    rng = np.random.default_rng(seed)
    mask, _ = ref_masks(LENGTHS[case], T)
    x = f32(rng, B, T)
    want = ref_aggregate(x, mask, mode)
    assert_f32(aggregate(x, mask.astype(np.float32), mode), want, scale=ref_aggregate(np.abs(x), mask, mode), n=T * B)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", ["full", "length1", "empty_row", "mixed"])
@pytest.mark.parametrize(
    "aggregation,clip_high,with_weights",
    [("token", None, False), ("sequence", 0.28, False), ("constant", None, True), ("token", 0.28, True)],
)
def test_policy_loss_and_gradient_random(seed, case, aggregation, clip_high, with_weights):
    rng = np.random.default_rng(seed)
    mask, _ = ref_masks(LENGTHS[case], T)
    old = f32(rng, B, T) - 2.0
    logps = old + f32(rng, B, T, scale=0.3)  # ratios spread over both clip bounds
    adv = f32(rng, B, T)
    weights = rng.uniform(0.2, 2.0, (B, T)).astype(np.float32) if with_weights else None
    kwargs = dict(clip_high=clip_high, aggregation=aggregation, importance_weights_BxT=weights)
    mask32 = mask.astype(np.float32)
    (loss, stats), grad = jax.value_and_grad(lambda lp: policy_loss(lp, old, adv, mask32, **kwargs), has_aux=True)(
        jnp.asarray(logps)
    )
    want = ref_policy_loss(logps, old, adv, mask, 0.2, clip_high, aggregation, weights)
    want_loss, want_stats, want_grad, agg_weight = want
    delta = np.abs(logps.astype(np.float64) - old)
    rho = np.exp(delta)
    w = np.ones((B, T)) if weights is None else weights
    # each term: |A|·max(ρ, clip)·w, with exp's relative error growing with |Δ| (Δ itself is rounded)
    term = np.abs(adv) * (rho + 1.28) * w * (2.0 + delta)
    assert_f32(loss, want_loss, scale=ref_aggregate(term, mask, aggregation), n=B * T)
    assert_f32(grad, want_grad, scale=term * agg_weight, n=2)
    assert_f32(stats["clipfrac"], want_stats["clipfrac"], scale=1.0, n=B * T)
    assert_f32(stats["approxkl"], want_stats["approxkl"], scale=np.max(delta**2 * (2 + delta)), n=B * T)
    assert_f32(stats["ratio"], want_stats["ratio"], scale=np.max(rho * (2 + delta)), n=B * T)
    assert_f32(stats["ratio_var"], want_stats["ratio_var"], scale=np.max(rho * (2 + delta)) ** 2, n=B * T)
    assert 0.0 < want_stats["clipfrac"] < 1.0 or case == "length1"  # the inputs do exercise both branches


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", LENGTHS)
@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_value_loss_random(seed, case, mode):
    rng = np.random.default_rng(seed)
    _, mask = ref_masks(LENGTHS[case], T)
    old, ret = f32(rng, B, T), f32(rng, B, T)
    values = old + f32(rng, B, T, scale=0.4)
    loss, stats = value_loss(values, old, ret, mask.astype(np.float32), aggregation=mode)
    term = (np.abs(values) + np.abs(old) + np.abs(ret) + 0.2) ** 2
    want_loss, want_clipfrac = ref_value_loss(values, old, ret, mask, 0.2, mode)
    assert_f32(loss, want_loss, scale=ref_aggregate(term, mask, mode), n=B * T)
    assert_f32(stats["clipfrac"], want_clipfrac, scale=1.0, n=B * T)


@pytest.mark.parametrize("seed", SEEDS)
def test_truncated_importance_weights_random(seed):
    rng = np.random.default_rng(seed)
    trainer, sampler = f32(rng, B, T), f32(rng, B, T)
    delta = trainer.astype(np.float64) - sampler
    want = np.minimum(np.exp(delta), 1.5)
    assert_f32(truncated_importance_weights(trainer, sampler, 1.5), want, scale=want * (2 + np.abs(delta)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("logit_scale", [1.0, 30.0, 1000.0])
def test_entropy_random(seed, logit_scale):
    rng = np.random.default_rng(seed)
    vocab = 11
    logits = f32(rng, 2, 3, vocab, scale=logit_scale)
    want = ref_entropy(logits)
    # log p_v = (z_v - max) - log Σ exp(z - max) carries an error of about EPS·(|z_v - max| + ln V), and
    # |z_v - max| ≤ |log p_v| + ln V; weighted by p_v and summed that is EPS·(H + 2 ln V)
    assert_f32(entropy_from_logits(logits), want, scale=np.abs(want) + 2 * math.log(vocab) + 1.0, n=vocab)


# ------------------------------------------------------------------ jit, shapes and dtypes


def test_everything_jits_with_float32_shapes():
    rng = np.random.default_rng(0)
    lengths = jnp.array(LENGTHS["mixed"])
    logps, ref, values = (jnp.asarray(f32(rng, B, T)) for _ in range(3))
    scores = jnp.asarray(f32(rng, B))

    @jax.jit
    def step(logps, ref, values, scores, lengths):
        policy_mask, value_mask = response_masks(lengths, T)
        kl = kl_penalty(logps, ref, "k3")
        rewards = token_rewards(apply_non_stop_penalty(scores, lengths < T, -1.0), kl, lengths, 0.05)
        adv, ret = gae(rewards, values, value_mask, 1.0, 0.95)
        adv = masked_whiten(adv, policy_mask)
        pl, pstats = policy_loss(logps, ref, adv, policy_mask, clip_high=0.28, aggregation="sequence")
        vl, vstats = value_loss(values, ret, ret, value_mask, aggregation="constant")
        weights = truncated_importance_weights(logps, ref, 2.0)
        group = group_advantages(scores, 2, normalize_std=False)
        return kl, rewards, adv, ret, weights, pl, vl, pstats, vstats, group, constant_groups(scores, 2)

    kl, rewards, adv, ret, weights, pl, vl, pstats, vstats, group, const = step(logps, ref, values, scores, lengths)
    for x in (kl, rewards, adv, ret, weights):
        assert x.shape == (B, T) and x.dtype == jnp.float32
    for x in (pl, vl, *pstats.values(), *vstats.values()):
        assert x.shape == () and x.dtype == jnp.float32
    assert set(pstats) == {"clipfrac", "approxkl", "ratio", "ratio_var"} and set(vstats) == {"clipfrac"}
    assert group.shape == (B,) and group.dtype == jnp.float32
    assert const.shape == (B // 2,) and const.dtype == jnp.bool_
    assert np.all(np.isfinite(np.asarray(adv))) and np.isfinite(float(pl)) and np.isfinite(float(vl))
    entropy = jax.jit(entropy_from_logits)(jnp.zeros((B, T, 5), jnp.bfloat16))
    assert entropy.shape == (B, T) and entropy.dtype == jnp.float32
