"""The supervised loop of SFT, DPO and the reward model: one batch, one jitted step, repeated.

It is a short composition of pieces any trainer can use on its own (a PPO trainer, whose step is
rollouts plus several updates, composes them differently): `reporter.MetricsReporter` (deferred metric
read-back, non-finite stop), `checkpoint.Checkpointer` (any pytree of states plus the data iterator),
`cadence` (when evaluation and checkpoints fall due), and `restore_or_start` / `finish_run` here.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from tulu_jax.configlib import ConfigError
from tulu_jax.data.chat import TULU_CHAT_TEMPLATE
from tulu_jax.multihost import broadcast_object, process_zero_decides, process_zero_value
from tulu_jax.train.cadence import checkpoint_due, eval_due
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.metrics import MetricsLogger
from tulu_jax.train.reporter import MetricsReporter, log


@dataclass
class LoopResult:
    """What `train_loop` hands back: the final state, the last step taken, the step it started from and
    the last logged metrics (floats by name)."""

    state: Any
    step: int  # the last step taken (== start when nothing was left to do)
    last_metrics: dict[str, float]
    start: int = 0  # the step this process started (or resumed) from


def restore_or_start(
    ckpt: Checkpointer, abstract, shardings, data_iter, fresh_state: Callable[[], Any], total_steps: int | None = None
):
    """(state, start step): the latest checkpoint with the data iterator rewound to it, or `fresh_state()`.
    `abstract`/`shardings` describe the saved pytree (any tree of states). ConfigError when the checkpoint
    is past `total_steps` or does not fit this run's states (another model or optimizer in output_dir)."""
    latest = ckpt.latest_step()
    start = process_zero_value(-1 if latest is None else latest)  # every host resumes from the same step
    if start < 0:
        return fresh_state(), 0
    where = f"output_dir: {os.path.dirname(ckpt.directory)}"
    if total_steps is not None and start > total_steps:
        raise ConfigError(
            f"{where} holds a checkpoint at step {start}, past this run's {total_steps} steps; use a new "
            f"output_dir (or raise train.max_steps to continue it)"
        )
    try:
        state, data_state, _ = ckpt.restore(abstract, shardings, step=start)
    except (ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        ckpt.close()  # stop Orbax's background workers now, or they die noisily at interpreter exit
        raise ConfigError(
            f"{where} holds a checkpoint (step {start}) of another model or optimizer ({first}); use a new "
            f"output_dir, or delete {ckpt.directory} to start over"
        ) from None
    data_iter.set_state(data_state)
    log(f"resumed from {ckpt.directory}/{start}")
    return state, start


def make_reporter(name: str, cfg, out_dir: str, *, start: int, total_steps: int, ckpt: Checkpointer, show):
    """The reporter of a supervised run: metrics.jsonl/TensorBoard from process 0, every
    `cfg.train.log_every` steps, naming the latest checkpoint when a step goes non-finite."""
    return MetricsReporter(
        name=name,
        start=start,
        total_steps=total_steps,
        logger=MetricsLogger(out_dir, resume_step=start, enabled=jax.process_index() == 0),
        log_every=cfg.train.log_every,
        show=show,
        last_good=lambda: f"{ckpt.latest_step()} in {ckpt.directory}",
    )


def train_loop(
    *,
    state,
    start: int,
    total_steps: int,
    data_iter: Iterator,
    to_device: Callable[[dict[str, np.ndarray]], Any],
    step_fn: Callable,
    host_stats: Callable[[dict[str, np.ndarray]], dict[str, float]],
    evaluate: Callable[[Any], dict[str, float]] | None,
    eval_every: int,
    ckpt: Checkpointer,
    checkpoint_every: int,
    reporter: MetricsReporter,
    extra_metrics: Callable[[int], dict[str, float]] | None = None,
) -> LoopResult:
    """Runs steps start+1..total_steps (or until the data ends) and checkpoints the last one.

    `step_fn(state, device_batch) -> (state, metrics)`; `host_stats(host_batch)` gives host-side figures
    (its "tokens" entry becomes tokens_per_s); `extra_metrics(step)` adds e.g. the epoch; `evaluate(params)`
    runs when `cadence.eval_due`. A non-finite loss or gradient norm stops the run before that step is
    checkpointed (reporter.NonFiniteError).
    """
    step = start
    try:
        for step in range(start + 1, total_steps + 1):
            try:
                host_batch = next(data_iter)
            except StopIteration:
                step -= 1
                break
            data_state = data_iter.get_state()
            state, metrics = step_fn(state, to_device(host_batch))
            extra = extra_metrics(step) if extra_metrics is not None else {}
            due = evaluate is not None and eval_due(step, eval_every, total_steps)
            late = (lambda s=state: evaluate(s.params)) if due else None
            reporter.submit(step, metrics, host=host_stats(host_batch), extra=extra, late=late)  # reports step - 1
            if due:  # report now: the evaluation waits for this step anyway, and must not delay the next one
                reporter.flush()
            if checkpoint_due(step, checkpoint_every):
                reporter.flush()  # check this step's loss first: never checkpoint a non-finite state
                ckpt.save(step, state, data_state)
        reporter.flush()
        if step > start and ckpt.latest_step() != step:
            ckpt.save(step, state, data_iter.get_state())
        ckpt.wait()
    finally:
        reporter.close()
        ckpt.close()
    return LoopResult(state=state, step=step, last_metrics=dict(reporter.last), start=start)


def write_summary(out_dir: str, summary: dict) -> None:
    """Writes OUTPUT_DIR/summary.json (process 0 only; the others return) and logs it as one JSON line."""
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        log(json.dumps(summary, default=str))


def trained_template_tokenizer(tokenizer, chat_template: str):
    """The tokenizer to export: one whose stored chat template is the format the run trained in, so
    `--chat-template model` (eval, generation, vLLM's chat endpoint) talks to the export in that format.
    A run in the `tulu` format from a model whose tokenizer stores another template (e.g. a Qwen2 instruct
    model's ChatML) exports a copy carrying the Tülu template; `model` runs keep the tokenizer's own."""
    if tokenizer is None or chat_template != "tulu" or tokenizer.chat_template == TULU_CHAT_TEMPLATE:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = TULU_CHAT_TEMPLATE
    return tokenizer


def finish_run(cfg, out_dir: str, result: LoopResult, data_stats: dict, *, exporter: Callable, dcfg, tokenizer) -> dict:
    """Exports the final parameters to OUTPUT_DIR/hf when `cfg.export.enabled` (`exporter` is
    `hf.export_hf` or `hf.export_reward_hf`) and writes summary.json. A run that found its work already done
    (restarted after it finished) keeps the summary and export it wrote then."""
    done = os.path.join(out_dir, "summary.json")
    # process 0's view of the file: every process must take the same branch (the export is collective)
    if result.step == result.start and result.start > 0 and process_zero_decides(os.path.exists(done)):
        log(f"nothing to do: {out_dir} already holds the finished run (step {result.step}); kept its summary.json")
        if jax.process_index() != 0:
            return broadcast_object(None)  # process 0's copy: this host's view of the file may lag
        with open(done) as f:
            return broadcast_object(json.load(f))
    summary = {
        "final_step": result.step,
        "final_loss": result.last_metrics.get("loss"),
        "final_eval": {k: v for k, v in result.last_metrics.items() if k.startswith("eval/")},
        "output_dir": out_dir,
        "data": data_stats,
    }
    if cfg.export.enabled:
        hf_dir = os.path.join(out_dir, "hf")
        tokenizer = trained_template_tokenizer(tokenizer, cfg.data.chat_template)
        summary["hf_export"] = exporter(result.state.params, dcfg, hf_dir, tokenizer=tokenizer, dtype=cfg.export.dtype)
    write_summary(out_dir, summary)
    return summary
