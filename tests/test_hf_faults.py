"""Hugging Face folders we must read exactly as transformers does, or refuse with a one-line error: attention
biases (o_proj included), checkpoint tensors the model would not use, config.json settings we do not
implement, keys left to transformers' defaults, and broken or missing folders."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import COMMON, FAMILIES, f32_atol, make_hf_model, model_reductions
from safetensors.numpy import load_file, save_file

from tulu_jax.configlib import ConfigError
from tulu_jax.models import hf
from tulu_jax.models.config import HF_DEFAULTS, DecoderConfig, from_hf_config, to_hf_config
from tulu_jax.models.loading import build_model, load_params
from tulu_jax.sharding import make_mesh

HF_CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "olmo2": transformers.Olmo2Config,
}
SEQ_LEN = 24
_DROP = object()  # _edit_config: remove the key


def _single():
    return make_mesh(devices=jax.devices()[:1])


def _ours_logits(path, ids):
    cfg = hf.load_hf_config(path)
    model = build_model(cfg)
    params = load_params(path, model, _single())
    return cfg, model, params, np.asarray(model.apply({"params": params}, jnp.asarray(ids)))


def _assert_logits_match(torch_model, ours, ids):
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    tol = f32_atol(float(np.abs(ref).max()), model_reductions(ids.shape[1]))
    np.testing.assert_allclose(ours, ref, atol=tol, rtol=0)


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    with open(file, "w") as f:
        json.dump(config, f)
    return file


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_attention_bias_includes_o_proj(family, tmp_path):
    """attention_bias: true gives q, k, v AND o_proj biases in transformers' Llama and OLMo 2."""
    src = str(tmp_path / "src")
    torch_model = make_hf_model(family, src, attention_bias=True)
    assert torch_model.model.layers[0].self_attn.o_proj.bias is not None
    ids = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, SEQ_LEN))
    cfg, model, params, ours = _ours_logits(src, ids)
    assert cfg.qkv_bias and cfg.o_bias
    assert cfg.num_params == torch_model.num_parameters()
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["self_attn"]["o_bias"][1]),
        torch_model.model.layers[1].self_attn.o_proj.bias.detach(),
    )
    _assert_logits_match(torch_model, ours, ids)

    # Export writes the o_proj biases back: transformers loads the folder and computes the same logits.
    out = hf.export_hf(params, cfg, str(tmp_path / "out"))
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert again.config.attention_bias is True
    _assert_logits_match(again, ours, ids)


def test_unused_checkpoint_tensor_is_an_error(tmp_path):
    make_hf_model("llama", str(tmp_path))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(COMMON["hidden_size"], np.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    model = build_model(hf.load_hf_config(str(tmp_path)))
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(tmp_path))}: checkpoint tensor model\.layers\.0\.self_attn\.o_proj\.bias"
    ):
        load_params(str(tmp_path), model, _single())


def test_extra_layers_in_checkpoint_are_an_error(tmp_path):
    make_hf_model("qwen2", str(tmp_path))
    _edit_config(str(tmp_path), num_hidden_layers=COMMON["num_hidden_layers"] - 1)
    model = build_model(hf.load_hf_config(str(tmp_path)))
    with pytest.raises(ConfigError, match=r"checkpoint tensor model\.layers\.1\.\S+ \(and \d+ more\) is not used"):
        load_params(str(tmp_path), model, _single())


def test_missing_checkpoint_tensor_is_an_error(tmp_path):
    make_hf_model("olmo2", str(tmp_path))
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    model = build_model(hf.load_hf_config(str(tmp_path)))
    with pytest.raises(ConfigError, match=r"has no tensor model\.layers\.1\.self_attn\.q_norm\.weight"):
        load_params(str(tmp_path), model, _single())


def test_tied_checkpoint_may_store_an_equal_lm_head(tmp_path):
    """Tied checkpoints sometimes also store lm_head.weight; equal to the embedding it is harmless, different
    it would make transformers and us disagree about which one is the head."""
    make_hf_model("qwen2", str(tmp_path))  # tied
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, file, metadata={"format": "pt"})
    model = build_model(hf.load_hf_config(str(tmp_path)))
    load_params(str(tmp_path), model, _single())
    tensors["lm_head.weight"][0, 0] += 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="checkpoint tensor lm_head.weight is not used"):
        load_params(str(tmp_path), model, _single())


# (family, config.json changes, the key the error must name). Each is a setting transformers applies.
UNSUPPORTED = [
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("olmo2", {"hidden_act": "relu"}, "hidden_act"),
    ("qwen2", {"attention_dropout": 0.1}, "attention_dropout"),
    (
        "llama",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": _DROP},
        "rope_scaling.rope_type",
    ),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters.rope_type"),
    ("olmo2", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type"),
    ("qwen2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "layer_types": _DROP},
        "use_sliding_window",
    ),  # fmt: skip
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("llama", {"model_type": "mistral"}, "model_type"),
]


@pytest.mark.parametrize("family, changes, key", UNSUPPORTED, ids=[f"{f}-{k}" for f, _, k in UNSUPPORTED])
def test_unimplemented_config_settings_are_refused(family, changes, key, tmp_path):
    make_hf_model(family, str(tmp_path))
    file = _edit_config(str(tmp_path), **changes)
    if key == "use_sliding_window":  # transformers does slide a layer with these settings
        assert "sliding_attention" in transformers.AutoConfig.from_pretrained(str(tmp_path)).layer_types
    with pytest.raises(ConfigError, match=rf"^{re.escape(file)}: {re.escape(key)}\S*=.* is not supported") as e:
        hf.load_hf_config(str(tmp_path))
    assert "\n" not in str(e.value)


def test_sliding_window_on_but_covering_no_layer_is_accepted(tmp_path):
    """Qwen2 only slides layers >= max_window_layers; with none of them, transformers' model is full attention."""
    torch_model = make_hf_model("qwen2", str(tmp_path), use_sliding_window=True, max_window_layers=28)
    assert set(torch_model.config.layer_types) == {"full_attention"}
    ids = np.random.default_rng(1).integers(0, COMMON["vocab_size"], (1, SEQ_LEN))
    _assert_logits_match(torch_model, _ours_logits(str(tmp_path), ids)[3], ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_missing_keys_take_transformers_defaults(family):
    """HF_DEFAULTS against the installed transformers config classes, key by key and through from_hf_config."""
    config_cls = HF_CONFIG_CLASSES[family]
    defaults = config_cls()
    rope = defaults.rope_parameters
    for key, value in HF_DEFAULTS[family].items():
        if key == "rope_theta":
            assert rope["rope_type"] == "default" and rope["rope_theta"] == value
        elif key == "num_key_value_heads" and value is None:  # "as many as the query heads"
            assert defaults.num_key_value_heads == defaults.num_attention_heads
        elif key == "sliding_window":  # Qwen2Config clears it unless use_sliding_window
            assert config_cls.__dataclass_fields__[key].default == value
        else:
            assert getattr(defaults, key) == value, key
    minimal = {
        "model_type": family,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
    }  # fmt: skip  (Qwen2 defaults to 32 KV heads)
    theirs = config_cls(**minimal)
    ours = from_hf_config(minimal)
    assert ours.tie_embeddings == theirs.tie_word_embeddings
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.head_dim == getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )


LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)  # fmt: skip


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_scaling": LLAMA3_ROPE, "rope_theta": 5e5},  # transformers 4's keys
        {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}},  # transformers 5's
        {"rope_scaling": LLAMA3_ROPE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},  # both
        {"rope_scaling": None, "rope_theta": 5e5},
    ],
)
def test_rope_keys_read_like_transformers(rope):
    minimal = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 4}  # fmt: skip
    theirs = transformers.LlamaConfig(**minimal, **json.loads(json.dumps(rope))).rope_parameters
    ours = from_hf_config({**minimal, **rope})
    assert ours.rope_theta == theirs["rope_theta"]
    if theirs["rope_type"] == "default":
        assert ours.rope_scaling is None
    else:
        assert theirs["rope_type"] == "llama3"
        assert ours.rope_scaling == {k: float(theirs[k]) for k in ours.rope_scaling}
        assert set(ours.rope_scaling) == set(LLAMA3_ROPE) - {"rope_type"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_without_tie_key_loads_like_transformers(family, tmp_path):
    """No tie_word_embeddings in config.json: every supported family's transformers class leaves the head
    untied, and so must we (tying would silently replace the checkpoint's lm_head by the embedding)."""
    torch_model = make_hf_model(family, str(tmp_path), tie_word_embeddings=False)
    _edit_config(str(tmp_path), tie_word_embeddings=_DROP)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert reloaded.config.tie_word_embeddings is False
    ids = np.random.default_rng(2).integers(0, COMMON["vocab_size"], (1, SEQ_LEN))
    cfg, _, params, ours = _ours_logits(str(tmp_path), ids)
    assert not cfg.tie_embeddings and "lm_head" in params
    assert cfg.num_params == torch_model.num_parameters()
    _assert_logits_match(torch_model, ours, ids)


def test_export_refuses_an_unknown_dtype(tmp_path):
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=16)  # fmt: skip
    with pytest.raises(ConfigError, match="export dtype 'int8' is not one of"):
        hf.write_hf_folder({}, {}, cfg, {}, str(tmp_path / "out"), dtype="int8")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_export_refuses_bias_layouts_the_family_cannot_express():
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=16)  # fmt: skip
    with pytest.raises(ConfigError, match="'llama' cannot be exported with qkv_bias=True, o_bias=False"):
        to_hf_config(dataclasses.replace(cfg, qkv_bias=True))
    with pytest.raises(ConfigError, match="'qwen2' cannot be exported with qkv_bias=False"):
        to_hf_config(dataclasses.replace(cfg, family="qwen2"))


# ---- broken folders: one line naming the path and what is missing, never a transformers traceback ----


def _folder(tmp_path, family="llama"):
    path = str(tmp_path / "model")
    make_hf_model(family, path)
    return path


def _load_both(path):
    cfg = hf.load_hf_config(path)
    model = build_model(cfg)
    return load_params(path, model, _single())


def _raises_one_line(exc, pattern, fn, *args):
    with pytest.raises(exc, match=pattern) as e:
        fn(*args)
    assert "\n" not in str(e.value) and "Repo id" not in str(e.value)


def test_missing_folder(tmp_path):
    path = str(tmp_path / "nope")
    _raises_one_line(FileNotFoundError, rf"model folder {re.escape(path)} does not exist", hf.load_hf_config, path)
    _raises_one_line(FileNotFoundError, rf"model folder {re.escape(path)} does not exist", hf.checkpoint_has, path, "x")


def test_path_is_a_file(tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"x")
    _raises_one_line(ConfigError, rf"model path {file} is not a folder", hf.load_hf_config, str(file))


def test_no_config_json(tmp_path):
    path = _folder(tmp_path)
    os.remove(os.path.join(path, "config.json"))
    _raises_one_line(FileNotFoundError, rf"{path}/config.json not found", hf.load_hf_config, path)


@pytest.mark.parametrize(
    "content, pattern", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")]
)
def test_invalid_config_json(tmp_path, content, pattern):
    path = _folder(tmp_path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(content)
    _raises_one_line(ConfigError, rf"{path}/config.json: {pattern}", hf.load_hf_config, path)


def test_unreadable_config_json(tmp_path):
    path = _folder(tmp_path)
    file = os.path.join(path, "config.json")
    os.chmod(file, 0)
    try:
        if os.access(file, os.R_OK):
            pytest.skip("running with privileges that read any file (root)")
        _raises_one_line(ConfigError, rf"{file}: cannot read it \(Permission denied\)", hf.load_hf_config, path)
    finally:
        os.chmod(file, 0o644)


def test_config_json_missing_an_architecture_key(tmp_path):
    path = _folder(tmp_path)
    file = _edit_config(path, hidden_size=_DROP)
    _raises_one_line(ConfigError, rf"{file}: missing key\(s\) hidden_size", hf.load_hf_config, path)


def test_no_safetensors(tmp_path):
    path = _folder(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    _raises_one_line(FileNotFoundError, rf"no model.safetensors or model.safetensors.index.json in {path}$", _load_both,
                     path)  # fmt: skip
    open(os.path.join(path, "pytorch_model.bin"), "wb").close()
    _raises_one_line(FileNotFoundError, r"it has pytorch_model.bin: convert to safetensors", _load_both, path)


def test_index_names_a_missing_shard(tmp_path):
    path = _folder(tmp_path)
    names = list(load_file(os.path.join(path, "model.safetensors")))
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}, f)
    _raises_one_line(FileNotFoundError, r"model-00001-of-00001.safetensors not found", _load_both, path)


def test_corrupt_safetensors(tmp_path):
    path = _folder(tmp_path)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    _raises_one_line(ConfigError, rf"{path}/model.safetensors: not a readable safetensors file", _load_both, path)
