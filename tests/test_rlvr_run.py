"""Tiny RLVR runs (Tülu 3 §6; open-instruct `ppo_vllm_thread_ray_gtrl.py`, `grpo_fast.py`): logged metrics and
the non-EOS penalty, SIGKILL resume, the frozen reference, GRPO dynamic sampling, sharded = data-parallel, and one
PPO update against a float64 NumPy reference. A random tiny policy (model.preset=tiny) needs no earlier stage."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tulu_jax import configlib
from tulu_jax.config import RLVRConfig
from tulu_jax.rewards.verdict import Verdict
from tulu_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
EPS32 = float(np.finfo(np.float32).eps)
TINY = [
    "model.path=null",
    "model.preset=tiny",
    "value.init=policy",
    "value.path=null",
    "train.batch_size=8",
    "train.eval_every=-1",
    "rollout.max_tokens=8",
]
PPO_STEPS = 4
PPO_ARGS = [*TINY, f"train.max_steps={PPO_STEPS}", "checkpoint.every_steps=1", "checkpoint.keep=8", "ppo.epochs=2"]
REFERENCE_NAMES = (
    "objective/verifiable_correct_rate",
    "val/stop_token_rate",
    "val/sequence_lengths",
    "objective/kl",
    "objective/kl2",
    "objective/kl3",
    "objective/scores",
    "objective/rlhf_reward",
    "objective/non_score_reward",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "val/ratio",
    "val/ratio_var",
)


def _cfg(path, out, *overrides):
    return configlib.load_config(RLVRConfig, str(REPO / path), [f"output_dir={out}", *overrides])


def _rows(out) -> dict[int, dict]:
    """metrics.jsonl by step (a resumed run's later row for a step wins)."""
    return read_metrics(str(out))


def _deterministic(row: dict) -> dict:
    """A metrics row without the wall-clock figures."""
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"}


class FakeScorer:
    """Stands in for the verifier pool: `rule(text) -> score in {0, 1}`; records every call's scores."""

    def __init__(self, rule):
        self.rule, self.calls = rule, []

    def score(self, items):
        scores = [float(self.rule(i.response)) for i in items]
        self.calls.append(scores)
        return [Verdict(score=s, verifier=i.dataset, status="ok") for s, i in zip(scores, items)]

    def close(self):
        pass


def _parity(text: str) -> bool:
    return len(text) % 2 == 0


# ---------------------------------------------------------------- a tiny PPO run (8 devices, mesh 8x1x1)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    from tulu_jax.train.rlvr import run_rlvr

    out = tmp_path_factory.mktemp("ppo")
    summary = run_rlvr(_cfg("configs/rlvr/tiny.yaml", out, *PPO_ARGS))
    return out, summary


def test_ppo_metrics_have_the_reference_names_and_are_finite(ppo_run):
    out, summary = ppo_run
    rows = _rows(out)
    assert sorted(rows) == list(range(1, PPO_STEPS + 1))
    for step, row in rows.items():
        missing = [k for k in REFERENCE_NAMES if k not in row]
        assert not missing, (step, missing)
        phases = [k for k in row if k.startswith("time/")]
        assert {"time/generate_s", "time/forward_s", "time/update_s", "time/step_s"} <= set(phases), phases
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not np.isfinite(v)}
        assert not bad, (step, bad)
        assert row["episodes"] == step * 8
        # The first of 2 epochs has ratio 1; the mean over both stays near it.
        assert 0 <= row["policy/clipfrac_avg"] <= 1 and 0 <= row["val/clipfrac_avg"] <= 1
        assert row["objective/kl2"] >= 0 and row["objective/kl3"] >= 0
        np.testing.assert_allclose(
            row["objective/rlhf_reward"], row["objective/scores"] + row["objective/non_score_reward"], rtol=1e-6
        )
        np.testing.assert_allclose(row["objective/non_score_reward"], -0.05 * row["objective/kl"], rtol=1e-5, atol=1e-7)
    assert rows[1]["objective/kl"] == 0.0  # step 1 samples from the starting policy, which is the reference
    assert (out / "hf" / "config.json").exists() and (out / "hf" / "model.safetensors").exists()
    assert summary["final_step"] == PPO_STEPS


def test_non_eos_penalty_replaces_every_score(ppo_run):
    """tiny.yaml: verify_reward 10, non_stop_penalty -10. A response cut at max_tokens scores exactly -10,
    whatever its verifier said; a stopped one scores 0 or 10."""
    rows = _rows(ppo_run[0])
    for step, row in rows.items():
        stop = row["val/stop_token_rate"]
        if stop == 0:
            assert row["objective/scores"] == -10.0, (step, row)
        lo, hi = -10 * (1 - stop), -10 * (1 - stop) + 10 * stop
        assert lo - 1e-5 <= row["objective/scores"] <= hi + 1e-5, (step, row)
    assert any(r["val/stop_token_rate"] == 0 for r in rows.values()), "no step without EOS: nothing checked"


# ---------------------------------------------------------------- SIGKILL resume


def test_sigkill_after_step_2_then_resume_logs_the_same_metrics(ppo_run, tmp_path):
    """A run killed once its step-2 checkpoint exists, started again, logs steps 3..4 exactly as the run that
    was never killed (same 8 host devices; only the wall-clock figures differ)."""
    from tulu_jax.train.rlvr import run_rlvr

    full_out, _ = ppo_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tulu_jax.cli", "rlvr", "--config", str(REPO / "configs/rlvr/tiny.yaml")]
    cmd += [f"output_dir={out}", *PPO_ARGS]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while not (out / "checkpoints" / "2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert alive, f"the run ended before it could be killed: {err[-3000:]}"
    assert not (out / "hf").exists()
    run_rlvr(_cfg("configs/rlvr/tiny.yaml", out, *PPO_ARGS))
    full, resumed = _rows(full_out), _rows(out)
    assert sorted(resumed) == list(range(1, PPO_STEPS + 1))
    for step in (3, 4):
        assert _deterministic(resumed[step]) == _deterministic(full[step]), step


# ---------------------------------------------------------------- sharded = data-parallel


def test_mesh_2x2x2_step_1_equals_8x1x1(ppo_run, tmp_path):
    """Step 1 under data=2, fsdp=2, tensor=2 vs the 8-way data-parallel run: same samples (the same weights
    and seed), and the same losses and statistics up to float32 reduction order."""
    from tulu_jax.train.rlvr import run_rlvr

    args = [a for a in PPO_ARGS if not a.startswith("train.max_steps")]
    run_rlvr(
        _cfg(
            "configs/rlvr/tiny.yaml",
            tmp_path,
            *args,
            "train.max_steps=1",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
        )
    )
    a, b = _deterministic(_rows(tmp_path)[1]), _deterministic(_rows(ppo_run[0])[1])
    assert a.keys() == b.keys()
    # Sampled tokens and verifier outcomes are discrete: they must agree exactly.
    for k in ("val/sequence_lengths", "val/stop_token_rate", "objective/scores", "objective/verifiable_correct_rate"):
        assert a[k] == b[k], k
    # Every other figure is a float32 reduction over at most 8 x 8 tokens x a 3.7M-parameter model; values of
    # order 1-100: a relative 1e-4 (thousands of ulps) with an absolute floor for figures near 0.
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5 * max(1.0, abs(b[k])) + 1e-6, err_msg=k)


# ---------------------------------------------------------------- GRPO dynamic sampling


def test_grpo_dynamic_sampling_drops_constant_groups_and_refills(tmp_path, monkeypatch):
    """Step 1: every response scores 0 -> every group constant -> all dropped after 2 refills, and the step
    takes no optimizer update (an AdamW step on zero advantages would still move the weights by weight decay).
    Step 2: scores by response parity -> the logged
    drop share and refill count follow from the scores the verifier gave."""
    import tulu_jax.train.rlvr as rlvr

    scorer = FakeScorer(lambda text: len(scorer.calls) >= 3 and _parity(text))
    monkeypatch.setattr(rlvr, "Scorer", lambda: scorer)
    args = [*TINY, "rollout.n=2", "grpo.dynamic_sampling=true", "grpo.max_refills=2"]
    args += ["train.max_steps=2", "checkpoint.every_steps=0", "grpo.non_stop_penalty=null"]
    rlvr.run_rlvr(_cfg("configs/rlvr/grpo_tiny.yaml", tmp_path, *args))
    rows = _rows(tmp_path)
    assert sorted(rows) == [1, 2]
    assert rows[1]["rollout/dropped_groups_share"] == 1.0 and rows[1]["rollout/refill_batches"] == 2.0
    assert rows[1]["rollout/kept_groups"] == 0.0 and rows[1]["rollout/update_skipped"] == 1.0
    assert "loss/policy_avg" not in rows[1] and rows[2]["rollout/update_skipped"] == 0.0
    assert rows[1]["objective/scores"] == 0.0
    # Step 2 from the recorded verdicts: groups are consecutive pairs; stop at 4 kept groups or 2 refills.
    calls, kept, dropped = scorer.calls[3:], 0, 0
    used = 0
    for scores in calls:
        used += 1
        spread = [a != b for a, b in zip(scores[::2], scores[1::2])]
        kept += sum(spread)
        dropped += len(spread) - sum(spread)
        if kept >= 8 or used == 3:
            break
    assert rows[2]["rollout/refill_batches"] == used - 1
    assert rows[2]["rollout/dropped_groups_share"] == pytest.approx(dropped / (8 * used), abs=1e-12)
    for row in rows.values():
        assert all(np.isfinite(v) for v in row.values() if isinstance(v, float)), row
        assert row["episodes"] == row["step"] * 16


def _stub_rollout(index, scores, lengths, width=3):
    """A hand-made Rollout of prompts 2 x n=2 rows: prompt-major, responses of `lengths` out of T = width
    (a row that fills T did not stop), verifier `scores` already in its Future."""
    from concurrent.futures import Future

    from tulu_jax.data.prompts import Prompt
    from tulu_jax.rollout.types import FINISH_LENGTH, FINISH_STOP, RolloutBatch
    from tulu_jax.train.rollouts import Rollout

    lengths = np.array(lengths, np.int32)
    batch = RolloutBatch(
        prompt_token_ids=np.full((4, 2), 5, np.int32),
        prompt_lengths=np.full(4, 2, np.int32),
        token_ids=np.full((4, width), 7, np.int32),
        logps=np.full((4, width), -1.0, np.float32),
        lengths=lengths,
        finish_reasons=np.where(lengths < width, FINISH_STOP, FINISH_LENGTH).astype(np.int32),
        prompt_index=np.array([0, 0, 1, 1], np.int32),
        sample_index=np.array([0, 1, 0, 1], np.int32),
        weight_versions=["0"] * 4,
    )
    verdicts = Future()
    verdicts.set_result(([Verdict(score=float(x), verifier="gsm8k", status="ok") for x in scores], 0.0))
    prompts = [Prompt((5, 5), "1", "gsm8k", f"p.jsonl line {i}") for i in (1, 2)]
    timings = {"generate_s": 0.0, "push_s": 0.0, "new_tokens": float(lengths.sum())}
    return Rollout(index, prompts, batch, ["x"] * 4, {"draw": index}, timings, verdicts)


def test_dynamic_sampling_judges_groups_by_the_scores_the_advantages_use():
    """With grpo.non_stop_penalty set, the advantages see the penalised scores. A group whose responses both
    ran out of tokens scores (-10, -10) whatever the verifier said: no signal, so it must be dropped and
    refilled; (0 stopped, 0 not stopped) becomes (0, -10): a spread, kept."""
    from types import SimpleNamespace

    from tulu_jax.train.rlvr import gather_rollouts

    cfg = _cfg(
        "configs/rlvr/grpo_tiny.yaml",
        "unused",
        "rollout.n=2",
        "train.batch_size=2",
        "grpo.non_stop_penalty=-10",
        "grpo.max_refills=2",
    )
    rl = SimpleNamespace(cfg=cfg, ppo=False, shapes=SimpleNamespace(width=2), pad=0)
    # Batch 1: raw spreads (1, 0) in both groups, but no response stopped -> both groups constant at -10.
    first = _stub_rollout(1, [1, 0, 0, 1], [3, 3, 3, 3])
    # Refills: group 0 stopped/not stopped with equal raw scores -> (10, -10); group 1 constant again.
    extra = iter([_stub_rollout(2, [1, 1, 0, 0], [2, 3, 3, 3]), _stub_rollout(3, [0, 0, 1, 0], [1, 3, 3, 3])])
    source = SimpleNamespace(extra=lambda: next(extra, None))
    episodes, scores, metrics, last = gather_rollouts(rl, source, first, learner_version=0)
    assert metrics["rollout/refill_batches"] == 2.0
    assert metrics["rollout/dropped_groups_share"] == pytest.approx(4 / 6)
    assert last.data_state == {"draw": 3}
    assert episodes["lengths"].shape == (4,) and scores.shape == (4,)
    np.testing.assert_array_equal(episodes["lengths"][:4], [2, 3, 1, 3])  # the two kept groups, in order


# ---------------------------------------------------------------- one step by hand: reference and float64 PPO


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """An RLVRRun stepped twice by hand as run_rlvr does (1 epoch, 1 minibatch; no non-stop penalty; scores by
    response parity so advantages have a spread; per-response aggregation so the whitened advantages do not
    cancel in the policy loss). Records host copies around step 1, and step 2's inputs, targets and metrics."""
    from tulu_jax.rollout.types import SamplingParams
    from tulu_jax.train import batches
    from tulu_jax.train.episodes import SEQUENCE_KEYS
    from tulu_jax.train.rlvr import RLVRRun, gather_rollouts, train_step
    from tulu_jax.train.rollouts import RolloutSource

    out = tmp_path_factory.mktemp("steps")
    args = [*TINY, "train.max_steps=2", "ppo.epochs=1", "ppo.minibatches=1", "ppo.non_stop_penalty=null"]
    args += ["ppo.aggregation=sequence", "ppo.beta=0.5", "optim.lr=1e-3", "rollout.max_tokens=12"]
    cfg = _cfg("configs/rlvr/tiny.yaml", out, *args)
    rl = RLVRRun(cfg)
    states = rl.fresh_states()
    ref_params = rl.run.load_or_init(cfg.model.path, dtype=rl.model.dtype)
    backend, _ = rl.make_backend(states["policy"].params)
    sampling = SamplingParams(max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature, n=1)
    source = RolloutSource(
        backend=backend,
        pipeline=rl.pipeline,
        data_iter=rl.pipeline.iterator(),
        tokenizer=rl.tokenizer,
        scorer=FakeScorer(_parity),
        sampling=sampling,
        seed=int(states["rollout_seed"]),
        async_steps=0,
        snapshot=backend.snapshot,
    )
    rec = {"ref_before": jax.device_get(ref_params), "policy_before": jax.device_get(states["policy"].params)}
    try:
        source.publish(states["policy"].params, 0)
        rollout, waited = source.get()
        states, _, _, _ = train_step(rl, states, ref_params, source, rollout, waited, 1)
        rec["ref_after"] = jax.device_get(ref_params)
        rec["policy_after"] = jax.device_get(states["policy"].params)
        source.publish(states["policy"].params, 1)
        rollout, waited = source.get()
        episodes, scores, _, _ = gather_rollouts(rl, source, rollout, learner_version=1)
        seq = batches.to_device(episodes, rl.mesh, SEQUENCE_KEYS)
        rec["logps"] = np.asarray(rl.logps_fn(states["policy"].params, seq))
        rec["ref_logps"] = np.asarray(rl.logps_fn(ref_params, seq))
        rec["values"] = np.asarray(rl.values_fn(states["value"].params, seq))
        rec.update(scores=scores, lengths=episodes["lengths"], stopped=episodes["stopped"])
        arrays, _ = rl.advantages_fn(
            rec["logps"], rec["ref_logps"], rec["values"], scores, episodes["lengths"], episodes["stopped"]
        )
        rec["arrays"] = {k: np.asarray(v) for k, v in arrays.items()}
        _, metrics, _, _ = train_step(rl, states, ref_params, source, rollout, waited, 2)
        rec["metrics"] = {k: float(v) for k, v in metrics.items()}
    finally:
        source.close()
    rec["cfg"] = cfg.ppo
    return rec


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_update_leaves_the_reference_unchanged(two_steps):
    assert _leaves_equal(two_steps["ref_after"], two_steps["ref_before"])
    assert _leaves_equal(two_steps["policy_before"], two_steps["ref_before"])  # the reference is the start
    changed = [
        not np.array_equal(x, y)
        for x, y in zip(*(jax.tree.leaves(two_steps[k]) for k in ("policy_after", "policy_before")))
    ]
    assert all(changed), f"{sum(changed)} of {len(changed)} policy tensors changed"


def _ppo_reference(logps, ref_logps, values, scores, lengths, cfg):
    """float64 loops as open-instruct writes them: k1 KL penalty per token, the score one past the last
    token (at T-1 when the response fills T), GAE over t <= length, whitening over the response tokens."""
    n, t = logps.shape
    rewards = np.zeros((n, t))
    vals = np.zeros((n, t))
    adv = np.zeros((n, t))
    ret = np.zeros((n, t))
    for i in range(n):
        length = int(lengths[i])
        for j in range(length):
            rewards[i, j] = -cfg.beta * (float(logps[i, j]) - float(ref_logps[i, j]))
        rewards[i, length if length < t else t - 1] += float(scores[i])
        steps = min(length + 1, t)  # the value mask: one step past the last token
        vals[i, :steps] = values[i, :steps]
        last = 0.0
        for j in reversed(range(steps)):
            next_value = vals[i, j + 1] if j + 1 < steps else 0.0
            delta = rewards[i, j] + cfg.gamma * next_value - vals[i, j]
            last = delta + cfg.gamma * cfg.lam * last
            adv[i, j] = last
            ret[i, j] = last + vals[i, j]
    policy = [(i, j) for i in range(n) for j in range(int(lengths[i]))]
    flat = np.array([adv[i, j] for i, j in policy])
    mean, var = flat.mean(), flat.var(ddof=1)
    white = np.zeros((n, t))
    for i, j in policy:
        white[i, j] = (adv[i, j] - mean) / np.sqrt(var + 1e-8)
    return rewards, vals, ret, white


def test_one_ppo_update_matches_float64_numpy(two_steps):
    r = two_steps
    cfg = r["cfg"]
    lengths, scores = r["lengths"], r["scores"].astype(np.float64)
    n, t = r["logps"].shape
    assert len(set(scores.tolist())) == 2, "scores need a spread for a non-trivial check"
    assert np.abs(r["logps"] - r["ref_logps"]).max() > 1e-3, "step 1 should have moved the policy off the reference"
    rewards, values, returns, advantages = _ppo_reference(r["logps"], r["ref_logps"], r["values"], scores, lengths, cfg)
    arrays = r["arrays"]
    # float32 over T-long recurrences of terms bounded by `scale`: a few ulps per step.
    scale = np.abs(rewards).max() + np.abs(values).max()
    tol = 8 * t * EPS32 * scale
    np.testing.assert_allclose(arrays["old_values"], values, rtol=0, atol=4 * EPS32 * np.abs(values).max())
    np.testing.assert_allclose(arrays["returns"], returns, rtol=0, atol=tol)
    white_tol = tol / advantages[advantages != 0].std() + 16 * np.sqrt(n * t) * EPS32 * np.abs(advantages).max()
    np.testing.assert_allclose(arrays["advantages"], advantages, rtol=0, atol=white_tol)
    policy_mask = np.arange(t)[None, :] < lengths[:, None]
    value_mask = np.arange(t)[None, :] <= lengths[:, None]
    np.testing.assert_array_equal(arrays["policy_mask"], policy_mask)
    np.testing.assert_array_equal(arrays["value_mask"], value_mask)

    # First (only) update: ratio 1 and values = old values, so nothing clips. Per-response aggregation.
    policy_loss = np.mean([-advantages[i, : lengths[i]].mean() for i in range(n)])
    value_loss = 0.5 * np.mean([np.mean((values[i, vm] - returns[i, vm]) ** 2) for i, vm in enumerate(value_mask)])
    m = r["metrics"]
    # The recomputed log-probs differ from the old ones by float32 noise (|logp| <~ 10): ratio - 1 ~ 1e-6.
    adv_scale = np.abs(advantages).max()
    assert abs(m["loss/policy_avg"] - policy_loss) <= 1e-5 * adv_scale + white_tol, (m["loss/policy_avg"], policy_loss)
    err_scale = (np.abs(values).max() + np.abs(returns).max()) ** 2
    assert abs(m["loss/value_avg"] - value_loss) <= 1e-5 * err_scale, (m["loss/value_avg"], value_loss)
    assert m["val/ratio"] == pytest.approx(1.0, abs=1e-5) and m["policy/clipfrac_avg"] == 0.0
    assert m["val/clipfrac_avg"] == 0.0
    np.testing.assert_allclose(m["loss"], m["loss/policy_avg"] + cfg.value_coef * m["loss/value_avg"], rtol=1e-6)
    kl = np.array(
        [np.sum(r["logps"][i, : lengths[i]].astype(np.float64) - r["ref_logps"][i, : lengths[i]]) for i in range(n)]
    )
    np.testing.assert_allclose(m["objective/kl"], kl.mean(), rtol=0, atol=8 * t * EPS32 * np.abs(r["logps"]).max())


def test_local_async_overlap_is_one_version_stale(tmp_path):
    """rollout.async_steps=1 on the local sampler: batch t+1 is generated (from the weights after step t-1) while
    step t trains, so step 1 trains on version-0 samples and every later step on samples one version behind;
    the metrics stay finite and the final export exists."""
    from tulu_jax.train.rlvr import run_rlvr

    args = [*TINY, "train.max_steps=3", "ppo.epochs=1", "rollout.async_steps=1", "checkpoint.every_steps=0"]
    run_rlvr(_cfg("configs/rlvr/tiny.yaml", tmp_path, *args))
    rows = _rows(tmp_path)
    assert [rows[s]["rollout/staleness_max"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert all(np.isfinite(v) for s in (1, 2, 3) for v in rows[s].values())
    assert (tmp_path / "hf" / "config.json").exists()
