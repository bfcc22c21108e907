"""The SFT input pipeline: read -> validate -> encode (eagerly, once) -> Grain shuffle/repeat/pack/batch.

Encoding happens up front, so bad rows fail before training starts, the counters in `stats` are
exact, and the Grain pipeline only slices numpy arrays (its state is a few integers, so resume is
exact and cheap). Every process builds the same *global* stream of batch_size * process_count rows
and keeps its own slice: all hosts then see the same number of steps, even with packing.
"""

import copy
import functools
import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grain
import numpy as np

from tulu_jax.data.chat import TEMPLATES, DataError, encode_chats
from tulu_jax.data.sources import ON_BAD_ROW, iter_conversations
from tulu_jax.data.tokenizer import pad_id

_ENCODE_CHUNK = 512  # conversations per tokenizer call (fast tokenizers batch in Rust)


@dataclass(frozen=True, kw_only=True)
class DataFilesConfig:
    """What every data section has: files, row length, bad-row policy, shuffling, template, readers.
    `bundled` names the asset folder used when no training files are given."""

    bundled: ClassVar[str] = "tiny_chat"

    train_files: tuple[str, ...] = field(
        default=(),
        metadata={"help": "training data: .jsonl, .parquet or datasets.save_to_disk folders; empty = the bundled set"},
    )
    eval_files: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "evaluation data, same formats; empty = the bundled eval split if train_files is empty, "
            "else no evaluation"
        },
    )
    max_seq_len: int = field(
        default=256,
        metadata={
            "help": "tokens per row (preference pairs: per side); longer examples are cut on the right (pairs lose "
            "the end of the reply, never the prompt)"
        },
    )
    on_bad_row: str = field(
        default="error",
        metadata={"help": "'error': stop at the first invalid row; 'skip': skip it and count it in stats"},
    )
    shuffle: bool = field(default=True, metadata={"help": "shuffle examples (seeded, reshuffled each epoch)"})
    chat_template: str = field(default="tulu", metadata={"help": "chat template name (only 'tulu')"})
    num_workers: int = field(
        default=0, metadata={"help": "Grain read threads and prefetch; 0 = read in the calling thread"}
    )

    def __post_init__(self):
        for name in ("train_files", "eval_files"):  # YAML gives lists; keep the config hashable.
            object.__setattr__(self, name, tuple(str(p) for p in getattr(self, name)))
        if self.on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {self.on_bad_row!r}")
        if self.chat_template not in TEMPLATES:
            raise ValueError(f"unknown chat_template {self.chat_template!r}; known: {sorted(TEMPLATES)}")
        if self.max_seq_len < 1 or self.num_workers < 0:
            raise ValueError(f"need max_seq_len >= 1 and num_workers >= 0, got {self}")


@dataclass(frozen=True, kw_only=True)
class DataConfig(DataFilesConfig):
    """SFT data: conversations with `messages` (bundled: tiny_chat)."""

    pack: bool = field(
        default=True,
        metadata={"help": "pack several conversations per row (first-fit), with segment ids and restarting positions"},
    )


def bundled_file(split: str, name: str = "tiny_chat") -> str:
    """Path of a bundled data set's split ("train" or "eval")."""
    return str(importlib.resources.files("tulu_jax") / "assets" / name / f"{split}.jsonl")


def resolve_files(cfg: DataFilesConfig, split: str) -> tuple[str, ...]:
    """The files of `split`, falling back to the config's bundled set when no training files are given."""
    if split == "train":
        return cfg.train_files or (bundled_file("train", cfg.bundled),)
    if split == "eval":
        return cfg.eval_files or (() if cfg.train_files else (bundled_file("eval", cfg.bundled),))
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def run_inputs(
    cfg: DataFilesConfig,
    batch_size: int,
    num_epochs: int,
    files: Sequence[str] | None,
    process_index: int | None,
    process_count: int | None,
) -> tuple[tuple[str, ...], int, int]:
    """A pipeline's checked arguments: (training files, process index, process count), the files
    defaulting to the config's and the processes to JAX's."""
    if batch_size < 1 or num_epochs < 1:
        raise ValueError(f"need batch_size >= 1 and num_epochs >= 1, got {batch_size}, {num_epochs}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    files = tuple(str(p) for p in (resolve_files(cfg, "train") if files is None else files))
    if not files:
        raise ValueError("a data pipeline needs at least one data file")
    return files, process_index, process_count


class _Encoded:
    """Random-access store of encoded conversations: flat token/mask arrays plus offsets."""

    def __init__(self, ids: list[np.ndarray], masks: list[np.ndarray]):
        self.offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        self.masks = (np.concatenate(masks) if masks else np.zeros(0)).astype(np.int8)  # 0/1: a byte is enough

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.ids[s:e], "loss_mask": self.masks[s:e]}


def encode_files(
    files: Sequence[str], tokenizer, *, max_seq_len: int, on_bad_row: str, template: str
) -> tuple[_Encoded, dict[str, Any]]:
    """Reads, validates and encodes all conversations; returns the store and its counters."""
    stats: dict[str, Any] = {"rows_read": 0, "rows_skipped": {}}
    ids, masks, truncated = [], [], 0
    chunk: list = []

    def flush():
        nonlocal truncated
        for row_ids, row_mask, cut in encode_chats(chunk, tokenizer, max_seq_len, template):
            if not row_mask.any():  # The reference drops rows with no trained label (spec §2.2 step 4).
                stats["rows_skipped"]["no_trained_tokens"] = stats["rows_skipped"].get("no_trained_tokens", 0) + 1
                continue
            truncated += cut
            ids.append(row_ids)
            masks.append(row_mask)
        chunk.clear()

    for messages in iter_conversations(files, on_bad_row, stats):
        chunk.append(messages)
        if len(chunk) == _ENCODE_CHUNK:
            flush()
    flush()
    store = _Encoded(ids, masks)
    stats.update(
        conversations=len(store),
        conversations_truncated=truncated,
        tokens=int(len(store.ids)),
        trained_tokens=int(store.masks.sum()),
    )
    if not len(store):
        raise DataError(f"{', '.join(files)}: no conversation with a trained token", "empty_dataset")
    return store, stats


def _pad_row(example: dict[str, np.ndarray], *, length: int, pad: int) -> dict[str, np.ndarray]:
    """One conversation per row, right padded (the unpacked layout)."""
    n = len(example["input_ids"])
    out = {k: np.zeros(length, np.int32) for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
    out["input_ids"][:] = pad
    out["input_ids"][:n] = example["input_ids"]
    out["loss_mask"][:n] = example["loss_mask"]
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n)
    return out


def _rename_packed(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "input_ids": packed["input_ids"].astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.int32),
        "segment_ids": packed["input_ids_segment_ids"].astype(np.int32),
        "positions": packed["input_ids_positions"].astype(np.int32),
    }


def slice_rows(batch: dict[str, np.ndarray], *, start: int, size: int) -> dict[str, np.ndarray]:
    return {k: v[start : start + size] for k, v in batch.items()}


class SFTPipeline:
    """Batches of [batch_size, max_seq_len] int32 arrays: input_ids, loss_mask, segment_ids, positions.

    batch_size counts rows on this process. The run ends after num_epochs; a last incomplete batch is
    dropped. `process_index`/`process_count` default to JAX's (multi-host sharding).
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        *,
        batch_size: int,
        seed: int,
        num_epochs: int,
        files: Sequence[str] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.files, process_index, process_count = run_inputs(
            cfg, batch_size, num_epochs, files, process_index, process_count
        )
        self.cfg, self.batch_size, self.seed, self.num_epochs = cfg, batch_size, seed, num_epochs
        self._store, self._stats = encode_files(
            self.files, tokenizer, max_seq_len=cfg.max_seq_len, on_bad_row=cfg.on_bad_row, template=cfg.chat_template
        )
        self._dataset = self._build(pad_id(tokenizer), process_index, process_count)
        self._num_batches: int | None = None

    def _build(self, pad: int, process_index: int, process_count: int) -> grain.IterDataset:
        cfg, length = self.cfg, self.cfg.max_seq_len
        global_rows = self._global_rows = self.batch_size * process_count
        ds = grain.MapDataset.source(self._store)
        if cfg.shuffle:  # Shuffle before repeat: grain reseeds the shuffle for every epoch.
            ds = ds.shuffle(seed=self.seed % 2**32)
        ds = ds.repeat(self.num_epochs)
        read = grain.ReadOptions(num_threads=cfg.num_workers, prefetch_buffer_size=4 * cfg.num_workers)
        it = ds.to_iter_dataset(read)
        if cfg.pack:
            # One bin per global row: each first-fit flush fills exactly one global batch.
            it = grain.experimental.FirstFitPackIterDataset(
                it,
                length_struct={"input_ids": length, "loss_mask": length},
                num_packing_bins=global_rows,
                seed=self.seed,
                shuffle_bins=cfg.shuffle,
                meta_features=("loss_mask",),
                padding_struct={"input_ids": pad, "loss_mask": 0},
            )
            it = it.map(_rename_packed)
        else:
            it = it.map(functools.partial(_pad_row, length=length, pad=pad))
        it = it.batch(global_rows, drop_remainder=True)
        if process_count > 1:
            it = it.map(functools.partial(slice_rows, start=process_index * self.batch_size, size=self.batch_size))
        return it

    def iterator(self) -> grain.DatasetIterator:
        """A fresh iterator from the start; `get_state()`/`set_state()` give exact resume."""
        return iter(self._dataset)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters over the files (one epoch, all processes): rows_read, rows_skipped (by reason),
        conversations, conversations_truncated, tokens, trained_tokens."""
        return copy.deepcopy(self._stats)

    def count_batches(self) -> int:
        """Batches the whole run yields (for the LR schedule). Iterates once when packing."""
        if self._num_batches is None:
            if self.cfg.pack:
                self._num_batches = sum(1 for _ in self.iterator())
            else:
                self._num_batches = len(self._store) * self.num_epochs // self._global_rows
        return self._num_batches
