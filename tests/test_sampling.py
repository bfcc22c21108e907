"""The in-process sampler: sampling math against float64 NumPy, the KV-cache decode against the full forward,
greedy output against transformers' `generate`, log-probs against full-forward scoring, `score` against
transformers, stopping, seeding, the batched array form, sharding and weight pushes (copied, cast, safe
from donation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import FAMILIES, make_hf_model
from jax.sharding import PartitionSpec as P

from tulu_jax.losses import token_logps
from tulu_jax.models.decoder import KVCache
from tulu_jax.models.loading import build_model
from tulu_jax.rollout import FINISH_CODES, RolloutBackend, SamplingParams, batch_completions
from tulu_jax.sampling import (
    LocalSampler,
    derived_seed,
    processed_logits,
    prompt_bucket,
    prompt_positions,
    sample_tokens,
)
from tulu_jax.sharding import make_mesh

M = 12  # max_tokens everywhere, so each sampler compiles once per batch size
EOS, PAD = 1000, 0

# ---------------------------------------------------------------- sampling math vs float64 NumPy


def np_processed_logps(logits, temperature, top_k, top_p):
    """Reference: top-k keeps values >= the k-th largest, top-p keeps a token while the (renormalised
    top-k) mass strictly above it is below p; -inf elsewhere."""
    x = logits.astype(np.float64) / temperature
    out = np.full_like(x, -np.inf)
    for b, row in enumerate(x):
        keep = np.ones(row.shape, bool)
        if top_k > 0:
            keep &= row >= np.sort(row)[::-1][min(top_k, row.size) - 1]
        probs = np.where(keep, np.exp(row - row.max()), 0.0)
        probs /= probs.sum()
        if top_p < 1:
            above = np.array([probs[probs > q].sum() for q in probs])
            keep &= above < top_p
        kept = np.where(keep, row, -np.inf)
        out[b] = kept - (row.max() + np.log(np.exp(kept - row.max()).sum()))
    return out


_processed_logps = jax.jit(lambda x, t, k, p: jax.nn.log_softmax(processed_logits(x, t, k, p), -1))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_processed_logps_match_numpy(temperature):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 64)) * 3).astype(np.float32)
    for top_k in (0, 1, 7, 64, 100):
        for top_p in (1.0, 0.95, 0.6, 0.2, 0.01):
            ours = np.asarray(_processed_logps(logits, temperature, top_k, top_p))
            ref = np_processed_logps(logits, temperature, top_k, top_p)
            np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), err_msg=f"k={top_k} p={top_p}")
            np.testing.assert_allclose(ours[np.isfinite(ref)], ref[np.isfinite(ref)], atol=1e-5)
            np.testing.assert_allclose(np.log(np.exp(ours).sum(-1)), 0.0, atol=1e-5)  # normalised


def test_ties_are_kept_together_wherever_they_sit():
    probs = np.array([0.4, 0.2, 0.2, 0.1, 0.1])
    cases = [  # (top_k, top_p, kept token set), worked out by hand
        (2, 1.0, {0, 1, 2}),  # the 2nd largest value is tied: both copies stay
        (4, 1.0, {0, 1, 2, 3, 4}),
        (0, 0.45, {0, 1, 2}),  # mass above each 0.2 is 0.4 < 0.45
        (0, 0.35, {0}),
        (0, 0.9, {0, 1, 2, 3, 4}),  # mass above each 0.1 is 0.8 < 0.9
        (3, 0.55, {0, 1, 2}),  # renormalised top-3 is (.5, .25, .25): mass above each .25 is .5
        (3, 0.45, {0}),
        (1, 0.2, {0}),
    ]
    for perm in (np.arange(5), np.array([3, 1, 4, 0, 2])):  # the kept set must not depend on token order
        logits = np.log(probs[perm]).astype(np.float32)[None]
        for top_k, top_p, kept in cases:
            out = np.asarray(_processed_logps(logits, 1.0, top_k, top_p))[0]
            assert {int(perm[i]) for i in np.flatnonzero(np.isfinite(out))} == kept, (top_k, top_p)


def test_top_p_one_and_top_k_zero_keep_the_far_tail():
    logits = np.array([[30.0, 0.0, -20.0, -40.0, -60.0]], np.float32)  # tail probs down to ~1e-39
    out = np.asarray(_processed_logps(logits, 1.0, 0, 1.0))
    np.testing.assert_allclose(out, np.asarray(jax.nn.log_softmax(logits)), rtol=1e-6)
    assert np.isfinite(out).all()


def test_greedy_takes_argmax_and_reports_temperature_one_logps():
    logits = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    tokens, logps = sample_tokens(jnp.asarray(logits), jax.random.key(0), 0.0, 3, 0.5)
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    ref = np_processed_logps(logits, 1.0, 0, 1.0)[np.arange(4), logits.argmax(-1)]
    np.testing.assert_allclose(logps, ref, atol=1e-6)


def test_draws_follow_the_processed_distribution():
    logits = np.random.default_rng(2).standard_normal(16).astype(np.float32) * 1.5
    temperature, top_k, top_p, n = 0.8, 10, 0.9, 20000
    batch = jnp.asarray(np.tile(logits, (n, 1)))
    tokens, logps = jax.jit(sample_tokens)(batch, jax.random.key(3), temperature, top_k, top_p)
    ref = np_processed_logps(logits[None], temperature, top_k, top_p)[0]
    tokens = np.asarray(tokens)
    assert np.isfinite(ref[tokens]).all()  # never outside the kept set
    np.testing.assert_allclose(logps, ref[tokens], atol=1e-5)
    freq = np.bincount(tokens, minlength=16) / n
    p = np.exp(ref)
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)


def test_prompt_positions_and_buckets():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(prompt_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert [prompt_bucket(n) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]


# ---------------------------------------------------------------- the model with a KV cache


@pytest.fixture(scope="module")
def samplers(tmp_path_factory):
    """family -> (HF folder, torch model, sampler), built once so every test reuses the compiled functions."""
    cache = {}

    def get(family):
        if family not in cache:
            path = str(tmp_path_factory.mktemp(family))
            hf_model = make_hf_model(family, path)
            cache[family] = path, hf_model, LocalSampler.from_hf(path, eos_token_id=EOS, pad_token_id=PAD)
        return cache[family]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def family_sampler(request, samplers):
    return (request.param, *samplers(request.param))


def _prompts(seed, lens=(5, 11, 2)):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 990, n).tolist() for n in lens]  # no EOS inside a prompt


def _full_logits(sampler, ids):
    """Our plain forward (no cache, no padding) of one sequence -> [T, V]."""
    return np.asarray(sampler.model.apply({"params": sampler.params}, jnp.asarray([ids])))[0]


def test_cached_decode_logits_equal_full_forward(family_sampler):
    family, _, _, sampler = family_sampler
    model, params = sampler.model, sampler.params
    rng = np.random.default_rng(4)
    lens, steps, p = [5, 8, 3], 6, 8
    rows = [rng.integers(0, 1024, n + steps) for n in lens]
    ids, mask = np.zeros((3, p), np.int32), np.zeros((3, p), np.int32)
    for i, (row, n) in enumerate(zip(rows, lens)):
        ids[i, p - n :], mask[i, p - n :] = row[:n], 1
    call = jax.jit(lambda x, pos, seg, c: model.apply({"params": params}, x, pos, seg, "last_logits", c))
    logits, cache = call(ids, prompt_positions(mask), mask, KVCache.empty(model.cfg, 3, p + steps))
    got = [logits[:, 0]]
    for t in range(steps - 1):
        tok = np.array([[row[n + t]] for row, n in zip(rows, lens)])
        logits, cache = call(tok, np.array(lens)[:, None] + t, np.ones_like(tok), cache)
        got.append(logits[:, 0])
    got = np.stack(got, 1)  # [B, steps, V]
    for i, (row, n) in enumerate(zip(rows, lens)):
        full = _full_logits(sampler, row)[n - 1 : n - 1 + steps]
        np.testing.assert_allclose(got[i], full, atol=1e-5, rtol=0, err_msg=family)
    assert int(cache.index) == p + steps - 1


def _hf_greedy(hf_model, prompts, eos):
    p = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (p - len(x)) + x for x in prompts])
    mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=M, eos_token_id=eos, pad_token_id=PAD
        )
    rows = []
    for row in out[:, p:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_greedy_equals_transformers_generate(family_sampler):
    family, _, hf_model, sampler = family_sampler
    prompts = _prompts(5)
    free = _hf_greedy(hf_model, prompts, eos=None)
    # Make one row stop early: pick as EOS a token of row 0 that first shows up at step >= 2.
    eos = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
    ref = _hf_greedy(hf_model, prompts, eos=eos)
    sampler.eos_token_id = eos
    try:
        out = sampler.generate(prompts, SamplingParams(max_tokens=M, temperature=0.0))
    finally:
        sampler.eos_token_id = EOS
    assert [list(c.token_ids) for c in out] == ref, family
    assert out[0].finish_reason == "stop" and out[0].token_ids[-1] == eos
    assert all(c.finish_reason == ("stop" if eos in c.token_ids else "length") for c in out)
    # Greedy log-probs are the temperature-1 scores of the same sequence.
    for c in out:
        seq = list(c.prompt_token_ids) + list(c.token_ids)
        ref_lp = np.asarray(jax.nn.log_softmax(_full_logits(sampler, seq), -1))
        n = len(c.prompt_token_ids)
        np.testing.assert_allclose(c.logps, ref_lp[np.arange(n - 1, len(seq) - 1), c.token_ids], atol=1e-4)


def _score(sampler, completion, temperature=1.0):
    """Full-forward scoring of prompt + completion, as `tulu-jax score` does, at a temperature."""
    seq = jnp.asarray([list(completion.prompt_token_ids) + list(completion.token_ids)])
    logits = sampler.model.apply({"params": sampler.params}, seq) / temperature
    n = len(completion.prompt_token_ids)
    return np.asarray(token_logps(logits[:, :-1], seq[:, 1:]))[0, n - 1 :]


@pytest.fixture
def llama(samplers):
    path, _, sampler = samplers("llama")
    return path, sampler


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logps_equal_full_forward_scores(llama, temperature):
    _, sampler = llama
    out = sampler.generate(_prompts(6), SamplingParams(max_tokens=M, temperature=temperature, seed=0))
    errs = [np.abs(np.asarray(c.logps) - _score(sampler, c, temperature)).max() for c in out]
    assert max(errs) < 1e-4, errs
    assert all(len(c.token_ids) == len(c.logps) > 0 for c in out)


def test_stop_tokens_max_tokens_and_finish_reasons(llama):
    _, sampler = llama
    prompts = _prompts(7)
    base = sampler.generate(prompts, SamplingParams(max_tokens=M, seed=1))
    row0 = base[0].token_ids
    stop = next(t for i, t in enumerate(row0) if i >= 3 and t not in row0[:i])
    out = sampler.generate(prompts, SamplingParams(max_tokens=M, seed=1, stop_token_ids=(stop,)))
    for b, c in zip(base, out):
        cut = b.token_ids.index(stop) + 1 if stop in b.token_ids else len(b.token_ids)
        assert c.token_ids == b.token_ids[:cut] and c.logps == b.logps[:cut]
        hit = c.token_ids[-1] in (stop, EOS)
        assert c.finish_reason == ("stop" if hit else "length")
        assert hit or len(c.token_ids) == M
    assert out[0].finish_reason == "stop" and out[0].token_ids[-1] == stop
    short = sampler.generate(prompts, SamplingParams(max_tokens=3, seed=1))
    assert all(len(c.token_ids) <= 3 for c in short)
    assert [c.token_ids for c in short] == [b.token_ids[:3] for b in base]  # a prefix of the longer run


def test_n_samples_prompt_major_seeded(llama):
    _, sampler = llama
    prompts = _prompts(8, lens=(4, 9))
    sp = SamplingParams(max_tokens=M, n=3, seed=5)
    out = sampler.generate(prompts, sp)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, j) for i in range(2) for j in range(3)]
    assert all(list(c.prompt_token_ids) == prompts[c.prompt_index] for c in out)
    assert len({c.token_ids for c in out}) == 6  # different samples
    again = sampler.generate(prompts, sp)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
    assert [c.logps for c in again] == [c.logps for c in out]
    other = sampler.generate(prompts, SamplingParams(max_tokens=M, n=3, seed=6))
    assert [c.token_ids for c in other] != [c.token_ids for c in out]


def test_push_weights_changes_output_and_version(llama):
    _, sampler = llama
    assert isinstance(sampler, RolloutBackend)
    prompts, sp = _prompts(9), SamplingParams(max_tokens=M, temperature=0.0)
    old_params = sampler.params
    before = sampler.generate(prompts, sp)
    assert all(c.weight_version is None for c in before)
    try:
        sampler.push_weights(jax.tree.map(lambda x: x * 1.5, old_params), "step-7")
        after = sampler.generate(prompts, sp)
    finally:
        sampler.push_weights(old_params, None)
    assert all(c.weight_version == "step-7" for c in after)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]


def test_sharded_sampler_equals_single_device(llama):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    path, single = llama
    sharded = LocalSampler.from_hf(path, make_mesh(2, 2, 2), eos_token_id=EOS, pad_token_id=PAD)
    assert sharded.params["layers"]["self_attn"]["k_kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
    prompts = _prompts(10, lens=(3, 7, 5, 12))
    for sp in (SamplingParams(max_tokens=M, temperature=0.0), SamplingParams(max_tokens=M, seed=2)):
        a, b = single.generate(prompts, sp), sharded.generate(prompts, sp)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.logps, y.logps, atol=1e-5)


# ---------------------------------------------------------------- seeds, arrays, scoring, pushes


def test_unseeded_calls_derive_their_seed_from_version_and_call_count(llama):
    _, sampler = llama
    prompts, sp = _prompts(11), SamplingParams(max_tokens=M)
    old = sampler.params
    try:
        sampler.push_weights(old, "v1")
        first, second = sampler.generate(prompts, sp), sampler.generate(prompts, sp)
        seeded = sampler.generate(prompts, SamplingParams(max_tokens=M, seed=derived_seed(0, "v1", 1)))
        sampler.push_weights(old, "v1")  # same weights and tag: the counter restarts, so do the draws
        again = sampler.generate(prompts, sp)
        sampler.push_weights(old, "v2")
        other = sampler.generate(prompts, sp)
    finally:
        sampler.push_weights(old, None)
    tokens = lambda out: [c.token_ids for c in out]  # noqa: E731
    assert tokens(first) != tokens(second)  # consecutive calls draw anew
    assert tokens(seeded) == tokens(second)  # call 1 under v1 used derived_seed(0, "v1", 1)
    assert tokens(again) == tokens(first)
    assert tokens(other) != tokens(first)
    assert len({derived_seed(0, "v1", k) for k in range(100)}) == 100
    assert all(0 <= derived_seed(b, v, k) < 2**31 for b in (0, -3) for v in (None, "x") for k in (0, 9))


def test_batch_completions_pads_by_hand():
    from tulu_jax.rollout import Completion

    cs = [
        Completion(
            prompt_index=0,
            sample_index=0,
            prompt_token_ids=(5, 6, 7),
            token_ids=(8, 9),
            logps=(-0.5, -1.5),
            finish_reason="stop",
            weight_version="w",
        ),
        Completion(
            prompt_index=1,
            sample_index=0,
            prompt_token_ids=(4,),
            token_ids=(3, 2, 1),
            logps=(-1.0, -2.0, -3.0),
            finish_reason="length",
            weight_version="w",
        ),
    ]
    b = batch_completions(cs, pad_token_id=99, width=4)
    np.testing.assert_array_equal(b.prompt_token_ids, [[5, 6, 7], [99, 99, 4]])
    np.testing.assert_array_equal(b.prompt_lengths, [3, 1])
    np.testing.assert_array_equal(b.token_ids, [[8, 9, 99, 99], [3, 2, 1, 99]])
    np.testing.assert_array_equal(b.logps, np.array([[-0.5, -1.5, 0, 0], [-1, -2, -3, 0]], np.float32))
    np.testing.assert_array_equal(b.lengths, [2, 3])
    np.testing.assert_array_equal(b.finish_reasons, [0, 1])
    assert FINISH_CODES == {"stop": 0, "length": 1}
    assert b.token_ids.dtype == b.lengths.dtype == b.finish_reasons.dtype == np.int32 and b.logps.dtype == np.float32
    assert batch_completions(cs, 99).token_ids.shape == (2, 3)  # default width: the longest completion
    with pytest.raises(ValueError, match="more than the width 2"):
        batch_completions(cs, 99, width=2)


def test_generate_batch_equals_generate(llama):
    _, sampler = llama
    prompts = _prompts(12, lens=(4, 9, 2))
    sp = SamplingParams(max_tokens=M, n=2, seed=4, stop_token_ids=(7, 11, 13, 17, 19, 23))
    ref = batch_completions(sampler.generate(prompts, sp), PAD, width=M)
    got = sampler.generate_batch(prompts, sp)
    for field in (
        "prompt_token_ids",
        "prompt_lengths",
        "token_ids",
        "lengths",
        "finish_reasons",
        "prompt_index",
        "sample_index",
    ):
        np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
        assert getattr(got, field).dtype == np.int32, field
    np.testing.assert_array_equal(got.logps, ref.logps)
    assert got.logps.dtype == np.float32 and got.token_ids.shape == (6, M) and len(got) == 6
    assert got.weight_versions == ref.weight_versions


def test_score_equals_transformers_and_sampled_logps(samplers):
    """`score` against transformers' float32 forward (log_softmax in float64), on rows of different
    lengths batched two at a time; and on sampled completions it gives back the sampling log-probs."""
    path, hf_model, _ = samplers("llama")
    sampler = LocalSampler.from_hf(path, eos_token_id=EOS, pad_token_id=PAD, max_batch=2)
    rng = np.random.default_rng(13)
    prompts = [rng.integers(2, 990, n).tolist() for n in (3, 1, 8)]
    completions = [rng.integers(2, 990, n).tolist() for n in (5, 0, 2)]
    got = sampler.score(prompts, completions)
    assert got.shape == (3, 5) and got.dtype == np.float32
    for i, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            logits = hf_model(torch.tensor([p + c])).logits[0].double()
        at = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        ref = torch.log_softmax(logits, -1)[at, torch.tensor(c, dtype=torch.long)].numpy()
        # float32 forward through 2 layers: ~1e-6 relative on logits of size ~1, summed over the vocab.
        np.testing.assert_allclose(got[i, : len(c)], ref, atol=1e-4)
        assert np.all(got[i, len(c) :] == 0)
    out = sampler.generate(_prompts(14), SamplingParams(max_tokens=M, temperature=0.7, seed=3))
    scored = sampler.score([c.prompt_token_ids for c in out], [c.token_ids for c in out], temperature=0.7)
    for i, c in enumerate(out):
        np.testing.assert_allclose(scored[i, : len(c.logps)], c.logps, atol=1e-4)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        sampler.score(prompts[:2], completions[:1])
    with pytest.raises(ValueError, match="at least one token"):
        sampler.score([[]], [[1]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pushed_weights_are_a_cast_copy_that_survives_a_donated_train_step(samplers, dtype):
    """The trainer pushes its float32 state.params, then donates them to the next step (which deletes the
    buffers): the sampler must hold its own copy, in its compute dtype, and keep generating the same."""
    import optax

    from tulu_jax.models import hf
    from tulu_jax.models.loading import load_params
    from tulu_jax.train.state import create_state, state_layout

    path, _, _ = samplers("llama")
    mesh = make_mesh(devices=jax.devices()[:1])
    cfg = hf.load_hf_config(path)
    train_model = build_model(cfg)  # float32 compute and masters
    tx = optax.sgd(0.1)
    _, shardings = state_layout(train_model, tx, mesh)
    state = create_state(load_params(path, train_model, mesh), tx, 0, shardings)
    # np.array copies: a zero-copy view (device_get on CPU) would pin the buffers and block the donation.
    masters = jax.tree.map(np.array, state.params)

    sampler = LocalSampler(build_model(cfg, dtype=dtype), state.params, mesh, eos_token_id=EOS, pad_token_id=PAD)
    prompts, sp = _prompts(15), SamplingParams(max_tokens=M, temperature=0.0)
    before = sampler.generate(prompts, sp)
    sampler.push_weights(state.params, "step-1")
    for ours, theirs in zip(jax.tree.leaves(sampler.params), jax.tree.leaves(state.params)):
        assert ours.dtype == jnp.dtype(dtype) and theirs.dtype == jnp.float32
        assert ours.unsafe_buffer_pointer() != theirs.unsafe_buffer_pointer()
    for ours, master in zip(jax.tree.leaves(sampler.params), jax.tree.leaves(masters)):
        np.testing.assert_array_equal(np.asarray(ours), master.astype(ours.dtype))  # a plain cast

    step = jax.jit(
        lambda s: s.replace(params=jax.tree.map(lambda x: x * 0.5, s.params), step=s.step + 1), donate_argnums=0
    )
    old_leaves = jax.tree.leaves(state.params)
    state = step(state)
    assert all(x.is_deleted() for x in old_leaves), "the step must really donate, or this test proves nothing"
    after = sampler.generate(prompts, sp)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]
    assert [c.logps for c in after] == [c.logps for c in before]
    assert all(c.weight_version == "step-1" for c in after)
