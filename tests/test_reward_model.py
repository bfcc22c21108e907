"""Reward model against Hugging Face *ForSequenceClassification (PyTorch, CPU, float32) on the same weights:
last-token and per-token scores, export roundtrip, start from a causal LM, and sharded loading."""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import COMMON, FAMILIES, f32_atol, make_hf_model, model_reductions

from tulu_jax import sharding as shd
from tulu_jax.configlib import ConfigError
from tulu_jax.data import load_tokenizer
from tulu_jax.models import hf
from tulu_jax.models.config import DecoderConfig
from tulu_jax.models.loading import build_model, load_params
from tulu_jax.models.reward import (
    build_reward_model,
    export_reward_hf,
    init_reward_params,
    last_token_scores,
    load_reward_params,
    reward_pad_token_id,
    reward_param_layout,
)
from tulu_jax.sharding import make_mesh

SEQ_CLS = {
    "llama": transformers.LlamaForSequenceClassification,
    "qwen2": transformers.Qwen2ForSequenceClassification,
    "olmo2": transformers.Olmo2ForSequenceClassification,
}
PAD = 0  # the tiny tokenizer's <pad>, so an export with that tokenizer keeps the same id
LENGTHS = (20, 13, 7, 1)  # right-padded to 20, one row a single token


def _make_hf_rm(family, out_dir, seed=0):
    config_cls, _, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, "pad_token_id": PAD}, **extra, num_labels=1)
    model = SEQ_CLS[family](config).eval()
    with torch.no_grad():  # off the init values so a mix-up shows, and scores well away from zero
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
        model.score.weight.mul_(20.0)
    model.save_pretrained(out_dir)
    return model


def _batch(seed=0, pad=PAD):
    rng = np.random.default_rng(seed)
    t = max(LENGTHS)
    seg = (np.arange(t)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    ids = rng.integers(1, COMMON["vocab_size"], (len(LENGTHS), t))  # real tokens never equal the pad id
    return np.where(seg > 0, ids, pad), seg


def _hf_scores(model, ids, seg):
    """(HF's pooled logits[:, 0], its per-position score head output on the base model's hidden states)."""
    with torch.no_grad():
        pooled = model(torch.tensor(ids), attention_mask=torch.tensor(seg)).logits[:, 0].numpy()
        hidden = model.model(torch.tensor(ids), attention_mask=torch.tensor(seg)).last_hidden_state
        per_token = model.score(hidden)[..., 0].numpy()
    return pooled, per_token


def _ours(model, params, ids, seg, pad=PAD):
    apply = jax.jit(lambda p, x, s: model.apply({"params": p}, x, None, s))
    per_token = apply(params, jnp.asarray(ids), jnp.asarray(seg))
    return np.asarray(last_token_scores(per_token, jnp.asarray(ids), jnp.asarray(seg), pad)), np.asarray(per_token)


def _single():
    return make_mesh(devices=jax.devices()[:1])


def _score_atol(params, seq_len):
    """float32 bound for a score computed two ways: the final hidden state is RMS-normed, so each entry is
    at most sqrt(D) * max|final norm scale|; the score sums D of them times the head, so its magnitude is at
    most that times ||w||_1, and each path's rounding is eps per term of the reductions it went through."""
    h_max = math.sqrt(COMMON["hidden_size"]) * float(jnp.abs(params["model"]["final_norm"]["scale"]).max())
    return f32_atol(h_max * float(jnp.abs(params["score"]).sum()), model_reductions(seq_len))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_rm(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"rm_{request.param}"))
    torch_model = _make_hf_rm(request.param, path)
    cfg = hf.load_hf_config(path)
    model = build_reward_model(cfg)
    params = load_reward_params(path, model, _single())
    return request.param, path, torch_model, model, params


def test_last_token_scores():
    """transformers' rule: the last position whose id is not the pad id (and, here, not padding)."""
    scores = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0], [13.0, 14, 15, 16]])
    seg = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    ids = jnp.asarray([[5, 6, 7, 0], [5, 6, 7, 8], [0, 0, 0, 0], [5, 9, 9, 9]])
    np.testing.assert_array_equal(np.asarray(last_token_scores(scores, ids, seg, 0)), [3.0, 8.0, 9.0, 15.0])
    # Pad id 9 (say the EOS): a trailing 9 is skipped, so row 3 reads position 0, row 1 is unaffected.
    np.testing.assert_array_equal(np.asarray(last_token_scores(scores, ids, seg, 9)), [3.0, 8.0, 9.0, 13.0])
    # Padding columns filled with any id (segment 0) are never read.
    np.testing.assert_array_equal(np.asarray(last_token_scores(scores, ids * 0 + 4, seg, 0)), [3.0, 8.0, 9.0, 15.0])


def test_param_tree_matches_hf_sequence_classification(hf_rm):
    family, _, torch_model, _, params = hf_rm
    assert set(params) == {"model", "score"}
    assert "lm_head" not in params["model"]  # HF's *ForSequenceClassification has none, tied or not
    assert params["score"].shape == (COMMON["hidden_size"], 1)
    np.testing.assert_array_equal(np.asarray(params["score"])[:, 0], torch_model.score.weight.detach().numpy()[0])


def test_scores_match_transformers(hf_rm):
    family, _, torch_model, model, params = hf_rm
    ids, seg = _batch()
    ref_last, ref_tok = _hf_scores(torch_model, ids, seg)
    last, tok = _ours(model, params, ids, seg)
    assert np.abs(ref_last).mean() > 0.1  # the comparison is not between near-zero numbers
    err_last = np.abs(last - ref_last).max()
    real = seg > 0
    err_tok = np.abs(tok[real] - ref_tok[real]).max()
    tol = _score_atol(params, ids.shape[1])
    print(
        f"{family}: max |Δ last-token score| = {err_last:.2e}, max |Δ per-token score| = {err_tok:.2e}, tol {tol:.1e}"
    )
    assert err_last < tol, f"{family}: max |Δ last-token score| = {err_last}"
    assert err_tok < tol, f"{family}: max |Δ per-token score| = {err_tok}"


def test_export_roundtrip(hf_rm, tmp_path):
    family, _, _, model, params = hf_rm
    tokenizer = load_tokenizer(None)
    out = export_reward_hf(params, model.cfg, str(tmp_path / "rm"), tokenizer=tokenizer, max_shard_bytes=100_000)
    assert (tmp_path / "rm" / "model.safetensors.index.json").exists()  # several files
    assert (tmp_path / "rm" / "tokenizer.json").exists()
    assert hf.checkpoint_has(out, "score.weight") and not hf.checkpoint_has(out, "lm_head.weight")

    again = load_reward_params(out, model, _single())
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(torch_model) is SEQ_CLS[family]
    assert torch_model.config.num_labels == 1
    assert torch_model.config.pad_token_id == tokenizer.pad_token_id == PAD
    assert not any("lm_head" in n for n, _ in torch_model.named_parameters())
    ids, seg = _batch(seed=1)
    ref_last, ref_tok = _hf_scores(torch_model, ids, seg)
    last, tok = _ours(model, params, ids, seg)
    err = max(np.abs(last - ref_last).max(), np.abs(tok - ref_tok)[seg > 0].max())
    print(f"{family}: export roundtrip max |Δ score| = {err:.2e}")
    assert err < _score_atol(params, ids.shape[1]), f"{family}: export roundtrip max |Δ score| = {err}"


def test_export_needs_a_pad_id(hf_rm, tmp_path):
    _, _, _, model, params = hf_rm
    cfg = DecoderConfig(**{**model.cfg.__dict__, "pad_token_id": None, "eos_token_id": None})
    with pytest.raises(ConfigError, match="pad_token_id"):
        export_reward_hf(params, cfg, str(tmp_path / "rm"))
    assert not (tmp_path / "rm").exists()


def _tokenizer(pad):
    """The bundled tokenizer with a distinct <pad> (id 0), its EOS as pad (like SmolLM2), or no pad token."""
    tok = copy.deepcopy(load_tokenizer(None))
    if pad == "eos":
        tok.pad_token = tok.eos_token
    elif pad == "none":
        tok.pad_token = None
    return tok


def test_reward_pad_token_id():
    assert reward_pad_token_id(_tokenizer("distinct")) == PAD != _tokenizer("distinct").eos_token_id
    assert reward_pad_token_id(_tokenizer("eos")) == _tokenizer("eos").eos_token_id
    assert reward_pad_token_id(_tokenizer("none")) == _tokenizer("none").eos_token_id
    bare = _tokenizer("none")
    bare.eos_token = None
    with pytest.raises(ConfigError, match="needs a pad or EOS token"):
        reward_pad_token_id(bare)


@pytest.mark.parametrize("pad", ["distinct", "eos", "none"])
def test_export_scores_like_transformers_whatever_the_pad(pad, tmp_path):
    """Train-time rule == exported model in transformers, for sequences ending in EOS right-padded with the
    pad id; with pad == EOS both read the token before the final EOS."""
    tok = _tokenizer(pad)
    pad_id, eos = reward_pad_token_id(tok), tok.eos_token_id
    cfg = hf.load_hf_config(str(_make_lm_folder(tmp_path)))
    model = build_reward_model(cfg)
    params = init_reward_params(model, _single(), jax.random.key(11))
    params["score"] = params["score"] * 10.0  # scores of order 1-10, not near zero
    out = export_reward_hf(params, cfg, str(tmp_path / "rm"), tokenizer=tok)
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert torch_model.config.pad_token_id == pad_id
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == pad_id  # the folder pads as it scores
    assert tok.pad_token_id == (None if pad == "none" else pad_id)  # the caller's tokenizer is left alone

    lengths = np.array([12, 7, 3, 1])
    rng = np.random.default_rng(5)
    ids = np.full((len(lengths), lengths.max()), pad_id, np.int64)
    seg = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int32)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = rng.integers(2, COMMON["vocab_size"], n - 1)  # 0 is <pad>, 1 the EOS
        ids[row, n - 1] = eos
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids), attention_mask=torch.tensor(seg)).logits[:, 0].numpy()
    per_token = model.apply({"params": params}, jnp.asarray(ids), None, jnp.asarray(seg))
    ours = np.asarray(last_token_scores(per_token, jnp.asarray(ids), jnp.asarray(seg), pad_id))
    np.testing.assert_allclose(ours, ref, atol=_score_atol(params, ids.shape[1]), rtol=0)
    # The position read: the EOS itself, or with pad == EOS the token before it (position 0 for [EOS] alone).
    want = np.maximum(lengths - 2, 0) if pad_id == eos else lengths - 1
    np.testing.assert_array_equal(ours, np.asarray(per_token)[np.arange(len(lengths)), want])
    assert np.abs(ref).mean() > 0.1


def _make_lm_folder(tmp_path):
    path = tmp_path / "lm"
    make_hf_model("llama", str(path))
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_from_causal_lm(family, tmp_path):
    make_hf_model(family, str(tmp_path))
    cfg = hf.load_hf_config(str(tmp_path))
    mesh = _single()
    model = build_reward_model(cfg)
    params = load_reward_params(str(tmp_path), model, mesh, rng=jax.random.key(3))
    lm = load_params(str(tmp_path), build_model(cfg), mesh)

    assert set(params) == {"model", "score"}
    assert "lm_head" not in params["model"]
    assert ("lm_head" in lm) == (not cfg.tie_embeddings)
    lm_body = {k: v for k, v in lm.items() if k != "lm_head"}
    assert jax.tree.structure(lm_body) == jax.tree.structure(params["model"])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(lm_body)[0], jax.tree.leaves(params["model"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    # Fresh head: std 1/sqrt(H+1). With H = 64 samples the std estimate has ~9% relative spread; allow ~5 sigma.
    w = np.asarray(params["score"])
    target = 1.0 / math.sqrt(cfg.hidden_size + 1)
    assert w.shape == (cfg.hidden_size, 1)
    assert abs(w.std() / target - 1) < 0.45, (w.std(), target)
    np.testing.assert_array_equal(w, np.asarray(init_reward_params(model, mesh, jax.random.key(3))["score"]))
    other = load_reward_params(str(tmp_path), model, mesh, rng=jax.random.key(4))["score"]
    assert not np.array_equal(w, np.asarray(other))

    # The scores are the SFT model's final hidden states through that head.
    ids, seg = _batch(seed=2)
    _, tok = _ours(model, params, ids, seg)
    hidden = build_model(cfg).apply({"params": lm}, jnp.asarray(ids), None, jnp.asarray(seg), output="hidden")
    np.testing.assert_allclose(tok, np.asarray(hidden @ params["score"])[..., 0], atol=1e-5, rtol=1e-5)


def test_score_head_init_statistics():
    # Wide model so the sample is large: 4096 weights give the std to ~1.1% (one sigma).
    cfg = DecoderConfig(
        vocab_size=64, hidden_size=4096, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8
    )
    w = np.asarray(init_reward_params(build_reward_model(cfg), _single(), jax.random.key(0))["score"])
    target = 1.0 / math.sqrt(cfg.hidden_size + 1)
    assert abs(w.std() / target - 1) < 0.06, (w.std(), target)
    assert abs(w.mean()) < 5 * target / math.sqrt(w.size), w.mean()


@pytest.mark.parametrize("source", ["sequence_classification", "causal_lm"])
def test_sharded_load_matches_single_device(source, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    if source == "causal_lm":
        make_hf_model("llama", str(tmp_path))  # untied: its lm_head is in the folder and must be skipped
    else:
        _make_hf_rm("qwen2", str(tmp_path))
    cfg = hf.load_hf_config(str(tmp_path))
    model = build_reward_model(cfg)
    single = load_reward_params(str(tmp_path), model, _single(), rng=jax.random.key(5))
    mesh = make_mesh(2, 2, 2)
    sharded = load_reward_params(str(tmp_path), model, mesh, rng=jax.random.key(5))
    _, shardings = reward_param_layout(model, mesh)
    assert jax.tree.structure(sharded) == jax.tree.structure(single)
    for a, b, s in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
        assert b.sharding.is_equivalent_to(s, b.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sharded["score"].sharding.shard_shape(sharded["score"].shape) == (cfg.hidden_size // 2, 1)  # fsdp

    ids, seg = _batch(seed=3)
    ref_last, ref_tok = _ours(model, single, ids, seg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.LOGICAL_RULES):
        batch = shd.batch_sharding(mesh)
        last, tok = _ours(model, sharded, jax.device_put(ids, batch), jax.device_put(seg, batch))
    np.testing.assert_allclose(tok, ref_tok, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(last, ref_last, atol=1e-5, rtol=1e-5)
