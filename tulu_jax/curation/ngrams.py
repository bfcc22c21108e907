"""Word n-grams for decontamination: tokenizer, vectorised n-gram hashes and the coverage score.

The score follows open-instruct `decontamination/search.py` (`ngram_match`), as used for Tülu 3 (§3,
"decontamination": 8-grams, an evaluation instance counts as contaminated at a score above 0.5): a token of
the evaluation instance is *covered* by a training document when some n-gram of the instance that contains
the token also occurs in the document; the instance's score against the document is covered tokens / all
of its tokens.

Differences from the reference, on purpose:
- Tokenizer: ours is `tokenize` below (NFKC, casefold, then runs of word characters and single
  punctuation marks), not spaCy's `en_core_web_lg` with an Elasticsearch `match_phrase`. spaCy keeps
  "3.14" or "e-mail" whole and splits "don't" into "do" + "n't"; we split all three at the punctuation
  ("3" "." "14"). Elasticsearch's analyzer lowercases and drops punctuation, so there "x + y" matches "x y";
  for us punctuation marks are tokens and must match too. Case, compatibility forms and German sharp s are
  folded ("Straße" = "STRASSE", "ｆｕｌｌ" = "full"); casefolding is not language-specific, so Turkish
  "İ" becomes "i" plus a combining dot above and "İstanbul" does not match "istanbul" (but "ISTANBUL" does).
- A repeated n-gram of the instance covers the tokens of every occurrence (the reference keys its map by
  n-gram text, so only the last occurrence counted).
- An instance shorter than n tokens has no n-gram, and the reference never matches it; the command skips
  it too by default (`decontaminate.Decontaminator`). Here, and under `--short-instances whole`, it is
  one "n-gram" of its own length: a document containing its whole token sequence covers it completely
  (score 1.0), else it scores 0.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Sequence

import numpy as np

# Odd 64-bit multiplier of the polynomial hash (the golden-ratio constant: well mixed bits).
HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@functools.cache
def _token_pattern() -> re.Pattern:
    # Python's \w leaves out combining marks (Devanagari vowel signs, the dot of a casefolded "İ"), which
    # would cut words apart; add every mark of this Python's Unicode tables to the word characters.
    marks, start = [], None
    for c in range(sys.maxunicode + 2):
        is_mark = c <= sys.maxunicode and unicodedata.category(chr(c)).startswith("M")
        if is_mark and start is None:
            start = c
        elif not is_mark and start is not None:
            marks.append(f"\\U{start:08x}-\\U{c - 1:08x}")
            start = None
    word = "\\w" + "".join(marks)
    return re.compile(f"[{word}]+|[^{word}\\s]")


# The same tokens for ASCII text, about 4x faster than the class with all combining marks.
_ASCII_TOKEN = re.compile(r"\w+|[^\w\s]")


def normalize(text: str) -> str:
    """NFKC, casefold, NFKC again (casefolding can leave a decomposed sequence that NFKC recomposes)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def tokenize(text: str) -> list[str]:
    """The tokens of `text` after `normalize`: maximal runs of word characters (letters, digits, "_" and
    combining marks) and every other non-space character alone, in order. "What's 2+2?" ->
    ["what", "'", "s", "2", "+", "2", "?"]."""
    text = normalize(text)
    pattern = _ASCII_TOKEN if text.isascii() else _token_pattern()
    tokens: list[str] = []
    # Most whitespace-separated pieces are one word (isalnum: the letters and digits that \w matches);
    # only the others need the regex, which makes this about 1.5x faster than one findall on the text.
    for piece in text.split():
        if piece.isalnum():
            tokens.append(piece)
        else:
            tokens += pattern.findall(piece)
    return tokens


def token_table(size: int, seed: int = 0) -> np.ndarray:
    """uint64 [size] random values, one per token id, the letters of the polynomial hash. Entry 0 (the id
    of tokens that no evaluation instance has) is 0; windows holding it are never looked up."""
    table = np.random.default_rng(seed).integers(1, 2**64, size=size, dtype=np.uint64, endpoint=False)
    table[0] = 0
    return table


def window_hashes(ids: np.ndarray, m: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every window of `m` consecutive token ids.

    ids: int [N] token ids (0 = a token no evaluation instance has, or a separator between documents).
    Returns (hashes uint64 [W], valid bool [W]) with W = max(N - m + 1, 0): hashes[i] =
    sum_j table[ids[i + j]] * HASH_MULTIPLIER**(m - 1 - j) mod 2**64, and valid[i] = no id 0 in the window.
    Raises ValueError for m < 1."""
    if m < 1:
        raise ValueError(f"window length must be >= 1, got {m}")
    n_windows = max(len(ids) - m + 1, 0)
    letters = table[ids]
    hashes = letters[:n_windows].copy()
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
        for j in range(1, m):
            hashes *= HASH_MULTIPLIER
            hashes += letters[j : j + n_windows]
    zeros = np.concatenate(([0], np.cumsum(ids == 0)))
    valid = zeros[m : m + n_windows] == zeros[:n_windows]
    return hashes, valid


def covered_count(positions: np.ndarray, m: int) -> int:
    """Tokens covered by windows of length `m` starting at sorted, distinct `positions` (int [k]): the
    union length of the intervals [p, p + m)."""
    if len(positions) == 0:
        return 0
    return int(np.minimum(np.diff(positions), m).sum()) + m


def coverage(instance: Sequence, document: Sequence, n: int) -> float:
    """Exact score of one evaluation instance against one document (both token sequences: strings or
    ids): the fraction of the instance's tokens covered by its n-grams that occur in the document (an
    instance shorter than n: 1.0 when the document contains it whole, else 0.0; an empty one: 0.0).
    Raises ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    size = len(instance)
    if size == 0:
        return 0.0
    m = min(n, size)
    instance, document = list(instance), list(document)
    grams = {tuple(document[i : i + m]) for i in range(len(document) - m + 1)}
    hits = [i for i in range(size - m + 1) if tuple(instance[i : i + m]) in grams]
    return covered_count(np.asarray(hits, dtype=np.int64), m) / size
