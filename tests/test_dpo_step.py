"""The DPO train step (tulu_jax/train/dpo_step.py): a sharded step gives the single-device numbers, gradient
accumulation gives the full-batch numbers, cached reference log-probs give the live reference's numbers,
the loss and metrics match a float64 NumPy reading of Tülu 3's dpo_norm formula on top of transformers'
log-probs, and the held-out eval sums skip filler rows. Needs 8 host devices (conftest sets XLA_FLAGS).

Policy and reference are two tiny random Hugging Face Llamas (different seeds) loaded into our decoder; the
batch is 8 real pairs of the bundled tiny_prefs eval split, some with chosen and rejected of different
lengths and one cut at max_seq_len. Every step uses plain SGD at lr 1, so old - new parameters is exactly
the gradient. Compiles dominate the run time, so compiled steps are shared between tests.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hf_models import make_hf_model

from tulu_jax import sharding as shd
from tulu_jax.config import DEFAULT_BETA
from tulu_jax.data import load_tokenizer
from tulu_jax.data.preference import PreferenceDataConfig, PreferencePipeline, bundled_prefs_file
from tulu_jax.models import hf
from tulu_jax.models.loading import build_model, load_params
from tulu_jax.sharding import make_mesh
from tulu_jax.train.batches import TOKEN_KEYS
from tulu_jax.train.dpo_step import LossParams, dpo_step, jit_dpo_step, jit_eval_sums, jit_pair_logps
from tulu_jax.train.state import TrainState, state_layout

SEQ = 48
DPO_NORM = LossParams("dpo_norm", DEFAULT_BETA["dpo_norm"])  # Tülu 3: length-normalized, β 5
# Pairs of the eval split: 17 has its rejected side cut at SEQ; 17, 22, 48, 58 and 75 have chosen and
# rejected replies of different lengths (so a length mix-up in dpo_norm would show).
PAIR_IDS = [0, 17, 22, 48, 58, 75, 5, 1]
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracy",
    "rewards/margin",
    "rewards/average",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "trained_tokens",
)


def _mesh(shape):
    n = int(np.prod(shape))
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return make_mesh(*shape, devices=jax.devices()[:n])


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def _torch_logps(model, batch) -> np.ndarray:
    """[B, 2] summed log-probs of the labelled tokens, computed by transformers in float32."""
    b, _, t = batch["input_ids"].shape
    ids = torch.from_numpy(batch["input_ids"].reshape(2 * b, t)).long()
    mask = torch.from_numpy(batch["loss_mask"].reshape(2 * b, t)).float()
    attn = torch.from_numpy(batch["segment_ids"].reshape(2 * b, t) > 0).long()
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * mask[:, 1:]).sum(-1).reshape(b, 2)


def _spec_dpo_norm(pol, ref, counts, beta=5.0):
    """Per-pair dpo_norm loss and metrics in float64, straight from the formula (Tülu 3 §5)."""
    pol, ref, counts = (np.asarray(x, np.float64) for x in (pol, ref, counts))
    avg_pol, avg_ref = pol / counts, ref / counts
    rc, rr = beta * (avg_pol[:, 0] - avg_ref[:, 0]), beta * (avg_pol[:, 1] - avg_ref[:, 1])
    z = rc - rr
    return {
        "loss": np.logaddexp(0.0, -z),  # -log sigmoid(beta * (chosen ratio - rejected ratio))
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracy": (rc > rr).astype(np.float64),
        "rewards/margin": rc - rr,
        "logps/chosen": avg_pol[:, 0],
        "logps/rejected": avg_pol[:, 1],
    }


class Env:
    """Policy and reference parameters on the host, the batch, and a cache of compiled steps."""

    def __init__(self, tmp):
        self.hf_policy = make_hf_model("llama", str(tmp / "policy"), seed=0)
        self.hf_ref = make_hf_model("llama", str(tmp / "ref"), seed=1)
        self.cfg = hf.load_hf_config(str(tmp / "policy"))
        self.model = build_model(self.cfg)
        self.mesh1 = _mesh((1, 1, 1))
        self.policy = jax.device_get(load_params(str(tmp / "policy"), self.model, self.mesh1))
        self.ref = jax.device_get(load_params(str(tmp / "ref"), self.model, self.mesh1))

        tok = load_tokenizer(None)
        data_cfg = PreferenceDataConfig(max_seq_len=SEQ)
        pipe = PreferencePipeline(
            data_cfg,
            tok,
            batch_size=8,
            seed=0,
            num_epochs=1,
            files=(bundled_prefs_file("eval"),),
            process_index=0,
            process_count=1,
        )
        everything = next(pipe.ordered_batches(len(pipe)))
        self.pairs = {k: everything[k][PAIR_IDS] for k in TOKEN_KEYS}
        self.spare = {k: everything[k][[101, 102]] for k in TOKEN_KEYS}  # other pairs, for filler rows
        self.counts = self.pairs["loss_mask"][:, :, 1:].sum(-1).astype(np.float64)
        assert (self.counts[:, 0] != self.counts[:, 1]).sum() >= 4 and self.pairs["segment_ids"][1, 1].all()

        self.param_shardings1 = state_layout(self.model, optax.sgd(1.0), self.mesh1)[1].params
        logps_fn = jit_pair_logps(self.model, self.mesh1, self.param_shardings1)
        ref_logps, counts = jax.device_get(logps_fn(self.ref, self.pairs))
        np.testing.assert_array_equal(counts, self.counts)
        self.ref_logps = np.asarray(ref_logps, np.float32)  # the cached reference
        self.policy_logps = np.asarray(jax.device_get(logps_fn(self.policy, self.pairs)[0]))
        self._steps = {}

    def cached_batch(self, ref_logps=None):
        return {**self.pairs, "ref_logps": self.ref_logps if ref_logps is None else ref_logps}

    def step(self, mesh_shape=(1, 1, 1), *, live=False, accum=1, batch=None, logits_chunk=0):
        """(metrics, gradients, new params) of one jit_dpo_step (dpo_norm, SGD at lr 1) on this mesh."""
        key = (mesh_shape, live, accum, logits_chunk)
        if key not in self._steps:
            mesh = _mesh(mesh_shape)
            tx = optax.sgd(1.0)
            _, shardings = state_layout(self.model, tx, mesh)
            fn = jit_dpo_step(
                self.model,
                tx,
                optax.constant_schedule(1.0),
                mesh,
                shardings,
                cfg=DPO_NORM,
                accum_steps=accum,
                live=live,
                logits_chunk=logits_chunk,
            )
            self._steps[key] = (fn, tx, shardings)
        fn, tx, shardings = self._steps[key]
        params = jax.device_put(self.policy, shardings.params)
        state = TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jnp.zeros(2, jnp.uint32)
        )
        state = jax.device_put(state, shardings)
        if live:
            new, metrics = fn(state, dict(self.pairs), jax.device_put(self.ref, shardings.params))
        else:
            new, metrics = fn(state, self.cached_batch() if batch is None else batch)
        new_params = _host(new.params)
        grads = jax.tree.map(lambda a, b: a - b, _host(self.policy), new_params)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}, grads, new_params


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Env(tmp_path_factory.mktemp("dpo_models"))


@pytest.fixture(scope="module")
def single(env):
    return {live: env.step(live=live) for live in (False, True)}


def _max_metric_diff(m, ref):
    return max(abs(m[k] - ref[k]) / max(abs(ref[k]), 1e-3) for k in METRICS)


def _grad_diff(g, ref):
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref))
    return max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref))) / scale


def _metric_atol(k: str, m_ref: dict, scale_pairs: float = 1.0) -> float:
    """Absolute float32 error allowed on metric `k`: rewards and margins are β-scaled *differences* of
    per-token log-probs (|β·logp| ~ 35 here), so a mean reward near 0 carries the rounding of its inputs'
    magnitude, not of its own. 16 ulps of that magnitude (times `scale_pairs` for sums over pairs)."""
    logp_scale = max(abs(m_ref["logps/chosen"]), abs(m_ref["logps/rejected"]))
    scale = DPO_NORM.beta * logp_scale if k.startswith("rewards/") else max(abs(m_ref[k]), logp_scale)
    return 16 * float(np.finfo(np.float32).eps) * scale * scale_pairs


def _assert_same(got, want, tol):
    (m, g, _), (m_ref, g_ref, _) = got, want
    assert set(m) == set(m_ref) >= set(METRICS)
    for k in METRICS:
        np.testing.assert_allclose(m[k], m_ref[k], rtol=tol, atol=_metric_atol(k, m_ref), err_msg=k)
    assert _grad_diff(g, g_ref) < tol


def test_batch_and_reference_are_nontrivial(env, single):
    # The reference differs from the policy, so the loss is not ln 2 and the gradient is not zero.
    assert np.abs(env.ref_logps - env.policy_logps).min() > 0.05
    for live in (False, True):
        m, g, _ = single[live]
        assert abs(m["loss"] - np.log(2)) > 0.05 and m["grad_norm"] > 1e-3
        assert m["trained_tokens"] == env.counts.sum()
        assert 0 < m["rewards/accuracy"] < 1
        # SGD at lr 1: the update is the gradient, so its norm is the reported grad_norm.
        np.testing.assert_allclose(np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g))), m["grad_norm"], rtol=1e-5)
    # The cached reference log-probs are the live reference's, so both single-device steps agree.
    _assert_same(single[True], single[False], 1e-6)


@pytest.mark.parametrize(
    "mesh_shape,live,logits_chunk",
    [((2, 2, 2), False, 0), ((2, 2, 2), True, 0), ((1, 8, 1), False, 0), ((2, 2, 2), True, 20)],
)
def test_sharded_step_equals_single_device(env, single, mesh_shape, live, logits_chunk):
    """Sharded = single device; the chunked LM head (20 positions: not a divisor of the length) too."""
    got = env.step(mesh_shape, live=live, logits_chunk=logits_chunk)
    print(
        f"mesh {mesh_shape} live={live}: metrics max rel diff {_max_metric_diff(got[0], single[live][0]):.2e}, "
        f"grads max abs diff / max |grad| {_grad_diff(got[1], single[live][1]):.2e}"
    )
    _assert_same(got, single[live], 1e-5)


@pytest.mark.parametrize("accum,mesh_shape,live", [(2, (2, 2, 2), False), (4, (1, 1, 1), True)])
def test_accumulation_equals_full_batch(env, single, accum, mesh_shape, live):
    got = env.step(mesh_shape, live=live, accum=accum)
    print(
        f"accum {accum} mesh {mesh_shape} live={live}: metrics max rel diff "
        f"{_max_metric_diff(got[0], single[live][0]):.2e}, grads {_grad_diff(got[1], single[live][1]):.2e}"
    )
    _assert_same(got, single[live], 1e-5)


@pytest.fixture(scope="module")
def other_losses(env):
    """One step of every other loss with the cached and the live reference, compiled as one program on one
    device (a compile per loss and reference would double this file's run time)."""
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    other_ref = env.ref_logps + np.float32(25.0) * np.array([[1.0, -1.0]], np.float32)

    def run(state, batch, ref_params, other_ref):
        pairs = {k: batch[k] for k in TOKEN_KEYS}
        out = {}
        for loss in ("dpo", "ipo", "wpo", "simpo"):
            step = functools.partial(
                dpo_step,
                model=env.model,
                tx=tx,
                schedule=schedule,
                cfg=LossParams(loss, DEFAULT_BETA[loss]),
                accum_steps=1,
            )
            out[loss] = {"cached": step(state, batch), "live": step(state, pairs, ref_params)}
            if loss == "simpo":
                out[loss]["other_ref"] = step(state, {**pairs, "ref_logps": other_ref})
        return out

    params = jax.tree.map(jnp.asarray, env.policy)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jnp.zeros(2, jnp.uint32)
    )
    with jax.set_mesh(env.mesh1), nn.logical_axis_rules(shd.LOGICAL_RULES):
        res = jax.jit(run)(state, env.cached_batch(), env.ref, other_ref)
    res = jax.device_get(res)
    out = {}
    for loss, runs in res.items():
        out[loss] = {}
        for name, (new, metrics) in runs.items():
            new_params = _host(new.params)
            grads = jax.tree.map(lambda a, b: a - b, _host(env.policy), new_params)
            out[loss][name] = ({k: float(v) for k, v in metrics.items()}, grads, new_params)
    return out


def _params_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("loss", ["dpo", "dpo_norm", "ipo", "wpo"])
def test_cached_reference_equals_live(env, single, other_losses, loss):
    cached, live = (
        (single[False], single[True])
        if loss == "dpo_norm"
        else (
            other_losses[loss]["cached"],
            other_losses[loss]["live"],
        )
    )
    print(
        f"{loss}: cached vs live metrics max rel diff {_max_metric_diff(cached[0], live[0]):.2e}, grads "
        f"{_grad_diff(cached[1], live[1]):.2e}, params max abs diff {_params_diff(cached[2], live[2]):.2e}"
    )
    _assert_same(cached, live, 1e-6)
    assert _params_diff(cached[2], live[2]) < 1e-6
    # The step ran the loss asked for: every loss gives its own value on this batch.
    losses = {name: runs["cached"][0]["loss"] for name, runs in other_losses.items()}
    losses["dpo_norm"] = single[False][0]["loss"]
    assert len({round(v, 6) for v in losses.values()}) == len(losses)
    # WPO's weight exp(mean log-prob chosen + rejected) is ~1e-6 for a random model: a tiny gradient.
    assert cached[0]["grad_norm"] > (1e-8 if loss == "wpo" else 1e-3)


def test_simpo_ignores_the_reference(other_losses):
    runs = other_losses["simpo"]
    for name in ("other_ref", "live"):
        assert runs[name][0] == runs["cached"][0], name
        for a, b in zip(jax.tree.leaves(runs[name][2]), jax.tree.leaves(runs["cached"][2])):
            np.testing.assert_array_equal(a, b)
    assert runs["cached"][0]["grad_norm"] > 1e-4


def _torch_to_ours(env, torch_grads: dict) -> dict:
    """Hugging Face-named tensors -> our parameter tree (layer tensors stacked)."""
    out = {}
    for path, rule in hf.param_rules(env.cfg).items():
        if "{i}" in rule.hf_name:
            value = np.stack(
                [rule.to_ours(torch_grads[rule.hf_name.format(i=i)], env.cfg) for i in range(env.cfg.num_layers)]
            )
        else:
            value = rule.to_ours(torch_grads[rule.hf_name], env.cfg)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def test_matches_transformers_and_spec(env):
    """dpo_norm on log-probs from transformers, in float64 from the formula; the reference is a second
    HF model with other weights whose log-probs come in as the cache."""
    with torch.no_grad():
        ref = _torch_logps(env.hf_ref, env.pairs).double().numpy()
    params = dict(env.hf_policy.named_parameters())
    for p in params.values():
        p.grad = None
    pol = _torch_logps(env.hf_policy, env.pairs).double()
    counts = torch.from_numpy(env.counts)
    beta = DPO_NORM.beta
    z = beta * (
        (pol[:, 0] - torch.from_numpy(ref[:, 0])) / counts[:, 0]
        - (pol[:, 1] - torch.from_numpy(ref[:, 1])) / counts[:, 1]
    )
    torch.nn.functional.softplus(-z).mean().backward()
    torch_grads = _torch_to_ours(env, {k: p.grad.double().numpy() for k, p in params.items()})

    spec = _spec_dpo_norm(pol.detach().numpy(), ref, env.counts, beta)
    metrics, grads, _ = env.step(batch=env.cached_batch(ref.astype(np.float32)))
    expected = {k: float(v.mean()) for k, v in spec.items()}
    expected["rewards/average"] = (expected["rewards/chosen"] + expected["rewards/rejected"]) / 2
    diffs = {k: abs(metrics[k] - v) / max(abs(v), 1e-3) for k, v in expected.items()}
    print(
        f"vs transformers+spec: metric rel diffs {', '.join(f'{k} {d:.1e}' for k, d in diffs.items())}; grads "
        f"{_grad_diff(grads, torch_grads):.2e}"
    )
    assert 0.05 < abs(expected["loss"] - np.log(2)) and 0 < expected["rewards/accuracy"] < 1
    for k, v in expected.items():
        # Relative to the size of the per-pair terms: a mean reward near 0 is a difference of larger numbers.
        scale = max(abs(v), float(np.abs(spec.get(k, spec["rewards/chosen"])).max()))
        np.testing.assert_allclose(metrics[k], v, rtol=0, atol=1e-5 * scale, err_msg=k)
    assert metrics["trained_tokens"] == env.counts.sum()
    assert jax.tree.structure(grads) == jax.tree.structure(torch_grads)
    assert _grad_diff(grads, torch_grads) < 1e-5


def test_eval_sums_skip_filler_rows_and_match_step_metrics(env, single):
    eval_fn = jit_eval_sums(env.model, env.mesh1, env.param_shardings1, DPO_NORM)
    n = len(PAIR_IDS)

    def sums(batch, valid):
        out = eval_fn(env.policy, {**batch, "valid": np.asarray(valid, np.int32)})
        return {k: float(v) for k, v in jax.device_get(out).items()}

    # All rows real: the sums over the pairs are the train step's means (taken before its update) times n.
    full = sums(env.cached_batch(), np.ones(n))
    step_metrics = single[False][0]
    assert full["pairs"] == n
    for k in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "rewards/margin",
        "logps/chosen",
        "logps/rejected",
    ):
        atol = _metric_atol(k, step_metrics)
        np.testing.assert_allclose(full[k] / n, step_metrics[k], rtol=1e-6, atol=atol, err_msg=k)

    # The last two rows are filler: copies of pair 0 (as ordered_batches fills), or other pairs with
    # other reference log-probs. Neither changes the sums, which are those of the six real pairs.
    valid = np.array([1] * (n - 2) + [0, 0])
    copies = env.cached_batch()
    copies = {k: np.concatenate([v[: n - 2], v[:1], v[:1]]) for k, v in copies.items()}
    others = env.cached_batch()
    others = {k: np.concatenate([v[: n - 2], env.spare[k]]) if k in env.spare else v.copy() for k, v in others.items()}
    others["ref_logps"][n - 2 :] += 40.0
    a, b = sums(copies, valid), sums(others, valid)
    assert a == b
    spec = _spec_dpo_norm(env.policy_logps, env.ref_logps, env.counts)
    real = valid.astype(bool)
    expected = {k: float(v[real].sum()) for k, v in spec.items()}
    avg = env.policy_logps / env.counts
    expected["policy_accuracy"] = float((avg[real, 0] > avg[real, 1]).sum())
    expected["pairs"] = n - 2
    assert set(a) == set(expected)
    for k, v in expected.items():
        atol = _metric_atol(k, step_metrics, scale_pairs=n) if k in step_metrics else 0.0
        np.testing.assert_allclose(a[k], v, rtol=1e-5, atol=atol, err_msg=k)
    assert a["loss"] != full["loss"]  # the filler rows would have counted
