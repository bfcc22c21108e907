"""The reward-model trainer (spec §3.7): an SFT model plus a scalar head, trained with Bradley–Terry on
preference pairs and exported as a Hugging Face *ForSequenceClassification (RLVR's value model starts
from it)."""

from __future__ import annotations

import os

import jax

from tulu_jax.config import ModelConfig, RMConfig
from tulu_jax.data.preference import resolve_pref_files
from tulu_jax.models import hf
from tulu_jax.models.reward import RewardModel, init_reward_params, load_reward_params
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.dpo_step import PAIR_KEYS
from tulu_jax.train.loop import finish_run, restore_or_start, train_loop
from tulu_jax.train.metrics import MetricsLogger
from tulu_jax.train.preference_run import PreferenceRun, mean_over_pairs, real_tokens
from tulu_jax.train.rm_step import jit_rm_eval, jit_rm_step
from tulu_jax.train.sft import build_train_model
from tulu_jax.train.state import create_state


def _build(mcfg: ModelConfig, dcfg):
    return build_train_model(mcfg, dcfg, module=RewardModel)


def rm_evaluator(run: PreferenceRun):
    """Held-out pairs in one ordered pass -> `eval/<metric>` means (None: no eval set)."""
    files = resolve_pref_files(run.cfg.data, "eval")
    if not files or run.cfg.train.eval_every < 0:
        return None
    pipeline = run.make_pipeline(files=files, shuffle=False, num_epochs=1)
    eval_sums = jit_rm_eval(run.model, run.mesh, run.shardings.params)
    return lambda params: mean_over_pairs(run, pipeline, lambda b: eval_sums(params, b), (*PAIR_KEYS, "valid"))


def run_rm(cfg: RMConfig) -> dict:
    run = PreferenceRun(cfg, _build, describe="; reward model (Bradley-Terry)")
    ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), cfg.checkpoint.keep)
    data_iter = run.pipeline.iterator()

    def fresh_state():
        rng = jax.random.key(cfg.train.seed)
        if cfg.model.path:  # an SFT export (fresh head) or an existing reward model
            params = load_reward_params(cfg.model.path, run.model, run.mesh, rng)
        else:
            params = init_reward_params(run.model, run.mesh, rng)
        return create_state(params, run.tx, cfg.train.seed, run.shardings)

    state, start = restore_or_start(ckpt, run.abstract, run.shardings, data_iter, fresh_state)
    accum = cfg.train.grad_accum_steps
    step_fn = jit_rm_step(run.model, run.tx, run.schedule, run.mesh, run.shardings, accum_steps=accum)
    evaluate = rm_evaluator(run)
    logger = MetricsLogger(run.out_dir, resume_step=start, enabled=jax.process_index() == 0)
    if start == 0 and evaluate is not None:
        logger.log(0, evaluate(state.params))
    result = train_loop(
        name="rm",
        state=state,
        start=start,
        total_steps=run.total_steps,
        data_iter=data_iter,
        to_device=lambda b: run.to_device(b, PAIR_KEYS),
        step_fn=step_fn,
        host_stats=real_tokens,
        evaluate=evaluate,
        eval_every=cfg.train.eval_every,
        log_every=cfg.train.log_every,
        ckpt=ckpt,
        checkpoint_every=cfg.checkpoint.every_steps,
        logger=logger,
        show=("loss", "accuracy"),
        extra_metrics=run.epoch,
    )
    return finish_run(
        cfg,
        run.out_dir,
        result,
        run.pipeline.stats,
        exporter=hf.export_reward_hf,
        dcfg=run.dcfg,
        tokenizer=run.tokenizer,
    )
