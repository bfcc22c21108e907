"""The SFT trainer (Tülu 3 §4; open-instruct `finetune.py`): the stateful shell (data, checkpoints,
logging, export) around the pure step in `sft_step`."""

from __future__ import annotations

import os

import jax

from tulu_jax.config import SFTConfig
from tulu_jax.data import SFTPipeline, resolve_files
from tulu_jax.losses import reduce_sft
from tulu_jax.models import hf
from tulu_jax.train import batches, setup
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.loop import finish_run, make_reporter, restore_or_start, train_loop
from tulu_jax.train.reporter import log
from tulu_jax.train.sft_step import jit_sft_eval, jit_sft_step
from tulu_jax.train.state import create_state


class Evaluator:
    """Loss on the held-out files: every conversation exactly once, in file order, with the training
    loss's reduction (unpacked rows; the last batch is filled with empty rows that count for nothing)."""

    def __init__(self, run: setup.Run):
        cfg = run.cfg
        files = resolve_files(cfg.data, "eval")
        self.enabled = bool(files) and cfg.train.eval_every >= 0
        if not self.enabled:
            return
        self._run = run
        self._pipeline = SFTPipeline(
            cfg.data, run.tokenizer, batch_size=run.global_batch, seed=0, num_epochs=1, files=files
        )
        self._eval = jit_sft_eval(run.model, run.mesh, run.shardings.params, logits_chunk=cfg.model.logits_chunk)
        self._reduction = cfg.train.loss_reduction

    def __call__(self, params) -> dict[str, float]:
        sums = []
        for batch in self._pipeline.ordered_batches(self._run.global_batch):
            local = batches.process_rows(batch, self._run.global_batch)
            sums.append(self._eval(params, batches.to_device(local, self._run.mesh, batches.TOKEN_KEYS)))
        nll, tokens, seqs = (float(sum(x)) for x in zip(*jax.device_get(sums)))
        loss = reduce_sft(nll, tokens, reduction=self._reduction, num_sequences=max(seqs, 1.0))
        return {"eval/loss": float(loss), "eval/nll_per_token": nll / max(tokens, 1.0)}


def run_sft(cfg: SFTConfig) -> dict:
    """Trains, checkpoints and exports as `cfg` says; returns the summary (also in OUTPUT_DIR/summary.json).
    Raises ConfigError/DataError (clean CLI errors) for bad configs and data before any compute."""
    run = setup.prepare(cfg)
    pipeline = SFTPipeline(
        cfg.data,
        run.tokenizer,
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
    run.add_optimizer(setup.run_length(cfg.train, pipeline.count_batches()))

    ckpt = Checkpointer(os.path.join(run.out_dir, "checkpoints"), cfg.checkpoint.keep)
    data_iter = pipeline.iterator()
    state, start = restore_or_start(
        ckpt,
        run.abstract,
        run.shardings,
        data_iter,
        lambda: create_state(run.load_or_init(cfg.model.path), run.tx, cfg.train.seed, run.shardings),
        total_steps=run.total_steps,
    )
    step_fn = jit_sft_step(
        run.model,
        run.tx,
        run.schedule,
        run.mesh,
        run.shardings,
        reduction=cfg.train.loss_reduction,
        accum_steps=cfg.train.grad_accum_steps,
        logits_chunk=cfg.model.logits_chunk,
    )
    evaluate = Evaluator(run)
    reporter = make_reporter(
        "sft", cfg, run.out_dir, start=start, total_steps=run.total_steps, ckpt=ckpt, show=("loss", "learning_rate")
    )
    if start == 0 and evaluate.enabled:  # the starting point, so the eval curve shows what training bought
        reporter.log_now(0, evaluate(state.params))
    result = train_loop(
        state=state,
        start=start,
        total_steps=run.total_steps,
        data_iter=data_iter,
        to_device=lambda hb: batches.to_device(hb, run.mesh, batches.TOKEN_KEYS),
        step_fn=step_fn,
        host_stats=batches.packed_tokens,
        evaluate=evaluate if evaluate.enabled else None,
        eval_every=cfg.train.eval_every,
        ckpt=ckpt,
        checkpoint_every=cfg.checkpoint.every_steps,
        reporter=reporter,
    )
    return finish_run(cfg, run.out_dir, result, stats, exporter=hf.export_hf, dcfg=run.dcfg, tokenizer=run.tokenizer)
