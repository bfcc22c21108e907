"""Text normalisation for duplicate detection (Tülu 3 §3, open-instruct's dataset mixing).

Two rows are the same prompt when their user turns read the same after `normalize_text`: Unicode NFKC
(full-width and compatibility forms fold to plain ones), invisible format characters (Unicode category Cf:
zero-width spaces and joiners, soft hyphens, byte-order marks) removed, case folding, and runs of whitespace
collapsed to one space with the ends stripped. Punctuation is kept, because in instruction data it is
often the content ("2+2" vs "2-2", "f(x)" vs "f[x]"): exact duplicates compare it, and near-duplicate
shingles are built from `tokens`, where every punctuation or operator character is a token of its own next
to the `\\w+` words, so "What is 15 + 9?" and "What is 15 - 9?" do not look alike to MinHash.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_TOKEN = re.compile(r"\w+|[^\w\s]")
# Every code point of category Cf (format: U+200B zero-width space, U+00AD soft hyphen, U+FEFF BOM, ...).
# They live in planes 0, 1 and 14 only (planes 2-13 hold ideographs, 15-16 private use): scanning those
# three keeps the import fast.
_DROP_FORMAT = {
    c: None
    for plane in (0, 1, 14)
    for c in range(plane << 16, (plane + 1) << 16)
    if unicodedata.category(chr(c)) == "Cf"
}


def normalize_text(text: str) -> str:
    """`text` NFKC-normalised, without format (Cf) characters, case-folded, whitespace collapsed to single
    spaces and stripped.

    Example: "  Ｈel\\u200blo\\u00a0\\tWORLD\\n" -> "hello world" (full-width H, zero-width space, no-break
    space, tab, newline)."""
    return " ".join(unicodedata.normalize("NFKC", text).translate(_DROP_FORMAT).casefold().split())


def text_key(normalized: str) -> bytes:
    """A 16-byte BLAKE2b digest of an already normalised text: the identity of an exact duplicate. 128 bits,
    so a collision between two different prompts is not a practical concern even over billions of rows."""
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def tokens(normalized: str) -> list[str]:
    """The tokens of a normalised text: `\\w+` runs (Unicode-aware words and numbers) and single punctuation
    or symbol characters; whitespace only separates. Example: "what is 15+9?" -> what, is, 15, +, 9, ?"""
    return _TOKEN.findall(normalized)


def shingles(normalized: str, size: int) -> set[bytes]:
    """The set of `size`-token shingles (consecutive token n-grams, tokens joined by one space, UTF-8) of a
    normalised text. A text with fewer than `size` tokens (but at least one) is one shingle, its whole token
    sequence; an empty text gives the empty set. Raises ValueError for size < 1."""
    if size < 1:
        raise ValueError(f"shingle size must be >= 1, got {size}")
    toks = tokens(normalized)
    if len(toks) <= size:
        return {" ".join(toks).encode("utf-8")} if toks else set()
    return {" ".join(toks[i : i + size]).encode("utf-8") for i in range(len(toks) - size + 1)}
