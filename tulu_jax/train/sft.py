"""The SFT trainer: the stateful shell (data, checkpoints, logging, export) around the pure step."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
import yaml
from tqdm import tqdm

from tulu_jax import configlib
from tulu_jax import sharding as shd
from tulu_jax.config import ModelConfig, SFTConfig
from tulu_jax.configlib import ConfigError
from tulu_jax.data import SFTPipeline, load_tokenizer, resolve_files
from tulu_jax.losses import reduce_sft
from tulu_jax.models import hf
from tulu_jax.models.config import preset
from tulu_jax.models.loading import build_model, init_params, load_params
from tulu_jax.train.checkpoint import Checkpointer
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


def run_sft(cfg: SFTConfig) -> dict:
    out_dir = os.path.abspath(cfg.output_dir)
    lead = jax.process_index() == 0
    os.makedirs(out_dir, exist_ok=True)
    if lead:
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(configlib.to_dict(cfg), f, sort_keys=False)

    try:
        mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_rows = cfg.train.batch_size // cfg.train.grad_accum_steps
    if micro_rows % dp:
        raise ConfigError(
            f"train.batch_size / train.grad_accum_steps = {micro_rows} rows per micro-batch is not "
            f"divisible by the data-parallel size data*fsdp = {dp}"
        )
    dcfg, tokenizer = load_model_and_tokenizer(cfg.model)
    model = build_model(
        dcfg,
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        remat=cfg.model.remat,
        scan_unroll=cfg.model.scan_unroll,
        attention_block=cfg.model.attention_block,
    )
    _log(
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
    _log(
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
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, _ = ckpt.restore(abstract, shardings)
        data_iter.set_state(data_state)
        _log(f"resumed from {ckpt.directory}/{start}")
    else:
        start = 0
        params = (
            load_params(cfg.model.path, model, mesh)
            if cfg.model.path
            else init_params(model, mesh, jax.random.key(cfg.train.seed))
        )
        state = create_state(params, tx, cfg.train.seed, shardings)

    step_fn = jit_sft_step(
        model, tx, schedule, mesh, shardings, reduction=cfg.train.loss_reduction, accum_steps=cfg.train.grad_accum_steps
    )
    evaluate = Evaluator(cfg, tokenizer, model, mesh, shardings.params)
    every = cfg.train.eval_every
    batch_sharding = shd.batch_sharding(mesh)
    logger = MetricsLogger(out_dir, resume_step=start, enabled=lead)
    if start == 0 and evaluate.enabled:  # the starting point, so the eval curve shows what training bought
        logger.log(0, evaluate(state.params))
    bar = tqdm(total=total_steps, initial=start, desc="sft", disable=not lead, dynamic_ncols=True)
    last = {}
    pending = None
    clock = time.perf_counter()

    def report(pending):
        nonlocal clock
        step, metrics, stats, eval_metrics = pending
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for that step
        metrics.update(eval_metrics)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss is {metrics['loss']} at step {step}; the last good checkpoint is "
                f"{ckpt.latest_step()} in {ckpt.directory}"
            )
        now = time.perf_counter()
        metrics["tokens_per_s"] = stats["tokens"] / max(now - clock, 1e-9)
        metrics["packing_efficiency"] = stats["packing_efficiency"]
        clock = now
        if step % cfg.train.log_every == 0 or step == total_steps:
            logger.log(step, metrics)
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}"
        )
        bar.update(1)
        last.update(metrics, step=step)

    step = start
    try:
        for step in range(start + 1, total_steps + 1):
            try:
                host_batch = next(data_iter)
            except StopIteration:
                step -= 1
                break
            data_state = data_iter.get_state()
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, host_batch[k]) for k in BATCH_KEYS}
            state, metrics = step_fn(state, batch)
            if pending is not None:  # read step N-1's metrics only after step N is dispatched
                report(pending)
            due = evaluate.enabled and ((every > 0 and step % every == 0) or step == total_steps)
            pending = (step, metrics, host_batch_stats(host_batch), evaluate(state.params) if due else {})
            if cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0:
                report(pending)  # check this step's loss first: never checkpoint a NaN state
                pending = None
                ckpt.save(step, state, data_state)
        if pending is not None:
            report(pending)
        if step > start and ckpt.latest_step() != step:
            ckpt.save(step, state, data_iter.get_state())
        ckpt.wait()
    finally:
        bar.close()
        logger.close()
        ckpt.close()

    summary = {"final_step": step, "final_loss": last.get("loss"), "output_dir": out_dir, "data": pipeline.stats}
    if cfg.export.enabled:
        hf_dir = hf.export_hf(
            state.params, dcfg, os.path.join(out_dir, "hf"), tokenizer=tokenizer, dtype=cfg.export.dtype
        )
        summary["hf_export"] = hf_dir
    if lead:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        _log(json.dumps(summary, default=str))
    return summary


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(f"[tulu_jax] {msg}")
