"""The RLVR trainer (Tülu 3 §6; open-instruct `ppo_vllm_thread_ray_gtrl.py`, and `grpo_fast.py` for GRPO).

One step: take the next sampled prompt batch from the `RolloutSource` (generated with the newest weights, or
`rollout.async_steps` versions back while this step trains) -> the trainer's log-probs of the responses
(policy and frozen reference, at the sampling temperature) and, for PPO, the value model's values, while the
verifiers score them -> advantages (GAE over KL-penalised rewards for PPO; group-normalised scores for
GRPO) -> `epochs` passes of `minibatches` optimizer steps over shuffled episodes, the value step before the
policy step as in the reference -> push the new policy to the generator.

Checkpoints hold the policy and value train states (their AdamW moments included), the prompt iterator's
state and the rollout seed, so a killed run resumes exactly: batch i is always sampled with the seed of draw
i, from the weights the uninterrupted run had (with async_steps = 0).
"""

from __future__ import annotations

import dataclasses
import os
import time
import urllib.parse

import jax
import numpy as np

from tulu_jax import sharding as shd
from tulu_jax.config import RLVRConfig
from tulu_jax.configlib import ConfigError
from tulu_jax.data.pipeline import resolve_files
from tulu_jax.data.prompts import PromptPipeline, read_prompts
from tulu_jax.data.tokenizer import pad_token_id
from tulu_jax.models import hf
from tulu_jax.models.loading import build_model
from tulu_jax.models.reward import RewardModel, init_reward_params, load_reward_params
from tulu_jax.multihost import process_zero_result
from tulu_jax.rewards.scorer import Scorer, VerifyItem
from tulu_jax.rl.advantages import constant_groups
from tulu_jax.rl.rewards import apply_non_stop_penalty
from tulu_jax.rollout.types import SamplingParams
from tulu_jax.train import batches, setup
from tulu_jax.train.cadence import checkpoint_due, eval_due
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.episodes import SEQUENCE_KEYS, concat_episodes, episode_arrays, prompt_width, take_rows
from tulu_jax.train.loop import LoopResult, finish_run, make_reporter, restore_or_start
from tulu_jax.train.optimizer import make_optimizer
from tulu_jax.train.reporter import log
from tulu_jax.train.rlvr_step import (
    Shapes,
    grpo_advantages,
    jit_forward,
    jit_update,
    policy_update,
    ppo_advantages,
    response_logps,
    response_logps_and_entropy,
    response_values,
    rollout_policy_stats,
    value_update,
)
from tulu_jax.train.rollouts import Rollout, RolloutSource, device_copy, versions_of
from tulu_jax.train.state import create_state, state_layout

POLICY_KEYS = ("old_logps", "advantages", "policy_mask", "tis_weights", *SEQUENCE_KEYS)
VALUE_KEYS = ("old_values", "returns", "value_mask", *SEQUENCE_KEYS)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # servers that can read this host's /dev/shm


def check_rlvr_inputs(cfg: RLVRConfig) -> None:
    """Fail closed, after model.path and the prompt files (`setup.check_inputs`), before any weights load: PPO with
    value.init=reward_model needs value.path holding a reward model (a score head, not a causal LM), and
    backend vllm needs servers that answer. ConfigError / InputError naming the key."""
    from tulu_jax.inputs import check_model_dir, check_servers

    if jax.process_count() > 1 and cfg.rollout.backend == "local" and cfg.rollout.async_steps > 0:
        raise ConfigError(
            f"rollout.async_steps: {cfg.rollout.async_steps} needs rollout.backend=vllm in a multi-process job (the "
            "local sampler is one program over every process's devices and cannot run beside the learner); set 0"
        )
    if cfg.algo == "ppo" and cfg.value.init == "reward_model":
        if cfg.value.path is None:
            raise ConfigError(
                "value.path: required for PPO (a `tulu-jax rm` export, e.g. runs/rm-tiny/hf; Tülu 3 starts the "
                "value model from its reward model), or set value.init=policy for a fresh value head on the policy"
            )
        check_model_dir(cfg.value.path, "value.path")
        if not hf.checkpoint_has(cfg.value.path, hf.SCORE_NAME):
            raise ConfigError(
                f"value.path: {cfg.value.path} has no score head ({hf.SCORE_NAME}): not a reward-model export; give "
                "a `tulu-jax rm` export, or value.init=policy to start the value model from the policy"
            )
    if cfg.rollout.backend == "vllm":
        if not cfg.rollout.servers:
            raise ConfigError("rollout.servers: required with rollout.backend=vllm (e.g. [http://h1:8000])")
        check_servers(",".join(cfg.rollout.servers), "rollout.servers")  # each answers /health


def check_batch_layout(cfg: RLVRConfig, mesh) -> None:
    """Every minibatch of episodes must split into grad_accum_steps micro-batches that split over the
    data-parallel devices."""
    episodes = cfg.train.batch_size * cfg.rollout.n
    loss = cfg.loss
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if episodes % loss.minibatches:
        raise ConfigError(
            f"{cfg.algo}.minibatches: {episodes} episodes per step (train.batch_size x rollout.n) do not split into "
            f"{loss.minibatches} minibatches"
        )
    per_minibatch = episodes // loss.minibatches
    accum = cfg.train.grad_accum_steps
    if per_minibatch % accum or (per_minibatch // accum) % dp:
        raise ConfigError(
            f"train.grad_accum_steps: {per_minibatch} episodes per minibatch must split into {accum} micro-batches "
            f"of a multiple of the data-parallel size data*fsdp = {dp}"
        )


class RLVRRun:
    """Everything an RLVR run builds before its loop (models, optimizers, state layouts, prompts, jitted steps)."""

    def __init__(self, cfg: RLVRConfig):
        self.cfg = cfg
        self.ppo = cfg.algo == "ppo"
        setup.check_inputs(cfg)  # model.path and the prompt files first, then the value model
        check_rlvr_inputs(cfg)
        loss = cfg.loss
        describe = f"; RLVR {cfg.algo}, {cfg.rollout.n} sample(s) per prompt, rollouts {cfg.rollout.backend}"
        episodes = cfg.train.batch_size * cfg.rollout.n
        self.run = run = setup.prepare(cfg, describe=describe, what="episodes", rows=episodes)
        self.mesh, self.tokenizer, self.model, self.out_dir = run.mesh, run.tokenizer, run.model, run.out_dir
        check_batch_layout(cfg, self.mesh)
        self.eos, self.pad = run.tokenizer.eos_token_id, pad_token_id(run.tokenizer)

        files = resolve_files(cfg.data, "train")
        self.pipeline = PromptPipeline(
            cfg.data,
            run.tokenizer,
            files=files,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            num_epochs=cfg.train.num_epochs,
        )
        s = self.pipeline.stats
        log(
            f"prompts: {s['prompts']} ({s['by_dataset']}) from {s['rows_read']} rows; "
            f"skipped: {s['rows_skipped'] or 'none'}"
        )
        self.updates_per_step = loss.epochs * loss.minibatches  # optimizer updates per RL step
        run.add_optimizer(setup.run_length(cfg.train, self.pipeline.count_batches()), self.updates_per_step)
        self.total_steps = run.total_steps
        self.shapes = Shapes(
            width=prompt_width(s["longest_prompt"]),
            temperature=cfg.rollout.temperature,
            logits_chunk=cfg.model.logits_chunk,
        )

        # The value model: its own network (Tülu 3's 70B policy used the 8B RM), optimizer and state.
        self.abstract = {"policy": run.abstract}
        self.shardings = {"policy": run.shardings}
        if self.ppo:
            vdcfg = hf.load_hf_config(cfg.value.path) if cfg.value.init == "reward_model" else run.dcfg
            self.value_model = setup.build_train_model(cfg.model, vdcfg, RewardModel)
            value_optim = dataclasses.replace(cfg.optim, lr=cfg.optim.lr if cfg.value.lr is None else cfg.value.lr)
            self.value_tx, _ = make_optimizer(value_optim, self.total_steps * self.updates_per_step)
            try:
                self.abstract["value"], self.shardings["value"] = state_layout(
                    self.value_model, self.value_tx, self.mesh
                )
            except ValueError as e:
                raise ConfigError(str(e)) from None
            source = cfg.value.path if cfg.value.init == "reward_model" else "the policy + a fresh head"
            log(f"value model: {source}: {vdcfg.num_params / 1e6:.1f}M parameters, lr {value_optim.lr}")
        rep = shd.replicated(self.mesh)
        for name in ("rollout_seed", "rollout_draws"):  # the sampling seed; prompt batches drawn so far
            self.abstract[name] = jax.ShapeDtypeStruct((), np.int32)
            self.shardings[name] = rep

        # Compiled pieces.
        params_sh = run.shardings.params
        self.logps_fn = jit_forward(response_logps, self.model, self.mesh, params_sh, self.shapes)
        self.logps_entropy_fn = jit_forward(response_logps_and_entropy, self.model, self.mesh, params_sh, self.shapes)
        accum = cfg.train.grad_accum_steps
        self.policy_step = jit_update(
            policy_update,
            self.mesh,
            run.shardings,
            POLICY_KEYS + (("ref_logps",) if not self.ppo else ()),
            model=self.model,
            tx=run.tx,
            schedule=run.schedule,
            shapes=self.shapes,
            cfg=loss,
            kl_in_loss=not self.ppo and loss.beta > 0,
            accum=accum,
        )
        if self.ppo:
            vsh = self.shardings["value"]
            self.values_fn = jit_forward(response_values, self.value_model, self.mesh, vsh.params, self.shapes)
            self.value_step = jit_update(
                value_update,
                self.mesh,
                vsh,
                VALUE_KEYS,
                value_model=self.value_model,
                tx=self.value_tx,
                shapes=self.shapes,
                cfg=loss,
                accum=accum,
            )
            self.advantages_fn = jax.jit(lambda *a: ppo_advantages(*a, cfg=loss))
        else:
            n = cfg.rollout.n
            self.advantages_fn = jax.jit(
                lambda lp, ref, sc, ln, st: grpo_advantages(lp, ref, sc, ln, st, cfg=loss, group_size=n)
            )
        self.gap_fn = jax.jit(lambda lp, sp, ent, m: rollout_policy_stats(lp, sp, ent, m, loss.tis_cap))

    # --- states -----------------------------------------------------------------------------------------------

    def fresh_states(self) -> dict:
        """The states of a new run: {"policy": TrainState from model.path (or the preset's init), "value":
        TrainState from value.path or the policy plus a fresh head (PPO only), "rollout_seed": int32 train.seed,
        "rollout_draws": int32 0}, each on its shardings."""
        cfg, run = self.cfg, self.run
        states = {"policy": create_state(run.load_or_init(cfg.model.path), run.tx, cfg.train.seed, run.shardings)}
        if self.ppo:
            rng = jax.random.key(cfg.train.seed + 1)
            if cfg.value.init == "reward_model":
                params = load_reward_params(cfg.value.path, self.value_model, self.mesh, rng)
            elif cfg.model.path:  # the policy's decoder (its LM head skipped) and a fresh score head
                params = load_reward_params(cfg.model.path, self.value_model, self.mesh, rng)
            else:  # a random-init toy policy (model.preset): a random value model of the same shape
                params = init_reward_params(self.value_model, self.mesh, rng)
            states["value"] = create_state(params, self.value_tx, cfg.train.seed, self.shardings["value"])
        states["rollout_seed"] = jax.device_put(np.int32(cfg.train.seed), self.shardings["rollout_seed"])
        states["rollout_draws"] = jax.device_put(np.int32(0), self.shardings["rollout_draws"])
        return states

    # --- the generator ------------------------------------------------------------------------------------------

    def make_backend(self, params):
        """(the rollout backend, holding `params` (the starting or restored policy), the snapshot function whose
        result a push hands to it: the local sampler's own compute-dtype copy, or for vLLM an on-device copy that
        the push serialises from the rollout thread, so the learner never waits for a host transfer)."""
        cfg = self.cfg
        if cfg.rollout.backend == "local":
            from tulu_jax.sampling.sampler import LocalSampler

            sampler_model = build_model(self.run.dcfg, dtype=cfg.model.dtype, attention_block=cfg.model.attention_block)
            return LocalSampler(
                sampler_model,
                params,
                self.mesh,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                max_batch=cfg.rollout.max_batch or None,
                seed=cfg.train.seed,
            ), None
        from tulu_jax.rollout.vllm_client import VLLMClient

        urls = [u.rstrip("/") for u in cfg.rollout.servers]
        weights_dir = cfg.rollout.weights_dir or None  # None: the client's scratch folder (/dev/shm) ...
        if weights_dir is None and not all(urllib.parse.urlsplit(u).hostname in LOCAL_HOSTS for u in urls):
            weights_dir = os.path.join(self.out_dir, "pushed_weights")  # ... unless a server runs elsewhere
        client = VLLMClient(
            urls,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            cfg=self.run.dcfg,
            weights_dir=weights_dir,
            weights_dtype=cfg.rollout.push_dtype,
        )
        return client, device_copy


def rollout_metrics(rollout: Rollout, verdicts, scores: np.ndarray, learner_version: int) -> dict[str, float]:
    """Host-side figures of one batch: verifier accuracy overall and per dataset, verifier timeouts and errors,
    staleness (learner version minus the version that sampled each row)."""
    out: dict[str, float] = {"objective/verifiable_correct_rate": float(np.mean(scores > 0))}
    datasets = np.array([rollout.prompts[int(i)].dataset for i in rollout.batch.prompt_index])
    for name in sorted(set(datasets)):
        out[f"objective/{name}_correct_rate"] = float(np.mean(scores[datasets == name] > 0))
    out["rollout/verifier_timeouts"] = float(sum(v.status == "timeout" for v in verdicts))
    out["rollout/verifier_errors"] = float(sum(v.status == "error" for v in verdicts))
    stale = learner_version - versions_of(rollout.batch)
    out["rollout/staleness_mean"] = float(np.nanmean(stale)) if np.isfinite(stale).any() else 0.0
    out["rollout/staleness_max"] = float(np.nanmax(stale)) if np.isfinite(stale).any() else 0.0
    return out


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """Element-wise mean of metric dicts (host scalars), keys of the first."""
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


class Evaluator:
    """Greedy accuracy on held-out RLVR prompts (data.eval_files, or the bundled tiny eval sets), scored by
    the same verifiers: eval/verifiable_correct_rate and eval/{dataset}_correct_rate."""

    def __init__(self, rl: RLVRRun):
        cfg = rl.cfg
        files = resolve_files(cfg.data, "eval")
        self.enabled = bool(files) and cfg.train.eval_every >= 0
        if not self.enabled:
            if cfg.train.eval_every >= 0:
                log("eval: off (no data.eval_files)")
            return
        self.prompts, stats = read_prompts(
            files,
            rl.tokenizer,
            max_prompt_len=cfg.data.max_seq_len,
            on_bad_row=cfg.data.on_bad_row,
            template=cfg.data.chat_template,
            limit=cfg.data.eval_limit,
        )
        self.rl = rl
        log(
            f"eval: {len(self.prompts)} held-out prompts from {', '.join(files)} (skipped: "
            f"{stats['rows_skipped'] or 'none'})"
        )

    def __call__(self, source: RolloutSource) -> dict[str, float]:
        rl = self.rl
        sp = SamplingParams(max_tokens=rl.cfg.rollout.max_tokens, temperature=0.0)
        ids = [p.token_ids for p in self.prompts]
        completions = source.run_in_backend(lambda: source.backend.generate(ids, sp))

        def score() -> list[bool] | None:  # on process 0, which scores for every process
            if jax.process_index() != 0:
                return None
            texts = [rl.tokenizer.decode(list(c.token_ids), skip_special_tokens=True) for c in completions]
            verdicts = source.score([VerifyItem(p.dataset, t, p.ground_truth) for p, t in zip(self.prompts, texts)])
            return [v.score > 0 for v in verdicts]

        correct = np.array(process_zero_result(score))
        datasets = np.array([p.dataset for p in self.prompts])
        out = {"eval/verifiable_correct_rate": float(correct.mean())}
        for name in sorted(set(datasets)):
            out[f"eval/{name}_correct_rate"] = float(correct[datasets == name].mean())
        return out


def run_rlvr(cfg: RLVRConfig) -> dict:
    """Trains, checkpoints and exports the policy as `cfg` says; returns the summary (also OUTPUT_DIR/summary.json)."""
    rl = RLVRRun(cfg)
    ckpt = Checkpointer(os.path.join(rl.out_dir, "checkpoints"), cfg.checkpoint.keep)
    data_iter = rl.pipeline.iterator()
    states, start = restore_or_start(
        ckpt, rl.abstract, rl.shardings, data_iter, rl.fresh_states, total_steps=rl.total_steps
    )
    ref_params = rl.run.load_or_init(cfg.model.path, dtype=rl.model.dtype)  # frozen: the starting policy
    backend, snapshot = rl.make_backend(states["policy"].params)
    local = snapshot is None
    if local:  # the sampler made its own copy of these weights: tag it instead of pushing them again
        snapshot, backend.weight_version = backend.snapshot, str(start)
    sampling = SamplingParams(max_tokens=cfg.rollout.max_tokens, temperature=cfg.rollout.temperature, n=cfg.rollout.n)
    scorer = Scorer() if jax.process_index() == 0 else None  # process 0 scores for every process
    source = RolloutSource(
        backend=backend,
        pipeline=rl.pipeline,
        data_iter=data_iter,
        tokenizer=rl.tokenizer,
        scorer=scorer,
        sampling=sampling,
        seed=int(states["rollout_seed"]),
        async_steps=cfg.rollout.async_steps,
        snapshot=snapshot,
        start_draws=int(states["rollout_draws"]),  # a resumed run samples batch i with draw i's seed
    )
    evaluate = Evaluator(rl)
    reporter = make_reporter(
        f"rlvr-{cfg.algo}",
        cfg,
        rl.out_dir,
        start=start,
        total_steps=rl.total_steps,
        ckpt=ckpt,
        show=("objective/verifiable_correct_rate", "objective/scores", "objective/kl"),
    )
    try:
        if not local:  # the servers get the restored (or starting) policy, tagged with its step
            source.publish(states["policy"].params, start)
        if start == 0 and evaluate.enabled:
            reporter.log_now(0, evaluate(source))
        step, last_state = start, None
        for step in range(start + 1, rl.total_steps + 1):
            step_start = time.perf_counter()
            rollout, waited = source.get()
            if rollout is None:
                step -= 1
                log(
                    f"the prompts are used up after step {step} of {rl.total_steps} (dynamic sampling's refills drew "
                    "extra batches); raise train.num_epochs or lower grpo.max_refills to run every step"
                )
                if evaluate.enabled and step > start:
                    reporter.flush()
                    reporter.log_now(step, evaluate(source))
                break
            states, metrics, host, data_state = train_step(rl, states, ref_params, source, rollout, waited, step)
            due = evaluate.enabled and eval_due(step, cfg.train.eval_every, rl.total_steps)
            if step % cfg.rollout.push_every == 0 or step == rl.total_steps or due:  # eval samples the newest
                source.publish(states["policy"].params, step)
            host["time/step_s"] = time.perf_counter() - step_start
            reporter.submit(step, metrics, host=host, late=(lambda: evaluate(source)) if due else None)
            if due:
                reporter.flush()
            if checkpoint_due(step, cfg.checkpoint.every_steps):
                reporter.flush()  # never checkpoint a non-finite state
                ckpt.save(step, states, data_state)
            last_state = data_state
        reporter.flush()
        if step > start and ckpt.latest_step() != step:
            ckpt.save(step, states, last_state)
        ckpt.wait()
    finally:
        source.close()
        if hasattr(backend, "close"):  # vLLM: the pushed folders (RAM, under /dev/shm) go
            backend.close()
        if scorer is not None:
            scorer.close()
        reporter.close()
        ckpt.close()
    result = LoopResult(state=states["policy"], step=step, last_metrics=dict(reporter.last), start=start)
    stats = rl.pipeline.stats
    return finish_run(cfg, rl.out_dir, result, stats, exporter=hf.export_hf, dcfg=rl.run.dcfg, tokenizer=rl.tokenizer)


def gather_rollouts(rl: RLVRRun, source: RolloutSource, first: Rollout, learner_version: int):
    """The episodes of one step: `first`'s, and for GRPO with dynamic sampling, groups with a spread of scores
    only, refilled from further batches (at most grpo.max_refills) and cut to train.batch_size groups.
    Returns (episodes (`episode_arrays`), scores float32 [N], host metrics, the last Rollout used: its draw index
    and data state are what a checkpoint after this step must hold)."""
    cfg = rl.cfg
    n, wanted = cfg.rollout.n, cfg.train.batch_size
    parts, scores, host, waited = [], [], [], 0.0
    rollout, refills, kept_groups, dropped = first, 0, 0, 0
    while True:
        t0 = time.perf_counter()
        verdicts, scoring_s = rollout.verdicts.result()
        waited += time.perf_counter() - t0
        s = np.array([v.score for v in verdicts], np.float32) * cfg.loss.verify_reward
        eps = episode_arrays(rollout.batch, width=rl.shapes.width, pad_token_id=rl.pad)
        m = rollout_metrics(rollout, verdicts, s, learner_version)
        m["time/scoring_s"] = scoring_s
        m.update({f"time/{k}": v for k, v in rollout.timings.items() if k.endswith("_s")})
        m["tokens"] = rollout.timings["new_tokens"]
        host.append(m)
        if rl.ppo or not cfg.grpo.dynamic_sampling:
            parts.append(eps)
            scores.append(s)
            break
        final = np.asarray(apply_non_stop_penalty(s, eps["stopped"], cfg.loss.non_stop_penalty))  # what GRPO sees
        spread = ~np.asarray(constant_groups(final, n))
        dropped += int((~spread).sum())
        rows = np.flatnonzero(np.repeat(spread, n))
        parts.append(take_rows(eps, rows))
        scores.append(s[rows])
        kept_groups += int(spread.sum())
        if kept_groups >= wanted or refills >= cfg.grpo.max_refills:
            break
        nxt = source.extra()
        if nxt is None:
            break
        rollout, refills = nxt, refills + 1
    episodes, scores = concat_episodes(parts), np.concatenate(scores)
    # Over refill batches: times and counts add up, rates average.
    counts = ("tokens", "rollout/verifier_timeouts", "rollout/verifier_errors")
    additive = lambda k: k.startswith("time/") or k in counts  # noqa: E731
    metrics = {k: float((np.sum if additive(k) else np.mean)([h[k] for h in host if k in h])) for k in host[0]}
    if not rl.ppo and cfg.grpo.dynamic_sampling:
        total_groups = len(host) * wanted
        metrics["rollout/dropped_groups_share"] = dropped / total_groups
        metrics["rollout/refill_batches"] = float(refills)
        metrics["rollout/kept_groups"] = float(min(kept_groups, wanted))
        rows_needed = wanted * n
        if 0 < len(scores) < rows_needed:  # still short: repeat the kept groups (whole groups: prompt-major rows)
            log(f"dynamic sampling: only {len(scores) // n} of {wanted} groups had a spread of scores; repeating them")
        if len(scores):
            rows = np.arange(rows_needed) % len(scores)
            episodes, scores = take_rows(episodes, rows), scores[rows]
        else:  # nothing to learn from: the step takes no update (train_step); keep the first batch for its shapes
            episodes = episode_arrays(first.batch, width=rl.shapes.width, pad_token_id=rl.pad)
            scores = np.zeros(len(first.batch), np.float32)
    metrics["time/wait_scoring_s"] = waited
    return episodes, scores, metrics, rollout


def train_step(
    rl: RLVRRun, states: dict, ref_params, source: RolloutSource, rollout: Rollout, waited: float, step: int
):
    """One RL step on `rollout` -> (states, device metrics, host metrics, data state to checkpoint)."""
    cfg, loss, mesh = rl.cfg, rl.cfg.loss, rl.mesh
    episodes, scores, host, last = gather_rollouts(rl, source, rollout, learner_version=step - 1)
    host["time/wait_rollout_s"] = waited
    t0 = time.perf_counter()
    # Every process holds all the episodes (process 0 shared them): place each process's rows only.
    seq = batches.whole_to_device(episodes, mesh, SEQUENCE_KEYS)
    rows = lambda x: batches.whole_to_device({"x": x}, mesh, ("x",))["x"]  # noqa: E731
    if seq["input_ids"].shape[0] != len(scores):
        raise AssertionError(f"placed {seq['input_ids'].shape[0]} rows for {len(scores)} episodes")
    policy, value = states["policy"], states.get("value")
    logps, entropy = rl.logps_entropy_fn(policy.params, seq)
    ref_logps = rl.logps_fn(ref_params, seq)
    lengths, stopped, scores_d = rows(episodes["lengths"]), rows(episodes["stopped"]), rows(scores)
    if rl.ppo:
        values = rl.values_fn(value.params, seq)
        arrays, stats = rl.advantages_fn(logps, ref_logps, values, scores_d, lengths, stopped)
    else:
        arrays, stats = rl.advantages_fn(logps, ref_logps, scores_d, lengths, stopped)
    tis_weights, gap_stats = rl.gap_fn(logps, rows(episodes["sampler_logps"]), entropy, arrays["policy_mask"])
    jax.block_until_ready(arrays)
    host["time/forward_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    batch = {**seq, **arrays, "old_logps": logps, "ref_logps": ref_logps, "tis_weights": tis_weights}
    n = len(scores)
    size = n // loss.minibatches
    updates = []
    policy_keys = POLICY_KEYS + (("ref_logps",) if not rl.ppo else ())
    row_sharding = shd.batch_sharding(mesh)
    # Dynamic sampling found no group with a spread of scores even after its refills: every advantage is 0, and an
    # optimizer step would still move the weights (weight decay, Adam's momentum). Skip it.
    skip = host.get("rollout/kept_groups", 1.0) == 0
    if skip:
        log(f"step {step}: no group had a spread of scores; no update")
    for epoch in range(0 if skip else loss.epochs):
        perm = np.random.default_rng([cfg.train.seed, step, epoch]).permutation(n)
        for lo in range(0, n, size):
            idx = perm[lo : lo + size]
            mb = jax.device_put({k: v[idx] for k, v in batch.items()}, row_sharding)  # gathers lose the sharding
            m = {}
            if rl.ppo:  # the value step first, as in the reference
                value, vm = rl.value_step(value, {k: mb[k] for k in VALUE_KEYS})
                m.update(vm)
            policy, pm = rl.policy_step(policy, {k: mb[k] for k in policy_keys})
            m.update(pm)
            updates.append(m)
    jax.block_until_ready(policy.params)
    host["time/update_s"] = time.perf_counter() - t0
    metrics = {**(mean_metrics(jax.device_get(updates)) if updates else {}), **stats, **gap_stats}  # on the host
    metrics["rollout/update_skipped"] = float(skip)
    if updates:
        value_part = loss.value_coef * metrics["loss/value_avg"] if rl.ppo else 0.0
        metrics["loss"], metrics["grad_norm"] = metrics["loss/policy_avg"] + value_part, metrics["policy/grad_norm"]
    host["episodes"] = float(step * cfg.train.batch_size * cfg.rollout.n)
    new_states = {
        **states,
        "policy": policy,
        "rollout_draws": jax.device_put(np.int32(last.index), shd.replicated(mesh)),
    }
    if rl.ppo:
        new_states["value"] = value
    return new_states, metrics, host, last.data_state
