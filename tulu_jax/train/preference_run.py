"""Set-up shared by the pairwise trainers (DPO, reward model): the common run (`setup.prepare`) plus the
preference data, its step count, and host-to-device feeding of [B, 2, T] pair batches."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from tulu_jax.data.preference import PreferencePipeline
from tulu_jax.models.decoder import Decoder
from tulu_jax.train import batches, setup
from tulu_jax.train.reporter import log


class PreferenceRun:
    """What a pairwise run builds before its loop: `run` (mesh, tokenizer, model, optimizer, state layout)
    and `pipeline` (the training pairs). `module` picks the network (causal LM for DPO, reward model)."""

    def __init__(self, cfg, module: type[nn.Module] = Decoder, describe: str = ""):
        self.cfg = cfg
        self.run = run = setup.prepare(cfg, module=module, what="pairs", describe=describe)
        self.out_dir, self.mesh, self.dcfg, self.tokenizer, self.model = (
            run.out_dir,
            run.mesh,
            run.dcfg,
            run.tokenizer,
            run.model,
        )
        self.global_batch = cfg.train.batch_size
        self.pipeline = self.make_pipeline(files=None, shuffle=cfg.data.shuffle, num_epochs=cfg.train.num_epochs)
        s = self.pipeline.stats
        log(
            f"data: {s['pairs']} pairs from {s['rows_read']} rows (skipped: {s['rows_skipped'] or 'none'}; "
            f"pairs truncated to {cfg.data.max_seq_len} tokens: {s['pairs_truncated']}); "
            f"{s['trained_tokens']} of {s['tokens']} tokens trained"
        )
        run.add_optimizer(setup.run_length(cfg.train, self.pipeline.count_batches()))
        self.total_steps, self.tx, self.schedule = run.total_steps, run.tx, run.schedule
        self.abstract, self.shardings = run.abstract, run.shardings

    def make_pipeline(self, *, files, shuffle: bool, num_epochs: int) -> PreferencePipeline:
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
        return batches.to_device(host_batch, self.mesh, keys)

    def ordered_to_device(self, global_batch: dict[str, np.ndarray], keys) -> dict:
        """A global batch from `ordered_batches` (every process holds all of it) -> global arrays."""
        return self.to_device(batches.process_rows(global_batch, self.global_batch), keys)

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
