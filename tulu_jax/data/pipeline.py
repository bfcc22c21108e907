"""The SFT input pipeline: read -> validate -> encode (eagerly, once) -> Grain shuffle/repeat/pack/batch.

Encoding happens up front, so bad rows fail before training starts, the counters in `stats` are
exact, and the Grain pipeline only slices numpy arrays (its state is a few integers, so resume is
exact and cheap). Every process builds the same *global* stream of batch_size * process_count rows
and keeps its own slice: all hosts then see the same number of steps, even with packing.
"""

import copy
import functools
import importlib.resources
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from tulu_jax.config import DataConfig, DataFilesConfig
from tulu_jax.data.chat import DataError, encode_chats
from tulu_jax.data.sources import iter_conversations
from tulu_jax.data.tokenizer import pad_token_id

_ENCODE_CHUNK = 512  # conversations per tokenizer call (fast tokenizers batch in Rust)
BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
MIN_TRIMMED_LENGTH = 64


def bundled_file(split: str, name: str = "tiny_chat") -> str:
    """Path of a bundled data set's split ("train" or "eval")."""
    return str(importlib.resources.files("tulu_jax") / "assets" / name / f"{split}.jsonl")


def resolve_files(cfg: DataFilesConfig, split: str) -> tuple[str, ...]:
    """The files of `split` ("train" or "eval"): the configured ones, or the bundled set's split when
    `cfg.use_bundled` is set. Never a fallback: no training files and no `use_bundled` is a ConfigError."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.use_bundled:
        names = (cfg.bundled,) if isinstance(cfg.bundled, str) else cfg.bundled  # RLVR bundles two task sets
        return tuple(bundled_file(split, name) for name in names)
    if split == "train" and not cfg.train_files:
        from tulu_jax.configlib import ConfigError

        raise ConfigError(
            "data.train_files: no training files given (set data.train_files=PATH[,PATH...], or "
            "data.use_bundled=true for the bundled toy set)"
        )
    return cfg.train_files if split == "train" else cfg.eval_files


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
        if not chunk:  # an empty file, or a multiple of the chunk size: nothing to encode
            return
        for row_ids, row_mask, cut in encode_chats(chunk, tokenizer, max_seq_len, template):
            if not row_mask.any():  # The reference drops rows with no trained label (open-instruct `finetune.py`).
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
    """Rows [start, start + size) of every array of `batch` (a process's share of a global batch)."""
    return {k: v[start : start + size] for k, v in batch.items()}


def trimmed_length(longest: int, max_seq_len: int) -> int:
    """The padded length of a batch whose longest side has `longest` tokens: the next power of two (at
    least MIN_TRIMMED_LENGTH), capped at max_seq_len, so a run compiles only a handful of shapes."""
    return min(max_seq_len, max(MIN_TRIMMED_LENGTH, 1 << max(longest - 1, 0).bit_length()))


def trim_padding(batch: dict[str, np.ndarray], *, max_seq_len: int) -> dict[str, np.ndarray]:
    """Drops the padding columns every row of a (global) batch shares; per-pair arrays pass through."""
    length = trimmed_length(int((batch["segment_ids"] > 0).sum(-1).max()), max_seq_len)
    return {k: v[..., :length] if k in BATCH_KEYS else v for k, v in batch.items()}


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
        self._pad = pad_token_id(tokenizer)
        self._dataset = self._build(self._pad, process_index, process_count)
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

    def __len__(self) -> int:
        return len(self._store)

    def ordered_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Every conversation exactly once, in file order, one per row (unpacked, whatever `cfg.pack`):
        [batch_size, max_seq_len] int32 input_ids, loss_mask, segment_ids, positions, plus `valid`
        [batch_size] (1 real row, 0 filler). The last batch is filled with empty rows (segment id 0,
        so no token of theirs is trained or counted) to keep shapes fixed. For held-out evaluation:
        any number of conversations counts completely, packed or not."""
        if batch_size < 1:
            raise ValueError(f"need batch_size >= 1, got {batch_size}")
        n, length = len(self._store), self.cfg.max_seq_len
        empty = _pad_row({"input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.int8)}, length=length, pad=0)
        for start in range(0, n, batch_size):
            rows = [
                _pad_row(self._store[i], length=length, pad=self._pad) if i < n else empty
                for i in range(start, start + batch_size)
            ]
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            batch["valid"] = (np.arange(start, start + batch_size) < n).astype(np.int32)
            yield trim_padding(batch, max_seq_len=length)  # eval rows are short: no compute on shared padding

    def count_batches(self) -> int:
        """Batches the whole run yields (for the LR schedule). Iterates once when packing."""
        if self._num_batches is None:
            if self.cfg.pack:
                self._num_batches = sum(1 for _ in self.iterator())
            else:
                self._num_batches = len(self._store) * self.num_epochs // self._global_rows
        return self._num_batches
