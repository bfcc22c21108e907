"""The DPO trainer (Tülu 3 §5; open-instruct `dpo_tune_cache.py`, `dpo_utils.py`): preference pairs, a
frozen reference (cached log-probs or live), the shared loop."""

from __future__ import annotations

import os

import numpy as np

from tulu_jax.config import DPOConfig, DPOLossConfig
from tulu_jax.data.preference import PreferencePipeline, resolve_pref_files
from tulu_jax.models import hf
from tulu_jax.train import batches, reference_cache
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.dpo_step import LossParams, jit_dpo_step, jit_eval_sums, jit_pair_logps, step_keys
from tulu_jax.train.loop import finish_run, make_reporter, restore_or_start, train_loop
from tulu_jax.train.preference_run import PreferenceRun, mean_over_pairs
from tulu_jax.train.reporter import log
from tulu_jax.train.state import create_state


def loss_params(cfg: DPOLossConfig) -> LossParams:
    return LossParams(cfg.loss, cfg.beta, cfg.label_smoothing, cfg.gamma_beta_ratio)


class DPORun(PreferenceRun):
    """The shared pairwise setup plus DPO's reference model and its log-prob cache."""

    def __init__(self, cfg: DPOConfig):
        ref = cfg.dpo.reference if cfg.dpo.needs_reference else "none"
        super().__init__(cfg, describe=f"; loss {cfg.dpo.loss} (beta {cfg.dpo.beta}), reference {ref}")
        self.logps_fn = jit_pair_logps(
            self.model, self.mesh, self.shardings.params, logits_chunk=cfg.model.logits_chunk
        )

    @property
    def reference_path(self) -> str | None:
        return self.cfg.dpo.reference_path or self.cfg.model.path

    def reference_params(self):
        """The frozen reference in the compute dtype (it is never updated, so no float32 master copy):
        `dpo.reference_path`, else the very model the policy starts from."""
        return self.run.load_or_init(self.reference_path, dtype=self.model.dtype)

    def reference_logps(self, pipeline: PreferencePipeline, params, desc: str) -> np.ndarray:
        """[N, 2] summed reference log-probs of every pair of `pipeline`, from the on-disk cache or computed
        with `params` (or `params()`, called only on a cache miss)."""
        cfg = self.cfg
        model_id = reference_cache.reference_model_id(
            self.reference_path, self.dcfg, self.model.dtype.__name__, cfg.train.seed
        )
        key = reference_cache.cache_key(pipeline.fingerprint(), model_id)
        cache_dir = cfg.dpo.reference_cache_dir or os.path.join(self.out_dir, "reference_cache")

        def compute():
            p = params() if callable(params) else params
            return reference_cache.compute_pair_logps(
                self.logps_fn,
                p,
                pipeline,
                global_batch=self.global_batch,
                to_device=lambda b: self.ordered_to_device(b, batches.TOKEN_KEYS),
                desc=desc,
            )

        logps, _ = reference_cache.load_or_compute(cache_dir, key, compute, log=log)
        if logps.shape != (len(pipeline), 2):
            raise ValueError(f"reference cache for {key} has shape {logps.shape}, expected ({len(pipeline)}, 2)")
        return logps


class DPOEvaluator:
    """Held-out pairs, one ordered pass: mean loss, rewards, reward accuracy and policy-only accuracy."""

    def __init__(self, run: DPORun, ref_params):
        cfg = run.cfg
        files = resolve_pref_files(cfg.data, "eval")
        self.enabled = bool(files) and cfg.train.eval_every >= 0
        if not self.enabled:
            return
        self.run = run
        self.pipeline = run.make_pipeline(files=files, shuffle=False, num_epochs=1)
        self.ref = (
            run.reference_logps(self.pipeline, ref_params, desc="reference log-probs (eval)")
            if cfg.dpo.needs_reference
            else np.zeros((len(self.pipeline), 2), np.float32)
        )
        self._eval = jit_eval_sums(
            run.model, run.mesh, run.shardings.params, loss_params(cfg.dpo), logits_chunk=cfg.model.logits_chunk
        )

    def __call__(self, params) -> dict[str, float]:
        out = mean_over_pairs(
            self.run,
            self.pipeline,
            lambda b: self._eval(params, b),
            (*step_keys(live=False), "valid"),
            prepare=lambda b: {**b, "ref_logps": self.ref[b["index"]]},
        )
        out["eval/rewards/average"] = (out["eval/rewards/chosen"] + out["eval/rewards/rejected"]) / 2
        return out


def run_dpo(cfg: DPOConfig) -> dict:
    """Trains, checkpoints and exports as `cfg` says; returns the summary (also in OUTPUT_DIR/summary.json)."""
    run = DPORun(cfg)
    live = cfg.dpo.reference == "live" and cfg.dpo.needs_reference
    ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), cfg.checkpoint.keep)
    data_iter = run.pipeline.iterator()
    state, start = restore_or_start(
        ckpt,
        run.abstract,
        run.shardings,
        data_iter,
        lambda: create_state(run.run.load_or_init(cfg.model.path), run.tx, cfg.train.seed, run.shardings),
        total_steps=run.total_steps,
    )

    # The reference: live parameters, or per-pair log-probs looked up by example id.
    ref_params = run.reference_params() if live else None
    if live or not cfg.dpo.needs_reference:
        ref_source = ref_params
    elif start == 0 and not cfg.dpo.reference_path:
        ref_source = state.params  # the policy at step 0 is the reference: no second copy in memory
    else:
        ref_source = run.reference_params  # loaded only if the cache misses
    train_ref = None
    if cfg.dpo.needs_reference and not live:
        train_ref = run.reference_logps(run.pipeline, ref_source, desc="reference log-probs")
    evaluate = DPOEvaluator(run, ref_source)

    step_fn = jit_dpo_step(
        run.model,
        run.tx,
        run.schedule,
        run.mesh,
        run.shardings,
        cfg=loss_params(cfg.dpo),
        accum_steps=cfg.train.grad_accum_steps,
        live=live,
        logits_chunk=cfg.model.logits_chunk,
    )

    def to_device(host_batch):
        if not live:
            ref = train_ref if train_ref is not None else np.zeros((len(run.pipeline), 2), np.float32)
            host_batch = {**host_batch, "ref_logps": ref[host_batch["index"]]}
        return run.to_device(host_batch, step_keys(live))

    reporter = make_reporter(
        "dpo",
        cfg,
        run.out_dir,
        start=start,
        total_steps=run.total_steps,
        ckpt=ckpt,
        show=("loss", "rewards/accuracy", "rewards/margin"),
    )
    if start == 0 and evaluate.enabled:
        reporter.log_now(0, evaluate(state.params))
    result = train_loop(
        state=state,
        start=start,
        total_steps=run.total_steps,
        data_iter=data_iter,
        to_device=to_device,
        step_fn=(lambda s, b: step_fn(s, b, ref_params)) if live else step_fn,
        host_stats=batches.real_tokens,
        evaluate=evaluate if evaluate.enabled else None,
        eval_every=cfg.train.eval_every,
        ckpt=ckpt,
        checkpoint_every=cfg.checkpoint.every_steps,
        reporter=reporter,
        extra_metrics=run.epoch,
    )
    return finish_run(
        cfg, run.out_dir, result, run.pipeline.stats, exporter=hf.export_hf, dcfg=run.dcfg, tokenizer=run.tokenizer
    )
