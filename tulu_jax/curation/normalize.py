"""Text normalisation for duplicate detection (Tülu 3 §3, open-instruct's dataset mixing).

Two rows are the same prompt when their user turns read the same after `normalize_text`: Unicode NFKC
(full-width and compatibility forms fold to plain ones), case folding, and runs of whitespace collapsed to one
space with the ends stripped. Punctuation is kept for exact duplicates, because in instruction data it is
often the content ("2+2" vs "2-2", "f(x)" vs "f[x]"); near-duplicate shingles use only the word tokens
(`words`), so that punctuation alone never makes two prompts look different to MinHash.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WORD = re.compile(r"\w+")


def normalize_text(text: str) -> str:
    """`text` NFKC-normalised, case-folded, whitespace collapsed to single spaces and stripped.

    Example: "  Ｈello\\u00a0\\tWORLD\\n" -> "hello world" (full-width H, no-break space, tab, newline)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_key(normalized: str) -> bytes:
    """A 16-byte BLAKE2b digest of an already normalised text: the identity of an exact duplicate. 128 bits,
    so a collision between two different prompts is not a practical concern even over billions of rows."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def words(normalized: str) -> list[str]:
    """The word tokens (`\\w+` runs, Unicode-aware) of a normalised text; punctuation separates words."""
    return _WORD.findall(normalized)


def word_shingles(normalized: str, size: int) -> set[bytes]:
    """The set of `size`-word shingles (consecutive word n-grams, words joined by one space, UTF-8) of a
    normalised text. A text with fewer than `size` words (but at least one) is one shingle, its whole word
    sequence; a text without words gives the empty set. Raises ValueError for size < 1."""
    if size < 1:
        raise ValueError(f"shingle size must be >= 1, got {size}")
    toks = words(normalized)
    if len(toks) <= size:
        return {" ".join(toks).encode("utf-8")} if toks else set()
    return {" ".join(toks[i : i + size]).encode("utf-8") for i in range(len(toks) - size + 1)}
