"""The SFT trainer: the stateful shell (data, checkpoints, logging, export) around the pure step."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from tulu_jax import sharding as shd
from tulu_jax.config import ModelConfig, SFTConfig
from tulu_jax.configlib import ConfigError
from tulu_jax.data import SFTPipeline, load_tokenizer, resolve_files
from tulu_jax.losses import reduce_sft
from tulu_jax.models import hf
from tulu_jax.models.config import preset
from tulu_jax.models.loading import build_model, init_params, load_params
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.loop import (
    finish_run,
    log,
    make_train_mesh,
    prepare_output_dir,
    restore_or_start,
    train_loop,
)
from tulu_jax.train.metrics import MetricsLogger
from tulu_jax.train.optimizer import make_optimizer
from tulu_jax.train.sft_step import BATCH_KEYS, jit_sft_eval, jit_sft_step
from tulu_jax.train.state import create_state, state_layout


def load_model_and_tokenizer(mcfg: ModelConfig):
    """(DecoderConfig, tokenizer) from a Hugging Face folder, or a preset with the bundled tokenizer."""
    tokenizer = load_tokenizer(mcfg.tokenizer or mcfg.path)
    if mcfg.path:
        dcfg = hf.load_hf_config(mcfg.path)
    else:
        dcfg = preset(
            mcfg.preset,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    if len(tokenizer) > dcfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{dcfg.vocab_size}: token ids would index past the embedding table"
        )
    return dcfg, tokenizer


def host_batch_stats(batch: dict[str, np.ndarray]) -> dict[str, float]:
    real = float(np.sum(batch["segment_ids"] > 0))
    return {"tokens": real, "packing_efficiency": real / batch["segment_ids"].size}


class Evaluator:
    """Loss on the held-out files, one pass in file order, with the training loss's reduction."""

    def __init__(self, cfg: SFTConfig, tokenizer, model, mesh, param_shardings):
        files = resolve_files(cfg.data, "eval")
        self.enabled = bool(files) and cfg.train.eval_every >= 0
        if not self.enabled:
            return
        self._pipeline = SFTPipeline(
            dataclasses.replace(cfg.data, shuffle=False),
            tokenizer,
            batch_size=cfg.train.batch_size // jax.process_count(),
            seed=0,
            num_epochs=1,
            files=files,
        )
        self._eval = jit_sft_eval(model, mesh, param_shardings)
        self._sharding = shd.batch_sharding(mesh)
        self._reduction = cfg.train.loss_reduction

    def __call__(self, params) -> dict[str, float]:
        sums = []
        for host_batch in self._pipeline.iterator():
            batch = {k: jax.make_array_from_process_local_data(self._sharding, host_batch[k]) for k in BATCH_KEYS}
            sums.append(self._eval(params, batch))
        if not sums:
            raise ValueError("the eval files yield no full batch: lower train.batch_size or add eval data")
        nll, tokens, seqs = (float(sum(x)) for x in zip(*jax.device_get(sums)))
        loss = reduce_sft(nll, tokens, reduction=self._reduction, num_sequences=max(seqs, 1.0))
        return {"eval/loss": float(loss), "eval/nll_per_token": nll / max(tokens, 1.0)}


def build_train_model(mcfg: ModelConfig, dcfg, module=None):
    """The network a run trains (the Decoder unless `module` says otherwise), as `model.*` configures it."""
    extra = {} if module is None else {"module": module}
    return build_model(
        dcfg,
        dtype=mcfg.dtype,
        param_dtype=mcfg.param_dtype,
        remat=mcfg.remat,
        scan_unroll=mcfg.scan_unroll,
        attention_block=mcfg.attention_block,
        **extra,
    )


def run_sft(cfg: SFTConfig) -> dict:
    out_dir = prepare_output_dir(cfg)
    mesh = make_train_mesh(cfg.mesh, cfg.train)
    dcfg, tokenizer = load_model_and_tokenizer(cfg.model)
    model = build_train_model(cfg.model, dcfg)
    log(
        f"model: {dcfg.family}, {dcfg.num_params / 1e6:.1f}M parameters, compute {model.dtype.__name__}; "
        f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} device(s)"
    )

    pipeline = SFTPipeline(
        cfg.data,
        tokenizer,
        batch_size=cfg.train.batch_size // jax.process_count(),
        seed=cfg.train.seed,
        num_epochs=cfg.train.num_epochs,
    )
    stats = pipeline.stats
    log(
        f"data: {stats['conversations']} conversations from {stats['rows_read']} rows "
        f"(skipped: {stats['rows_skipped'] or 'none'}; truncated to {cfg.data.max_seq_len} tokens: "
        f"{stats['conversations_truncated']}); {stats['trained_tokens']} of {stats['tokens']} tokens trained"
    )
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else pipeline.count_batches()
    if total_steps <= 0:
        raise ValueError("the training data yields no full batch: add data or lower train.batch_size")
    tx, schedule = make_optimizer(cfg.optim, total_steps)
    try:
        abstract, shardings = state_layout(model, tx, mesh)
    except ValueError as e:  # a dimension that the mesh does not divide
        raise ConfigError(str(e)) from None

    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), cfg.checkpoint.keep)
    data_iter = pipeline.iterator()

    def fresh_state():
        if cfg.model.path:
            params = load_params(cfg.model.path, model, mesh)
        else:
            params = init_params(model, mesh, jax.random.key(cfg.train.seed))
        return create_state(params, tx, cfg.train.seed, shardings)

    state, start = restore_or_start(ckpt, abstract, shardings, data_iter, fresh_state)
    step_fn = jit_sft_step(
        model, tx, schedule, mesh, shardings, reduction=cfg.train.loss_reduction, accum_steps=cfg.train.grad_accum_steps
    )
    evaluate = Evaluator(cfg, tokenizer, model, mesh, shardings.params)
    logger = MetricsLogger(out_dir, resume_step=start, enabled=jax.process_index() == 0)
    if start == 0 and evaluate.enabled:  # the starting point, so the eval curve shows what training bought
        logger.log(0, evaluate(state.params))
    batch_sharding = shd.batch_sharding(mesh)
    result = train_loop(
        name="sft",
        state=state,
        start=start,
        total_steps=total_steps,
        data_iter=data_iter,
        to_device=lambda hb: {k: jax.make_array_from_process_local_data(batch_sharding, hb[k]) for k in BATCH_KEYS},
        step_fn=step_fn,
        host_stats=host_batch_stats,
        evaluate=evaluate if evaluate.enabled else None,
        eval_every=cfg.train.eval_every,
        log_every=cfg.train.log_every,
        ckpt=ckpt,
        checkpoint_every=cfg.checkpoint.every_steps,
        logger=logger,
        show=("loss", "learning_rate"),
    )

    return finish_run(cfg, out_dir, result, pipeline.stats, exporter=hf.export_hf, dcfg=dcfg, tokenizer=tokenizer)
