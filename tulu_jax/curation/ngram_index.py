"""An in-memory index of the evaluation instances' n-gram hashes, matched against batches of documents.

Replaces the Elasticsearch index of open-instruct `decontamination/search.py`, the other way round: the
(small) evaluation side is indexed and the (large) training side is streamed past it in batches, every
step a NumPy array operation over all the batch's tokens (hash every window, a bitset pre-filter, a binary
search in the sorted hash table, then the coverage of each (document, instance) pair that shares a hash).

Scores from `NgramIndex.match` come from 64-bit hashes: a collision can only add a window, never remove
one, so a hashed score is >= the exact one (`ngrams.coverage`). The false-hit rate is tiny (each training
window collides with one of E distinct evaluation n-grams with probability about E / 2**64: 1e8 windows
against 5e6 n-grams expect 3e-5 false windows in all), and callers re-score exactly the pairs whose hashed
score passes their threshold, so decisions do not depend on hashes at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tulu_jax.curation.ngrams import token_table, window_hashes


class _LengthTable:
    """The windows of length m of the instances scored with that window length: sorted distinct hashes
    `keys` uint64 [H], and for key k its occurrences indptr[k]:indptr[k + 1] of (instance int64, start
    position int64), sorted by instance then position."""

    def __init__(self, m: int, hashes: np.ndarray, instance: np.ndarray, position: np.ndarray):
        self.m = m
        order = np.lexsort((position, instance, hashes))
        hashes, self.instance, self.position = hashes[order], instance[order], position[order]
        self.keys, starts = np.unique(hashes, return_index=True)
        self.indptr = np.append(starts, len(hashes)).astype(np.int64)


class NgramIndex:
    """The n-grams of tokenized evaluation instances (`ngrams.coverage` semantics, vectorised).

    instances: one int array of token ids per instance, ids in [1, vocab_size) (0 is reserved for tokens
    no instance has); n: the n-gram length; seed: of the hash letters (`ngrams.token_table`).
    An instance of L >= n tokens is indexed by its L - n + 1 n-grams; one of 0 < L < n tokens by its whole
    sequence (one window of length L); an empty one never matches. Raises ValueError for n < 1 or an id
    out of range."""

    def __init__(self, instances: Sequence[np.ndarray], n: int, vocab_size: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self.lengths = np.array([len(x) for x in instances], dtype=np.int64)
        self.table = token_table(vocab_size, seed)
        flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in instances] + [np.zeros(0, np.int64)])
        if len(flat) and (flat.min() < 1 or flat.max() >= vocab_size):
            raise ValueError(f"token ids must lie in [1, {vocab_size}), got [{flat.min()}, {flat.max()}]")
        self.tables: list[_LengthTable] = []
        window = np.minimum(self.lengths, n)
        for m in np.unique(window[window > 0]):
            self.tables.append(self._table(instances, int(m), np.flatnonzero(window == m)))
        # Pre-filter: a bitset over the top bits of the hashes, about 32 bits per key (~3% pass by chance),
        # so that the binary search only sees few windows.
        keys = np.concatenate([t.keys for t in self.tables] + [np.zeros(0, np.uint64)])
        self.bits = int(np.clip(np.ceil(np.log2(max(len(keys), 1) * 32)), 10, 32))
        self.bitset = np.zeros(2**self.bits // 8, dtype=np.uint8)
        slot = keys >> np.uint64(64 - self.bits)
        np.bitwise_or.at(self.bitset, slot >> np.uint64(3), np.left_shift(1, slot & np.uint64(7)).astype(np.uint8))

    def _table(self, instances, m: int, members: np.ndarray) -> _LengthTable:
        ids = [np.asarray(instances[i], dtype=np.int64) for i in members]
        flat, starts = join(ids)
        hashes, valid = window_hashes(flat, m, self.table)
        pos = np.flatnonzero(valid)
        owner = np.searchsorted(starts, pos, side="right") - 1
        return _LengthTable(m, hashes[pos], members[owner].astype(np.int64), pos - starts[owner])

    def _passes_bitset(self, hashes: np.ndarray) -> np.ndarray:
        slot = hashes >> np.uint64(64 - self.bits)
        byte = self.bitset[slot >> np.uint64(3)]
        return (byte >> (slot & np.uint64(7)).astype(np.uint8)) & 1 == 1

    def match(self, documents: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (document, instance) pair sharing at least one indexed window, with the instance's hashed
        score against the document.

        documents: int arrays of token ids (0 for tokens that no instance has). Returns (doc int64 [K],
        instance int64 [K], score float64 [K] in (0, 1]), sorted by document then instance."""
        return self.match_joined(*join(documents))

    def match_joined(self, flat: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`match` on documents already joined as `join` does: flat int64 [T], starts int64 [D] (document
        d is flat[starts[d]:starts[d + 1]]; 0s inside it, such as separators between turns, end windows)."""
        out = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))]
        for table in self.tables:
            out.append(self._match_table(table, flat, starts))
        doc, inst, score = (np.concatenate(x) for x in zip(*out))
        order = np.lexsort((inst, doc))
        return doc[order], inst[order], score[order]

    def _match_table(self, table: _LengthTable, flat: np.ndarray, starts: np.ndarray):
        hashes, valid = window_hashes(flat, table.m, self.table)
        pos = np.flatnonzero(valid)
        pos = pos[self._passes_bitset(hashes[pos])]
        key = np.searchsorted(table.keys, hashes[pos])
        key = np.minimum(key, len(table.keys) - 1)
        hit = table.keys[key] == hashes[pos]
        pos, key = pos[hit], key[hit]
        doc = np.searchsorted(starts, pos, side="right") - 1
        # A document holding the same window twice covers nothing more.
        pairs = np.unique(doc * len(table.keys) + key)
        doc, key = pairs // len(table.keys), pairs % len(table.keys)
        # Expand each (document, key) to the key's occurrences in the instances.
        counts = table.indptr[key + 1] - table.indptr[key]
        first = np.repeat(table.indptr[key] - np.cumsum(counts) + counts, counts)
        occ = first + np.arange(counts.sum())
        doc, inst, start = np.repeat(doc, counts), table.instance[occ], table.position[occ]
        order = np.lexsort((start, inst, doc))
        doc, inst, start = doc[order], inst[order], start[order]
        # Union of the windows [start, start + m) per (document, instance) group.
        new_group = np.ones(len(doc), dtype=bool)
        new_group[1:] = (doc[1:] != doc[:-1]) | (inst[1:] != inst[:-1])
        gap = np.full(len(doc), table.m, dtype=np.int64)
        gap[:-1] = np.where(new_group[1:], table.m, np.minimum(np.diff(start), table.m))
        heads = np.flatnonzero(new_group)
        covered = np.add.reduceat(gap, heads) if len(heads) else np.zeros(0, np.int64)
        inst = inst[heads]
        return doc[heads], inst, covered / self.lengths[inst]


def join(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [sum(len) + len(arrays)], starts int64 [len(arrays)]): the arrays one after another, each
    followed by a 0 so that no window spans two of them."""
    lengths = np.array([len(a) + 1 for a in arrays], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    flat = np.zeros(int(lengths.sum()), dtype=np.int64)
    for s, a in zip(starts, arrays):
        flat[s : s + len(a)] = a
    return flat, starts
