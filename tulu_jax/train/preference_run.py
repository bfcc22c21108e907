"""Setup shared by the pairwise trainers (DPO, reward model): mesh, model, preference data, optimizer,
state layout and host-to-device feeding of [B, 2, T] pair batches."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from tulu_jax import sharding as shd
from tulu_jax.configlib import ConfigError
from tulu_jax.data.preference import PreferencePipeline
from tulu_jax.train.loop import log, make_train_mesh, prepare_output_dir
from tulu_jax.train.optimizer import make_optimizer
from tulu_jax.train.sft import load_model_and_tokenizer
from tulu_jax.train.state import state_layout


def process_rows(batch: dict[str, np.ndarray], global_batch: int) -> dict[str, np.ndarray]:
    """This process's slice of a global host batch (every key is split along its first axis)."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return {k: v[start : start + per] for k, v in batch.items()}


def real_tokens(batch: dict[str, np.ndarray]) -> dict[str, float]:
    return {"tokens": float(np.sum(batch["segment_ids"] > 0))}


class PreferenceRun:
    """What a pairwise run builds before its loop. `build_model(model_cfg, decoder_cfg)` picks the network
    (causal LM for DPO, reward model for RM)."""

    def __init__(self, cfg, build_model: Callable, describe: str = ""):
        self.cfg = cfg
        self.out_dir = prepare_output_dir(cfg)
        self.mesh = make_train_mesh(cfg.mesh, cfg.train, what="pairs")
        self.dcfg, self.tokenizer = load_model_and_tokenizer(cfg.model)
        self.model = build_model(cfg.model, self.dcfg)
        self.global_batch = cfg.train.batch_size
        log(
            f"model: {self.dcfg.family}, {self.dcfg.num_params / 1e6:.1f}M parameters, compute "
            f"{self.model.dtype.__name__}; mesh {dict(self.mesh.shape)} on {jax.device_count()} "
            f"{jax.default_backend()} device(s){describe}"
        )
        self.pipeline = self.make_pipeline(files=None, shuffle=cfg.data.shuffle, num_epochs=cfg.train.num_epochs)
        s = self.pipeline.stats
        log(
            f"data: {s['pairs']} pairs from {s['rows_read']} rows (skipped: {s['rows_skipped'] or 'none'}; "
            f"pairs truncated to {cfg.data.max_seq_len} tokens: {s['pairs_truncated']}); "
            f"{s['trained_tokens']} of {s['tokens']} tokens trained"
        )
        self.total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else self.pipeline.count_batches()
        if self.total_steps <= 0:
            raise ValueError("the preference data yields no full batch: add data or lower train.batch_size")
        self.tx, self.schedule = make_optimizer(cfg.optim, self.total_steps)
        try:
            self.abstract, self.shardings = state_layout(self.model, self.tx, self.mesh)
        except ValueError as e:  # a dimension that the mesh does not divide
            raise ConfigError(str(e)) from None
        self._sharding = shd.batch_sharding(self.mesh)

    def make_pipeline(self, *, files, shuffle: bool, num_epochs: int) -> PreferencePipeline:
        import dataclasses

        return PreferencePipeline(
            dataclasses.replace(self.cfg.data, shuffle=shuffle),
            self.tokenizer,
            batch_size=self.global_batch // jax.process_count(),
            seed=self.cfg.train.seed,
            num_epochs=num_epochs,
            files=files,
        )

    def to_device(self, host_batch: dict[str, np.ndarray], keys) -> dict:
        """Process-local rows of `keys` -> global arrays split over data+fsdp."""
        return {k: jax.make_array_from_process_local_data(self._sharding, host_batch[k]) for k in keys}

    def ordered_to_device(self, global_batch: dict[str, np.ndarray], keys) -> dict:
        """A global batch from `ordered_batches` (every process holds all of it) -> global arrays."""
        return self.to_device(process_rows(global_batch, self.global_batch), keys)

    def epoch(self, step: int) -> dict[str, float]:
        return {"epoch": step * self.global_batch / len(self.pipeline)}


def mean_over_pairs(run: PreferenceRun, pipeline: PreferencePipeline, eval_fn, keys, prepare=None) -> dict:
    """One ordered pass of `eval_fn(device_batch) -> sums` over every pair of `pipeline` (sums must
    include "pairs", the number of real pairs), returned as `eval/<metric>` means over the real pairs.
    `prepare(batch)` may add host-side arrays (e.g. cached reference log-probs) before the transfer."""
    sums = []
    for batch in pipeline.ordered_batches(run.global_batch):
        batch = prepare(batch) if prepare is not None else batch
        sums.append(eval_fn(run.ordered_to_device(batch, keys)))
    totals = {k: sum(float(s[k]) for s in jax.device_get(sums)) for k in sums[0]}
    pairs = max(totals.pop("pairs"), 1.0)
    return {f"eval/{k}": v / pairs for k, v in totals.items()}
