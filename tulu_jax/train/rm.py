"""The reward-model trainer (open-instruct `reward_modeling.py`): an SFT model plus a scalar head, trained
with Bradley–Terry on preference pairs and exported as a Hugging Face *ForSequenceClassification (RLVR's
value model starts from it, Tülu 3 §6)."""

from __future__ import annotations

import os

import jax

from tulu_jax.config import RMConfig
from tulu_jax.data.preference import resolve_pref_files
from tulu_jax.models import hf
from tulu_jax.models.reward import RewardModel, init_reward_params, load_reward_params, reward_pad_token_id
from tulu_jax.train import batches
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.loop import finish_run, make_reporter, restore_or_start, train_loop
from tulu_jax.train.preference_run import PreferenceRun, mean_over_pairs
from tulu_jax.train.rm_step import jit_rm_eval, jit_rm_step
from tulu_jax.train.state import create_state


def rm_evaluator(run: PreferenceRun, pad_token_id: int):
    """Held-out pairs in one ordered pass -> `eval/<metric>` means (None: no eval set)."""
    files = resolve_pref_files(run.cfg.data, "eval")
    if not files or run.cfg.train.eval_every < 0:
        return None
    pipeline = run.make_pipeline(files=files, shuffle=False, num_epochs=1)
    eval_sums = jit_rm_eval(run.model, run.mesh, run.shardings.params, pad_token_id=pad_token_id)
    keys = (*batches.TOKEN_KEYS, "valid")
    return lambda params: mean_over_pairs(run, pipeline, lambda b: eval_sums(params, b), keys)


def run_rm(cfg: RMConfig) -> dict:
    """Trains, checkpoints and exports as `cfg` says; returns the summary (also in OUTPUT_DIR/summary.json)."""
    run = PreferenceRun(cfg, RewardModel, describe="; reward model (Bradley-Terry)")
    # The id the export writes as pad_token_id, hence where transformers reads the reward: chosen now, so a
    # tokenizer with neither a pad nor an EOS token fails before training, not at the export.
    pad_token_id = reward_pad_token_id(run.tokenizer)
    ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), cfg.checkpoint.keep)
    data_iter = run.pipeline.iterator()

    def fresh_state():
        rng = jax.random.key(cfg.train.seed)
        if cfg.model.path:  # an SFT export (fresh head) or an existing reward model
            params = load_reward_params(cfg.model.path, run.model, run.mesh, rng)
        else:
            params = init_reward_params(run.model, run.mesh, rng)
        return create_state(params, run.tx, cfg.train.seed, run.shardings)

    state, start = restore_or_start(
        ckpt, run.abstract, run.shardings, data_iter, fresh_state, total_steps=run.total_steps
    )
    step_fn = jit_rm_step(
        run.model,
        run.tx,
        run.schedule,
        run.mesh,
        run.shardings,
        accum_steps=cfg.train.grad_accum_steps,
        pad_token_id=pad_token_id,
    )
    evaluate = rm_evaluator(run, pad_token_id)
    reporter = make_reporter(
        "rm", cfg, run.out_dir, start=start, total_steps=run.total_steps, ckpt=ckpt, show=("loss", "accuracy")
    )
    if start == 0 and evaluate is not None:
        reporter.log_now(0, evaluate(state.params))
    result = train_loop(
        state=state,
        start=start,
        total_steps=run.total_steps,
        data_iter=data_iter,
        to_device=lambda b: run.to_device(b, batches.TOKEN_KEYS),
        step_fn=step_fn,
        host_stats=batches.real_tokens,
        evaluate=evaluate,
        eval_every=cfg.train.eval_every,
        ckpt=ckpt,
        checkpoint_every=cfg.checkpoint.every_steps,
        reporter=reporter,
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
