"""SFT and preference data: chat templates (tulu, model), validated readers, and the Grain pipelines.

Names are imported on first use, so tools that only read rows (`tulu-jax verify`, `eval`'s readers) do not
pull in Grain and JAX through the pipelines."""

import importlib

_HOME = {
    "TULU_CHAT_TEMPLATE": "chat",
    "DataError": "chat",
    "check_chat_template": "chat",
    "encode_chat": "chat",
    "encode_chats": "chat",
    "render_chats": "chat",
    "render_tulu": "chat",
    "validate_messages": "chat",
    "DataConfig": "pipeline",
    "SFTPipeline": "pipeline",
    "bundled_file": "pipeline",
    "resolve_files": "pipeline",
    "PreferenceDataConfig": "preference",
    "PreferencePipeline": "preference",
    "bundled_prefs_file": "preference",
    "encode_preference_files": "preference",
    "iter_preference_pairs": "preference",
    "parse_preference_row": "preference",
    "resolve_pref_files": "preference",
    "iter_conversations": "sources",
    "load_tokenizer": "tokenizer",
    "pad_token_id": "tokenizer",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'tulu_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tulu_jax.data.{_HOME[name]}"), name)
    globals()[name] = value
    return value
