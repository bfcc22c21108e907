"""RLVR prompts: Tülu's rows {"messages", "ground_truth", "dataset"} read, checked, tokenized once, then drawn in
shuffled batches by a Grain pipeline whose state (a few integers) makes a resumed run draw the same prompts.

As in open-instruct's RLVR data processing (`dataset_processor.py`, `SFTGroundTruthDatasetProcessor`), the
prompt is the chat rendered with the generation prompt (`<|assistant|>\\n` in the Tülu format), and prompts
longer than the limit are dropped (here: skipped and counted). Every ground truth is checked against its
verifier up front (`tulu_jax.rewards.check_ground_truth`), so a row that could never score is a bad row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from tulu_jax.config import RLVRDataConfig
from tulu_jax.data.chat import DataError, prompt_token_ids
from tulu_jax.data.sources import iter_valid_rows


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One tokenized RLVR prompt: `token_ids` (the rendered chat up to the assistant's turn), the verifier
    `dataset` (canonical name) and its `ground_truth`, and `where` (file and line) for messages."""

    token_ids: tuple[int, ...]
    ground_truth: str
    dataset: str
    where: str


def read_prompts(
    files: Sequence[str], tokenizer, *, max_prompt_len: int, on_bad_row: str, template: str, limit: int = 0
) -> tuple[list[Prompt], dict[str, Any]]:
    """(prompts in file order, counters). A bad row (DataError naming file, line and field) stops the read
    under on_bad_row="error", or is skipped and counted; prompts over `max_prompt_len` tokens are always skipped
    and counted (`prompt_too_long`). `limit` > 0 stops after that many prompts. DataError when no prompt is left."""
    from tulu_jax.evaluation.tasks import rlvr_item

    stats: dict[str, Any] = {"rows_read": 0, "rows_skipped": {}}
    prompts: list[Prompt] = []
    rows = iter_valid_rows(files, on_bad_row, stats, lambda row, where: rlvr_item(row, where, 0))
    for item in rows:
        ids = prompt_token_ids(item.messages, tokenizer, template)
        if len(ids) > max_prompt_len:
            stats["rows_skipped"]["prompt_too_long"] = stats["rows_skipped"].get("prompt_too_long", 0) + 1
            continue
        prompts.append(Prompt(tuple(int(t) for t in ids), item.ground_truth, item.dataset, item.where))
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise DataError(
            f"{', '.join(files)}: no usable prompt (skipped: {stats['rows_skipped'] or 'none'}; prompts may have "
            f"at most data.max_seq_len={max_prompt_len} tokens)",
            "empty_dataset",
        )
    counts: dict[str, int] = {}
    for p in prompts:
        counts[p.dataset] = counts.get(p.dataset, 0) + 1
    stats.update(prompts=len(prompts), by_dataset=counts, longest_prompt=max(len(p.token_ids) for p in prompts))
    return prompts, stats


class PromptPipeline:
    """Shuffled batches of prompt indices: each `next()` gives an int64 array [batch_size] of indices into
    `prompts`, reshuffled every epoch (Grain seeds each epoch's permutation from `seed`), the last incomplete
    batch of the run dropped. Every process draws the same global batch (the rollout is one global computation)."""

    def __init__(
        self, cfg: RLVRDataConfig, tokenizer, *, files: Sequence[str], batch_size: int, seed: int, num_epochs: int
    ):
        if batch_size < 1 or num_epochs < 1:
            raise ValueError(f"need batch_size >= 1 and num_epochs >= 1, got {batch_size}, {num_epochs}")
        self.prompts, self._stats = read_prompts(
            files,
            tokenizer,
            max_prompt_len=cfg.max_seq_len,
            on_bad_row=cfg.on_bad_row,
            template=cfg.chat_template,
        )
        self.batch_size, self.num_epochs = batch_size, num_epochs
        ds = grain.MapDataset.range(len(self.prompts))
        if cfg.shuffle:  # shuffle before repeat: Grain draws a new permutation for every epoch
            ds = ds.shuffle(seed=seed % 2**32)
        self._dataset = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True).to_iter_dataset()

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def stats(self) -> dict[str, Any]:
        """rows_read, rows_skipped (reason -> count), prompts, by_dataset (dataset -> prompts), longest_prompt."""
        return dict(self._stats)

    def count_batches(self) -> int:
        """Batches the whole run yields."""
        return len(self.prompts) * self.num_epochs // self.batch_size

    def iterator(self) -> grain.DatasetIterator:
        """A fresh iterator from the start; `get_state()`/`set_state()` give exact resume."""
        return iter(self._dataset)

    def take(self, indices: np.ndarray) -> list[Prompt]:
        """The prompts at `indices` (an int array from the iterator), in that order."""
        return [self.prompts[int(i)] for i in indices]
