"""The Tülu chat template and label masks (open-instruct `dataset_processor.py`, `finetune.py`), on the tiny
and the real Llama-3 tokenizer."""

import numpy as np
import pytest

from tulu_jax.data import encode_chat, render_tulu
from tulu_jax.data.chat import spans_to_token_mask

EOS = "<|end_of_text|>"
U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731

# (messages, add_generation_prompt, rendered text), as open-instruct's template renders them.
SPEC_EXAMPLES = [
    ([U("What is 2+2?"), A("4")], False, f"<|user|>\nWhat is 2+2?\n<|assistant|>\n4{EOS}"),
    (
        [S("S"), U("A"), A("B"), U("C"), A("D")],
        False,
        f"<|system|>\nS\n<|user|>\nA\n<|assistant|>\nB{EOS}\n<|user|>\nC\n<|assistant|>\nD{EOS}",
    ),
    ([U("What is 2+2?")], True, "<|user|>\nWhat is 2+2?\n<|assistant|>\n"),
]

# Multi-turn and system conversations with awkward text for the prefix re-tokenization comparison.
MASK_EXAMPLES = [
    [U("What is 2+2?"), A("4")],
    [S("You are terse."), U("Hi!"), A("Hello."), U("Sum 17 and 25?"), A("17 + 25 = 42.")],
    [U("Write code."), A("```python\ndef f(x):\n    return x  # ok\n```"), U("Thanks"), A(" Sure thing!")],
    [S("Réponds en français."), U("Café ☕?"), A("Oui — un café. 🙂"), U("  spaces  "), A("Trailing\n")],
    [U("a"), A("b"), U("c"), A("d"), U("trailing user turn")],
    [S("sys"), S("second system"), U("x?"), A("(y)"), U("Ok")],
]


def prefix_retokenization_mask(messages, tokenizer) -> np.ndarray:
    """The reference's masking (open-instruct `encode_sft_example`): non-assistant spans from prefix token counts."""
    eos = tokenizer.eos_token

    def n_tokens(msgs, gen=False):
        return len(tokenizer(render_tulu(msgs, eos, gen), add_special_tokens=False)["input_ids"])

    labels = np.ones(n_tokens(messages), np.int32)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else n_tokens(messages[:i])
        next_is_assistant = i + 1 < len(messages) and messages[i + 1]["role"] == "assistant"
        labels[start : n_tokens(messages[: i + 1], gen=next_is_assistant)] = 0
    return labels


@pytest.mark.parametrize("messages, gen, expected", SPEC_EXAMPLES)
def test_render_matches_spec_examples(messages, gen, expected):
    assert render_tulu(messages, EOS, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("which", ["tiny_tokenizer", "llama3_tokenizer"])
def test_tokenizer_chat_template_renders_spec_examples(which, request):
    tok = request.getfixturevalue(which)
    assert tok.eos_token == EOS
    for messages, gen, expected in SPEC_EXAMPLES:
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == expected
    for messages in MASK_EXAMPLES:
        assert tok.apply_chat_template(messages, tokenize=False) == render_tulu(messages, EOS)


@pytest.mark.parametrize("which", ["tiny_tokenizer", "llama3_tokenizer"])
def test_encoding_has_no_bos_and_matches_hf(which, request):
    tok = request.getfixturevalue(which)
    messages, _, text = SPEC_EXAMPLES[0]
    ids, mask = encode_chat(messages, tok, 4096)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    # Same ids as tokenizing the text without special tokens, and as HF's own chat-template path.
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    assert "<|user|>".startswith(tok.decode(ids[:1]))  # starts with the text "<|user|>": no BOS
    if tok.bos_token_id is not None:
        assert tok.bos_token_id not in ids


def test_llama3_ids_eos_and_pad(llama3_tokenizer):
    tok = llama3_tokenizer
    assert tok.convert_tokens_to_ids(EOS) == tok.eos_token_id == 128001
    assert tok.convert_tokens_to_ids("<|begin_of_text|>") == 128000
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 128256 and len(tok) == 128257
    messages = SPEC_EXAMPLES[1][0]
    ids, mask = encode_chat(messages, tok, 4096)
    # EOS is one special token per assistant turn, and both EOS tokens are trained.
    assert (ids == 128001).sum() == 2 and mask[ids == 128001].all()
    assert len(tok("<|user|>", add_special_tokens=False)["input_ids"]) > 1  # plain text, not a special token


@pytest.mark.parametrize("which", ["tiny_tokenizer", "llama3_tokenizer"])
@pytest.mark.parametrize("index", range(len(MASK_EXAMPLES)))
def test_mask_equals_prefix_retokenization(which, index, request):
    tok = request.getfixturevalue(which)
    messages = MASK_EXAMPLES[index]
    ids, mask = encode_chat(messages, tok, 4096)
    reference = prefix_retokenization_mask(messages, tok)
    assert len(reference) == len(ids)
    np.testing.assert_array_equal(mask, reference)


def _masked_runs(ids, mask, tok) -> list[str]:
    """Decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("which", ["tiny_tokenizer", "llama3_tokenizer"])
def test_mask_by_hand(which, request):
    tok = request.getfixturevalue(which)
    ids, mask = encode_chat(SPEC_EXAMPLES[0][0], tok, 4096)
    assert _masked_runs(ids, mask, tok) == ["4" + EOS]
    assert tok.decode(ids[mask == 0]) == "<|user|>\nWhat is 2+2?\n<|assistant|>\n"
    messages = SPEC_EXAMPLES[1][0]
    ids, mask = encode_chat(messages, tok, 4096)
    assert _masked_runs(ids, mask, tok) == ["B" + EOS, "D" + EOS]
    # The "\n" after the first EOS is not trained.
    first_eos = int(np.flatnonzero(ids == tok.eos_token_id)[0])
    assert tok.decode(ids[first_eos + 1 : first_eos + 2]).startswith("\n") and mask[first_eos + 1] == 0


@pytest.mark.parametrize("which", ["tiny_tokenizer", "llama3_tokenizer"])
def test_consecutive_assistant_turns_differ_from_reference(which, request):
    """Known, deliberate difference: between two assistant turns in a row no non-assistant message
    exists, so the reference trains the "\n<|assistant|>\n" between them; we train only each reply
    plus its EOS, as open-instruct does."""
    tok = request.getfixturevalue(which)
    messages = [U("x?"), A("one"), A("two")]
    ids, mask = encode_chat(messages, tok, 4096)
    assert _masked_runs(ids, mask, tok) == ["one" + EOS, "two" + EOS]
    reference = prefix_retokenization_mask(messages, tok)
    assert tok.decode(ids[(reference == 1) & (mask == 0)]) == "\n<|assistant|>\n"


def test_truncation_on_the_right(tiny_tokenizer):
    messages = MASK_EXAMPLES[1]
    ids, mask = encode_chat(messages, tiny_tokenizer, 4096)
    short_ids, short_mask = encode_chat(messages, tiny_tokenizer, 10)
    np.testing.assert_array_equal(short_ids, ids[:10])
    np.testing.assert_array_equal(short_mask, mask[:10])


def test_spans_to_token_mask_overlap_rule():
    offsets = np.array([[0, 2], [2, 5], [5, 5], [5, 9], [9, 10]])
    np.testing.assert_array_equal(spans_to_token_mask(offsets, [(3, 6)]), [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(spans_to_token_mask(offsets, []), [0, 0, 0, 0, 0])
