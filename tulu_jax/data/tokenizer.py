"""Loading a tokenizer: a local Hugging Face tokenizer folder, or the bundled tiny one."""

import importlib.resources
import os
from pathlib import Path


def tiny_tokenizer_dir() -> Path:
    """The bundled 1024-token byte-level BPE (trained on tiny_chat by scripts/make_tiny_assets.py)."""
    return Path(str(importlib.resources.files("tulu_jax") / "assets" / "tiny_tokenizer"))


def load_tokenizer(path: str | os.PathLike | None = None):
    """Returns a transformers tokenizer from `path`; None -> the bundled tiny tokenizer.

    The tokenizer must define an EOS token (the Tülu template appends it to every assistant reply).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir() if path is None else path))
    if tok.eos_token is None:
        raise ValueError(f"tokenizer at {path} has no eos_token; the Tülu template needs one")
    return tok


def pad_token_id(tokenizer) -> int:
    """The id written into padding slots of a batch: the tokenizer's pad token, else 0. Padding is always
    masked (segment id 0), so the value never reaches a loss."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
