"""Chat templates, message validation and SFT encoding with label masks (open-instruct
`dataset_processor.py` `CHAT_TEMPLATES["tulu"]`, `finetune.py` `encode_sft_example`).

Two templates: `tulu` (the Tülu 3 format, the default for training and for our exports) and `model` (the
Jinja template stored with the tokenizer, for talking to a stock instruct model in its own format; see
`tulu_jax.data.model_chat` for how its trained spans are derived). A conversation is rendered once to a
string with the char spans of every trained reply (plus its end of turn), and a single tokenization with
offsets turns them into a token mask. For `tulu` this equals the reference's prefix re-tokenization
(tested on the real Llama-3 tokenizer) without tokenizing each prefix again.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tulu_jax.data.model_chat import model_chat_template, render_model_chats

ROLES = ("system", "user", "assistant")

# Jinja form of `render_tulu`, stored in tokenizer_config.json so `apply_chat_template` agrees with it.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)


class DataError(ValueError):
    """A bad input row. The message names file, line/row and field; `reason` is a short counter key."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def validate_messages(row: Any, where: str) -> list[dict[str, str]]:
    """Checks one data row and returns its messages as plain `{"role", "content"}` dicts.

    `where` is prefixed to every error, e.g. "train.jsonl line 7".
    """

    def fail(field: str, what: str, reason: str):
        raise DataError(f"{where}: field '{field}': {what}", reason)

    if not isinstance(row, Mapping):
        fail("<row>", f"expected a JSON object, got {type(row).__name__}", "not_an_object")
    if "messages" not in row:
        fail("messages", "missing", "missing_messages")
    messages = row["messages"]
    if isinstance(messages, np.ndarray):  # Parquet/Arrow may hand lists back as arrays.
        messages = messages.tolist()
    if not isinstance(messages, (list, tuple)):
        fail("messages", f"expected a list of messages, got {type(messages).__name__}", "messages_not_list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            fail(
                f"messages[{i}]",
                f"expected an object with 'role' and 'content', got {type(msg).__name__}",
                "bad_message",
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            fail(f"messages[{i}].role", f"unknown role {role!r} (expected system/user/assistant)", "unknown_role")
        if not isinstance(content, str):
            fail(f"messages[{i}].content", f"expected a string, got {type(content).__name__}", "non_string_content")
        if role == "assistant" and not content.strip():
            fail(f"messages[{i}].content", "empty assistant reply", "empty_assistant_reply")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        fail("messages", "no assistant turn", "no_assistant_turn")
    return out


def render_tulu_with_spans(
    messages: Sequence[Mapping[str, str]], eos_token: str, add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Renders the Tülu template; also returns the [start, end) char spans of trained text
    (each assistant reply's content plus its EOS, not the header and not the "\\n" after EOS)."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(text: str, trained: bool = False):
        nonlocal pos
        if trained:
            spans.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)

    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "assistant":
            emit("<|assistant|>\n")
            emit(content + eos_token, trained=True)
            if i < len(messages) - 1:
                emit("\n")
        elif role in ("system", "user"):
            emit(f"<|{role}|>\n{content}\n")
        else:
            raise ValueError(f"unknown role {role!r}")
    if add_generation_prompt:
        emit("<|assistant|>\n")
    return "".join(parts), spans


def render_tulu(messages: Sequence[Mapping[str, str]], eos_token: str, add_generation_prompt: bool = False) -> str:
    """The exact `tulu` chat template of open-instruct (`dataset_processor.py`). No BOS."""
    return render_tulu_with_spans(messages, eos_token, add_generation_prompt)[0]


def render_tulu_chats(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer,
    *,
    add_generation_prompt: bool = False,
    with_spans: bool = True,
) -> list[tuple[str, list[tuple[int, int]]]]:
    """`render_tulu_with_spans` of every conversation, with the tokenizer's EOS (the `tulu` template)."""
    return [render_tulu_with_spans(m, tokenizer.eos_token, add_generation_prompt) for m in conversations]


# Chat templates by name (`DataFilesConfig.chat_template`): batched renderers
# `(conversations, tokenizer, *, add_generation_prompt, with_spans) -> [(text, trained char spans)]`.
TEMPLATES: dict[str, Callable[..., list[tuple[str, list[tuple[int, int]]]]]] = {
    "tulu": render_tulu_chats,
    "model": render_model_chats,
}


def render_chats(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer,
    template: str = "tulu",
    *,
    add_generation_prompt: bool = False,
    with_spans: bool = True,
) -> list[tuple[str, list[tuple[int, int]]]]:
    """(text, [start, end) char spans of trained text) of every conversation under chat template
    `template`: "tulu" (open-instruct's Tülu format with the tokenizer's EOS) or "model" (the tokenizer's
    own Jinja template; spans derived as `tulu_jax.data.model_chat` documents). `with_spans=False` skips
    the spans (empty lists). Raises ValueError for an unknown template or role, InputError for a `model`
    template the conversation cannot be rendered or masked with."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {list(TEMPLATES)}")
    return TEMPLATES[template](
        conversations, tokenizer, add_generation_prompt=add_generation_prompt, with_spans=with_spans
    )


def check_chat_template(tokenizer, template: str, name: str = "data.chat_template") -> None:
    """Fails early for a template the tokenizer cannot serve: `model` with a tokenizer that stores no
    chat template -> InputError naming `name` (config key or flag) and the tokenizer's folder."""
    if template == "model":
        model_chat_template(tokenizer, name)


def spans_to_token_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose char range [s, e) overlaps a trained span (an empty range counts at s)."""
    mask = np.zeros(len(offsets), np.int32)
    if len(offsets) == 0:
        return mask
    starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    for s, e in spans:
        mask |= ((starts < e) & (ends > s)).astype(np.int32)
    return mask


def encode_chats(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer,
    max_seq_len: int,
    template: str = "tulu",
) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Batched `encode_chat` under chat template `template` ("tulu" or "model", see `render_chats`): per
    conversation (int32 ids [<= max_seq_len], int32 0/1 loss mask of the same length, whether it was
    truncated)."""
    rendered = render_chats(conversations, tokenizer, template)
    enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids = np.asarray(ids, np.int32)
        mask = spans_to_token_mask(np.asarray(offsets, np.int64).reshape(-1, 2), spans)
        out.append((ids[:max_seq_len], mask[:max_seq_len], len(ids) > max_seq_len))
    return out


def prompt_token_ids(messages: Sequence[Mapping[str, str]], tokenizer, template: str = "tulu") -> list[int]:
    """Token ids of a chat rendered with `template` ("tulu" or "model", see `render_chats`) and the
    assistant header appended (the generation prompt), no special tokens added beyond what the template
    writes: what a sampler continues. For "model" this equals the tokenizer's
    `apply_chat_template(messages, add_generation_prompt=True)`. Raises ValueError for an unknown role or
    template, InputError when a `model` tokenizer has no template or the template refuses the chat."""
    ((text, _),) = render_chats([messages], tokenizer, template, add_generation_prompt=True, with_spans=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(
    messages: Sequence[Mapping[str, str]], tokenizer, max_seq_len: int, template: str = "tulu"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask (1 = trained, not shifted) of one conversation, truncated on the right."""
    ids, mask, _ = encode_chats([messages], tokenizer, max_seq_len, template)[0]
    return ids, mask
