"""SFT data: the Tülu chat template, validated readers, and the Grain pipeline."""

from tulu_jax.data.chat import (
    TULU_CHAT_TEMPLATE,
    DataError,
    encode_chat,
    encode_chats,
    render_tulu,
    validate_messages,
)
from tulu_jax.data.pipeline import DataConfig, SFTPipeline, bundled_file, resolve_files
from tulu_jax.data.sources import iter_conversations
from tulu_jax.data.tokenizer import load_tokenizer, pad_id

__all__ = [
    "TULU_CHAT_TEMPLATE",
    "DataConfig",
    "DataError",
    "SFTPipeline",
    "bundled_file",
    "encode_chat",
    "encode_chats",
    "iter_conversations",
    "load_tokenizer",
    "pad_id",
    "render_tulu",
    "resolve_files",
    "validate_messages",
]
