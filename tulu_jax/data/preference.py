"""Preference pairs for DPO: read -> validate -> encode (eagerly, once) -> Grain shuffle/repeat/batch
(Tülu 3 §5; open-instruct `dpo_tune_cache.py` encoding).

Two row formats are accepted:

- Tülu 3: `chosen` and `rejected` are full message lists that share every turn but the last, which is the
  assistant reply being compared. A `prompt` field next to them (as in the Tülu 3 mixtures) is ignored.
- Split prompt: `prompt` (a string = one user turn, or a message list) plus `chosen` and `rejected`, each a
  reply string or a list holding one assistant message.

Each side is rendered with the chat template and masked exactly like SFT (assistant replies plus EOS).
The pipeline mirrors `SFTPipeline` (global stream, per-process slice, exact resume) but never packs: a
batch holds [B, 2, T] arrays, side 0 chosen and side 1 rejected, plus the pair's id in `index`.
"""

import copy
import functools
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from tulu_jax.config import LABEL_MODES, PreferenceDataConfig
from tulu_jax.data.chat import DataError, render_chats, spans_to_token_mask, validate_messages
from tulu_jax.data.pipeline import BATCH_KEYS, bundled_file, resolve_files, run_inputs, slice_rows, trim_padding
from tulu_jax.data.sources import iter_valid_rows
from tulu_jax.data.tokenizer import pad_token_id

_ENCODE_CHUNK = 256  # pairs per tokenizer call (each pair is two conversations)


def bundled_prefs_file(split: str) -> str:
    """Path of the bundled tiny_prefs split ("train" or "eval")."""
    return bundled_file(split, "tiny_prefs")


resolve_pref_files = resolve_files  # the same fallback rule, to PreferenceDataConfig.bundled


# ---------------------------------------------------------------------------------------------------------
# Row validation


def _as_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value  # Arrow may hand lists back as arrays


def _check_messages(value: Any, name: str, where: str, *, need_assistant: bool = True) -> list[dict[str, str]]:
    """validate_messages for a field other than 'messages': same checks, errors name `name`."""
    try:
        return validate_messages({"messages": value}, where)
    except DataError as e:
        # The no-assistant check runs last, so every message already passed: a prompt may lack one.
        if not need_assistant and e.reason == "no_assistant_turn":
            return [{"role": m["role"], "content": m["content"]} for m in _as_list(value)]
        msg, prefix = str(e), f"{where}: field 'messages"
        if msg.startswith(prefix):
            msg = f"{where}: field '{name}" + msg[len(prefix) :]
        raise DataError(msg, e.reason) from None


def _is_reply(value: Any) -> bool:
    """A bare reply: a string, or a list holding a single assistant message."""
    if isinstance(value, str):
        return True
    return (
        isinstance(value, (list, tuple))
        and len(value) == 1
        and isinstance(value[0], Mapping)
        and value[0].get("role") == "assistant"
    )


def parse_preference_row(row: Any, where: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Validates one row (either format) and returns the full (chosen, rejected) conversations.

    Both end in an assistant reply and share all earlier turns. `where` prefixes every error.
    """

    def fail(name: str, what: str, reason: str):
        raise DataError(f"{where}: field '{name}': {what}", reason)

    if not isinstance(row, Mapping):
        fail("<row>", f"expected a JSON object, got {type(row).__name__}", "not_an_object")
    sides = {}
    for name in ("chosen", "rejected"):
        value = _as_list(row.get(name))
        if value is None:
            fail(name, "missing", f"missing_{name}")
        if not isinstance(value, (str, list, tuple)):
            fail(name, f"expected a reply string or a list of messages, got {type(value).__name__}", "bad_reply")
        sides[name] = value
    prompt = _as_list(row.get("prompt"))

    if prompt is not None and all(_is_reply(v) for v in sides.values()):
        # Split-prompt format: build each conversation as prompt + reply.
        if isinstance(prompt, str):
            turns = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, (list, tuple)):
            turns = _check_messages(prompt, "prompt", where, need_assistant=False)
            if turns and turns[-1]["role"] == "assistant":
                fail(
                    "prompt",
                    "ends with an assistant turn; the compared replies go in 'chosen'/'rejected'",
                    "bad_prompt",
                )
        else:
            fail("prompt", f"expected a string or a list of messages, got {type(prompt).__name__}", "bad_prompt")
        out = []
        for name, value in sides.items():
            if isinstance(value, str):
                if not value.strip():
                    fail(name, "empty assistant reply", "empty_assistant_reply")
                reply = {"role": "assistant", "content": value}
            else:
                reply = _check_messages(value, name, where)[0]
            out.append(turns + [reply])
        return out[0], out[1]

    # Tülu format: two full conversations.
    convs = {}
    for name, value in sides.items():
        if isinstance(value, str):
            other = "rejected" if name == "chosen" else "chosen"
            if prompt is None:
                what = "a reply string needs a 'prompt' field (or give full message lists)"
                fail(name, what, "missing_prompt")
            fail(name, f"a reply string, but '{other}' is a full conversation; give both the same way", "mixed_formats")
        msgs = _check_messages(value, name, where)
        if msgs[-1]["role"] != "assistant":
            fail(name, f"last turn is {msgs[-1]['role']!r}; expected the assistant reply", "final_turn_not_assistant")
        convs[name] = msgs
    chosen, rejected = convs["chosen"], convs["rejected"]
    if chosen[:-1] != rejected[:-1]:
        n = min(len(chosen), len(rejected)) - 1
        first = next((i for i in range(n) if chosen[i] != rejected[i]), n)
        fail("rejected", f"prompt differs from 'chosen' at message {first}", "prompt_mismatch")
    return chosen, rejected


def iter_preference_pairs(
    files: Sequence[str], on_bad_row: str, counts: dict[str, Any]
) -> Iterator[tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """The validated (chosen, rejected) conversations of `files`, in order; see `iter_valid_rows`."""
    return iter_valid_rows(files, on_bad_row, counts, parse_preference_row)


# ---------------------------------------------------------------------------------------------------------
# Encoding


def _encode_full(conversations, tokenizer, template: str) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Untruncated ids, SFT mask (all assistant turns) and the index of the final reply's first trained token."""
    rendered = render_chats(conversations, tokenizer, template)
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
        mask = spans_to_token_mask(offsets, spans)
        # The last span is the final assistant reply (the conversation ends with it).
        final = spans_to_token_mask(offsets, spans[-1:])
        start = int(np.argmax(final)) if final.any() else len(ids)
        out.append((np.asarray(ids, np.int32), mask, start))
    return out


class _PairStore:
    """Random-access store of encoded pairs: flat token/mask arrays, sequence 2i chosen and 2i+1 rejected."""

    def __init__(self, ids: list[np.ndarray], masks: list[np.ndarray]):
        self.offsets = np.cumsum([0] + [len(x) for x in ids], dtype=np.int64)
        self.ids = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
        self.masks = (np.concatenate(masks) if masks else np.zeros(0)).astype(np.int8)

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // 2

    def side(self, i: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [L] int32, loss mask [L] int32) of pair `i`'s side `s` (0 chosen, 1 rejected): views
        into the flat arrays, no copy. IndexError for a pair past the end."""
        a, b = self.offsets[2 * i + s], self.offsets[2 * i + s + 1]
        return self.ids[a:b], self.masks[a:b]

    def __getitem__(self, i: int) -> dict[str, Any]:
        (ci, cm), (ri, rm) = self.side(i, 0), self.side(i, 1)
        return {"index": np.int32(i), "chosen": (ci, cm), "rejected": (ri, rm)}


def encode_preference_files(
    files: Sequence[str], tokenizer, *, max_seq_len: int, on_bad_row: str, template: str, label: str
) -> tuple[_PairStore, dict[str, Any]]:
    """Reads, validates and encodes all pairs; returns the store and its counters."""
    if label not in LABEL_MODES:
        raise ValueError(f"label must be one of {LABEL_MODES}, got {label!r}")
    stats: dict[str, Any] = {"rows_read": 0, "rows_skipped": {}}
    skipped = stats["rows_skipped"]
    ids, masks, truncated = [], [], 0
    chunk: list = []

    def flush():
        nonlocal truncated
        if not chunk:  # an empty file, or a multiple of the chunk size: nothing to encode
            return
        sides = _encode_full([conv for pair in chunk for conv in pair], tokenizer, template)
        for c, r in zip(sides[0::2], sides[1::2]):
            # A prompt that fills the window leaves nothing to compare: count it, as an input-length issue.
            if c[2] >= max_seq_len or r[2] >= max_seq_len:
                skipped["prompt_too_long"] = skipped.get("prompt_too_long", 0) + 1
                continue
            kept = []
            for full_ids, mask, start in (c, r):
                if label == "final":
                    mask = mask.copy()
                    mask[:start] = 0
                kept.append((full_ids[:max_seq_len], mask[:max_seq_len]))
            if not all(m.any() for _, m in kept):  # open-instruct drops such pairs too
                skipped["no_trained_tokens"] = skipped.get("no_trained_tokens", 0) + 1
                continue
            truncated += len(c[0]) > max_seq_len or len(r[0]) > max_seq_len
            for side_ids, side_mask in kept:
                ids.append(side_ids)
                masks.append(side_mask)
        chunk.clear()

    for pair in iter_preference_pairs(files, on_bad_row, stats):
        chunk.append(pair)
        if len(chunk) == _ENCODE_CHUNK:
            flush()
    if chunk:
        flush()
    store = _PairStore(ids, masks)
    stats.update(
        pairs=len(store),
        pairs_truncated=truncated,
        tokens=int(len(store.ids)),
        trained_tokens=int(store.masks.sum()),
    )
    if not len(store):
        raise DataError(f"{', '.join(files)}: no preference pair with a trained token on both sides", "empty_dataset")
    return store, stats


# ---------------------------------------------------------------------------------------------------------
# Batching


def _pad_pair(example: dict[str, Any], *, length: int, pad: int) -> dict[str, np.ndarray]:
    """One pair as [2, length] arrays, each side right padded."""
    out = {k: np.zeros((2, length), np.int32) for k in BATCH_KEYS}
    out["input_ids"][:] = pad
    for s, name in enumerate(("chosen", "rejected")):
        ids, mask = example[name]
        n = len(ids)
        out["input_ids"][s, :n] = ids
        out["loss_mask"][s, :n] = mask
        out["segment_ids"][s, :n] = 1
        out["positions"][s, :n] = np.arange(n)
    out["index"] = np.int32(example["index"])
    return out


class PreferencePipeline:
    """Batches of preference pairs: input_ids, loss_mask, segment_ids, positions as [batch_size, 2, T] int32
    (side 0 chosen, 1 rejected; T = max_seq_len) and `index` [batch_size] int32, the pair's id.

    batch_size counts pairs on this process. The run ends after num_epochs; a last incomplete batch is
    dropped. `process_index`/`process_count` default to JAX's (multi-host sharding).
    """

    def __init__(
        self,
        cfg: PreferenceDataConfig,
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
        self._store, self._stats = encode_preference_files(
            self.files,
            tokenizer,
            max_seq_len=cfg.max_seq_len,
            on_bad_row=cfg.on_bad_row,
            template=cfg.chat_template,
            label=cfg.label,
        )
        self._pad = pad_token_id(tokenizer)
        self._tokenizer_id = {"eos": tokenizer.eos_token, "vocab": len(tokenizer), "pad": self._pad}
        self._global_rows = batch_size * process_count
        self._dataset = self._build(process_index, process_count)
        self._fingerprint: str | None = None

    def _build(self, process_index: int, process_count: int) -> grain.IterDataset:
        cfg = self.cfg
        ds = grain.MapDataset.source(self._store)
        if cfg.shuffle:  # Shuffle before repeat: grain reseeds the shuffle for every epoch.
            ds = ds.shuffle(seed=self.seed % 2**32)
        ds = ds.repeat(self.num_epochs)
        read = grain.ReadOptions(num_threads=cfg.num_workers, prefetch_buffer_size=4 * cfg.num_workers)
        it = ds.to_iter_dataset(read)
        it = it.map(functools.partial(_pad_pair, length=cfg.max_seq_len, pad=self._pad))
        it = it.batch(self._global_rows, drop_remainder=True)
        if cfg.trim_padding:  # on the global batch, so that every process cuts to the same length
            it = it.map(functools.partial(trim_padding, max_seq_len=cfg.max_seq_len))
        if process_count > 1:
            it = it.map(functools.partial(slice_rows, start=process_index * self.batch_size, size=self.batch_size))
        return it

    def iterator(self) -> grain.DatasetIterator:
        """A fresh iterator from the start; `get_state()`/`set_state()` give exact resume."""
        return iter(self._dataset)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters over the files (one epoch, all processes): rows_read, rows_skipped (by reason), pairs,
        pairs_truncated, tokens and trained_tokens (chosen and rejected together)."""
        return copy.deepcopy(self._stats)

    def __len__(self) -> int:
        return len(self._store)

    def count_batches(self) -> int:
        """Batches the whole run yields (for the LR schedule)."""
        return len(self._store) * self.num_epochs // self._global_rows

    def fingerprint(self) -> str:
        """Hex sha256 of the encoded pairs (ids, masks, boundaries) and what shaped them: the key for a
        cache of per-pair values such as reference log-probs. Order and seed do not enter it."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            head = {
                "max_seq_len": self.cfg.max_seq_len,
                "label": self.cfg.label,
                "template": self.cfg.chat_template,
                "tokenizer": self._tokenizer_id,
            }
            h.update(json.dumps(head, sort_keys=True).encode())
            for arr in (self._store.offsets, self._store.ids, self._store.masks):
                h.update(np.ascontiguousarray(arr).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def ordered_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Every pair once, in index order, in the training layout plus `valid` [batch_size] (1 real,
        0 filler). The last batch is filled up with copies of pair 0 so that shapes stay fixed."""
        if batch_size < 1:
            raise ValueError(f"need batch_size >= 1, got {batch_size}")
        n, length = len(self._store), self.cfg.max_seq_len
        for start in range(0, n, batch_size):
            ids = [i if i < n else 0 for i in range(start, start + batch_size)]
            rows = [_pad_pair(self._store[i], length=length, pad=self._pad) for i in ids]
            batch = {k: np.stack([r[k] for r in rows]) for k in (*BATCH_KEYS, "index")}
            batch["valid"] = (np.arange(start, start + batch_size) < n).astype(np.int32)
            yield trim_padding(batch, max_seq_len=length) if self.cfg.trim_padding else batch
