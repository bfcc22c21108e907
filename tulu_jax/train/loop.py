"""The training loop shared by SFT, DPO and the reward model: the stateful shell around a pure jitted step.

It owns what every trainer needs the same way: the mesh check, resume-or-start, feeding host batches
to devices, overlapping step N's dispatch with step N-1's metric read-back, NaN stops, periodic eval,
Orbax checkpoints that include the data iterator's state, metrics.jsonl/TensorBoard and the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import yaml
from tqdm import tqdm

from tulu_jax import configlib
from tulu_jax import sharding as shd
from tulu_jax.configlib import ConfigError
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.metrics import MetricsLogger


def log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(f"[tulu_jax] {msg}")


def prepare_output_dir(cfg) -> str:
    """Creates output_dir and records the run's full config there."""
    out_dir = os.path.abspath(cfg.output_dir)
    os.makedirs(out_dir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(configlib.to_dict(cfg), f, sort_keys=False)
    return out_dir


def make_train_mesh(mesh_cfg, train_cfg, what: str = "rows"):
    """The device mesh, after checking each micro-batch splits evenly over the data-parallel devices."""
    try:
        mesh = shd.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = train_cfg.batch_size // train_cfg.grad_accum_steps
    if micro % dp:
        raise ConfigError(
            f"train.batch_size / train.grad_accum_steps = {micro} {what} per micro-batch is not "
            f"divisible by the data-parallel size data*fsdp = {dp}"
        )
    return mesh


def write_summary(out_dir: str, summary: dict) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        log(json.dumps(summary, default=str))


def finish_run(cfg, out_dir: str, result: LoopResult, data_stats: dict, *, exporter: Callable, dcfg, tokenizer) -> dict:
    """Exports the final parameters to OUTPUT_DIR/hf when `cfg.export.enabled` (`exporter` is
    `hf.export_hf` or `hf.export_reward_hf`) and writes summary.json."""
    summary = {
        "final_step": result.step,
        "final_loss": result.last_metrics.get("loss"),
        "final_eval": {k: v for k, v in result.last_metrics.items() if k.startswith("eval/")},
        "output_dir": out_dir,
        "data": data_stats,
    }
    if cfg.export.enabled:
        hf_dir = os.path.join(out_dir, "hf")
        summary["hf_export"] = exporter(result.state.params, dcfg, hf_dir, tokenizer=tokenizer, dtype=cfg.export.dtype)
    write_summary(out_dir, summary)
    return summary


@dataclass
class LoopResult:
    state: Any
    step: int  # the last step taken (== start when nothing was left to do)
    last_metrics: dict[str, float]


def train_loop(
    *,
    name: str,
    state,
    start: int,
    total_steps: int,
    data_iter: Iterator,
    to_device: Callable[[dict[str, np.ndarray]], Any],
    step_fn: Callable,
    host_stats: Callable[[dict[str, np.ndarray]], dict[str, float]],
    evaluate: Callable[[Any], dict[str, float]] | None,
    eval_every: int,
    log_every: int,
    ckpt: Checkpointer,
    checkpoint_every: int,
    logger: MetricsLogger,
    show: tuple[str, ...] = ("loss",),
    extra_metrics: Callable[[int], dict[str, float]] | None = None,
) -> LoopResult:
    """Runs steps start+1..total_steps (or until the data ends) and checkpoints the last one.

    `host_stats` gives per-batch host-side figures; its "tokens" entry turns into tokens_per_s.
    `extra_metrics(step)` adds figures such as the epoch. `evaluate(params)` runs every `eval_every`
    steps (> 0) and at the end. A non-finite loss stops the run before that step is checkpointed.
    """
    lead = jax.process_index() == 0
    bar = tqdm(total=total_steps, initial=start, desc=name, disable=not lead, dynamic_ncols=True)
    last: dict[str, float] = {}
    pending = None
    clock = time.perf_counter()

    def report(pending):
        nonlocal clock
        step, metrics, stats, eval_metrics = pending
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for that step
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"loss is {metrics['loss']} at step {step}; the last good checkpoint is "
                f"{ckpt.latest_step()} in {ckpt.directory}"
            )
        metrics.update(eval_metrics)
        now = time.perf_counter()
        metrics.update({k: v for k, v in stats.items() if k != "tokens"})
        metrics["tokens_per_s"] = stats.get("tokens", 0.0) / max(now - clock, 1e-9)
        if extra_metrics is not None:
            metrics.update(extra_metrics(step))
        clock = now
        if step % log_every == 0 or step == total_steps:
            logger.log(step, metrics)
        post = {k: f"{metrics[k]:.4g}" for k in show if k in metrics}
        post["tok_s"] = f"{metrics['tokens_per_s']:.0f}"
        bar.set_postfix(post)
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
            state, metrics = step_fn(state, to_device(host_batch))
            if pending is not None:  # read step N-1's metrics only after step N is dispatched
                report(pending)
            due = evaluate is not None and ((eval_every > 0 and step % eval_every == 0) or step == total_steps)
            pending = (step, metrics, host_stats(host_batch), evaluate(state.params) if due else {})
            if checkpoint_every > 0 and step % checkpoint_every == 0:
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
    return LoopResult(state=state, step=step, last_metrics=last)


def restore_or_start(ckpt: Checkpointer, abstract, shardings, data_iter, fresh_state: Callable[[], Any]):
    """(state, start step): the latest checkpoint with the data iterator rewound to it, or a fresh state."""
    start = ckpt.latest_step()
    if start is None:
        return fresh_state(), 0
    state, data_state, _ = ckpt.restore(abstract, shardings)
    data_iter.set_state(data_state)
    log(f"resumed from {ckpt.directory}/{start}")
    return state, start
