"""SFT and preference data: chat templates (tulu, model), validated readers, and the Grain pipelines."""

from tulu_jax.data.chat import (
    TULU_CHAT_TEMPLATE,
    DataError,
    check_chat_template,
    encode_chat,
    encode_chats,
    render_chats,
    render_tulu,
    validate_messages,
)
from tulu_jax.data.pipeline import DataConfig, SFTPipeline, bundled_file, resolve_files
from tulu_jax.data.preference import (
    PreferenceDataConfig,
    PreferencePipeline,
    bundled_prefs_file,
    encode_preference_files,
    iter_preference_pairs,
    parse_preference_row,
    resolve_pref_files,
)
from tulu_jax.data.sources import iter_conversations
from tulu_jax.data.tokenizer import load_tokenizer, pad_token_id

__all__ = [
    "TULU_CHAT_TEMPLATE",
    "DataConfig",
    "DataError",
    "PreferenceDataConfig",
    "PreferencePipeline",
    "SFTPipeline",
    "bundled_file",
    "bundled_prefs_file",
    "check_chat_template",
    "encode_chat",
    "encode_chats",
    "encode_preference_files",
    "iter_conversations",
    "iter_preference_pairs",
    "load_tokenizer",
    "pad_token_id",
    "parse_preference_row",
    "render_chats",
    "render_tulu",
    "resolve_files",
    "resolve_pref_files",
    "validate_messages",
]
