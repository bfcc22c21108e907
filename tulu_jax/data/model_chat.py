"""The `model` chat template: a conversation rendered with the Jinja template stored next to the tokenizer
(`chat_template.jinja`, or `tokenizer_config.json`'s "chat_template"), through transformers'
`apply_chat_template`, with the trained char spans derived for SFT and preference encoding.

Most templates carry no `{% generation %}` markers, so the spans come from renderings of prefixes. For
the assistant message k of a conversation rendered in full as F:

  P = render(messages[:k], add_generation_prompt=True)   # everything up to the assistant header
  Q = render(messages[:k + 1])                             # ... up to and including message k

Both must be prefixes of F (a template that rewrites earlier text depending on later messages breaks this
and is refused with an InputError). The segment F[len(P):len(Q)] is what the model emits for message k:
the reply plus whatever the template closes the turn with (`<|im_end|>\\n` for ChatML, `<|eot_id|>` for
Llama 3, EOS + "\\n" for Tülu). The trained span is that segment without its trailing whitespace, so the
end-of-turn token is learnt (the model must learn to stop) and a newline the template adds after it is
not, as the Tülu renderer trains "content + EOS" and not the "\\n" after it. Whitespace that ends the reply
itself (when the template renders the reply verbatim) stays trained. On the Tülu template this gives
exactly `render_tulu_with_spans`' spans.

A conversation that opens with an assistant turn has no prompt to end with a generation header, so its
reply's start cannot be placed: it is refused. The tokenizer-level errors are InputErrors naming
`data.chat_template` (or the flag given to `model_chat_template`).
"""

from collections.abc import Mapping, Sequence

from tulu_jax.inputs import InputError, where

Span = tuple[int, int]


def model_chat_template(tokenizer, name: str = "data.chat_template") -> str:
    """The tokenizer's own chat template (Jinja source). Raises InputError naming `name` (a config key
    or a flag) and the tokenizer's folder when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise InputError(
            f"{where(name, 'model')}: the tokenizer at {tokenizer.name_or_path} has no chat template "
            '(chat_template.jinja or tokenizer_config.json "chat_template")'
        )
    return template


def _render(tokenizer, chats: list[list[Mapping[str, str]]], add_generation_prompt: bool) -> list[str]:
    """apply_chat_template on a batch of chats, as text; a template's own exception becomes an InputError."""
    from jinja2.exceptions import TemplateError

    if not chats:
        return []
    try:
        return tokenizer.apply_chat_template(
            [[dict(m) for m in c] for c in chats], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        raise InputError(
            f"data.chat_template: model: the chat template of the tokenizer at {tokenizer.name_or_path} "
            f"refused a conversation: {' '.join(str(e).split())}"
        ) from None


def _trained_end(segment: str, content: str) -> int:
    """Length of the trained part of a turn's segment: without trailing whitespace, but never cutting
    into the reply when the template renders it verbatim."""
    end = len(segment.rstrip())
    at = segment.find(content)
    return max(end, at + len(content)) if at >= 0 else end


def _spans(tokenizer, messages, full: str, prompts: dict[int, str], turns: dict[int, str]) -> list[Span]:
    """Trained spans of one conversation rendered as `full`; prompts[k] / turns[k] are the renderings of
    messages[:k] with the generation prompt and of messages[:k + 1] (see the module docstring)."""
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, turn = prompts[k], turns[k]
        if not (full.startswith(prompt) and full.startswith(turn) and len(prompt) <= len(turn)):
            part = turn if full.startswith(prompt) else prompt
            at = next((i for i, (a, b) in enumerate(zip(part, full)) if a != b), min(len(part), len(full)))
            raise InputError(
                f"data.chat_template: model: the chat template of the tokenizer at {tokenizer.name_or_path} "
                f"renders the conversation up to messages[{k}] (assistant) differently from the whole "
                f"conversation (at char {at}: {part[at : at + 30]!r} vs {full[at : at + 30]!r}; it rewrites "
                "earlier turns depending on later ones), so the trained tokens cannot be located; use "
                "chat_template=tulu"
            )
        end = _trained_end(full[len(prompt) : len(turn)], m["content"])
        if end == 0:
            raise InputError(
                f"data.chat_template: model: the chat template of the tokenizer at {tokenizer.name_or_path} "
                f"renders nothing for messages[{k}] (assistant): nothing to train"
            )
        spans.append((len(prompt), len(prompt) + end))
    return spans


def render_model_chats(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer,
    *,
    add_generation_prompt: bool = False,
    with_spans: bool = True,
) -> list[tuple[str, list[Span]]]:
    """(text, trained [start, end) char spans) of every conversation, rendered with the tokenizer's own
    template (no special tokens beyond what the template writes, e.g. Llama 3's BOS). `with_spans=False`
    renders the text only (spans empty), which needs no prefix property: what a sampler is prompted with.

    Raises InputError when the tokenizer has no template, when the template raises, breaks the prefix
    property or drops an assistant reply, and when a conversation opens with an assistant turn."""
    model_chat_template(tokenizer)
    convs = [list(c) for c in conversations]
    texts = _render(tokenizer, convs, add_generation_prompt)
    if not with_spans:
        return [(t, []) for t in texts]
    # Every prefix the spans need, rendered in two batched calls (with and without generation prompt).
    keys = []
    for i, msgs in enumerate(convs):
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            if k == 0:
                raise InputError(
                    "data.chat_template: model: a conversation opens with an assistant turn (messages[0]): "
                    "with no prompt before it, the start of the reply cannot be located; drop the row or use "
                    "chat_template=tulu"
                )
            keys.append((i, k))
    prompts = _render(tokenizer, [convs[i][:k] for i, k in keys], True)
    turns = _render(tokenizer, [convs[i][: k + 1] for i, k in keys], False)
    by_conv: list[tuple[dict[int, str], dict[int, str]]] = [({}, {}) for _ in convs]
    for (i, k), prompt, turn in zip(keys, prompts, turns, strict=True):
        by_conv[i][0][k], by_conv[i][1][k] = prompt, turn
    return [
        (text, _spans(tokenizer, msgs, text, *tables)) for msgs, text, tables in zip(convs, texts, by_conv, strict=True)
    ]
