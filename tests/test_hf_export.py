"""Export to a Hugging Face folder: transformers loads it and computes our logits; our loader reads
back the exact parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import FAMILIES, make_hf_model

from tulu_jax.data import load_tokenizer
from tulu_jax.models import hf
from tulu_jax.models.config import from_hf_config
from tulu_jax.models.loading import build_model, init_params, load_params
from tulu_jax.sharding import make_mesh


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_roundtrip(family, tmp_path):
    src = make_hf_model(family, str(tmp_path / "src"))
    cfg = from_hf_config(src.config.to_dict())
    model = build_model(cfg)
    mesh = make_mesh(devices=jax.devices()[:1])
    params = init_params(model, mesh, jax.random.key(7))
    out = hf.export_hf(
        params, cfg, str(tmp_path / "out"), tokenizer=load_tokenizer(None), max_shard_bytes=200_000
    )  # small shards: exercises the sharded index too
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists()

    again = load_params(out, model, mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(torch_model) is type(src)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_export_bfloat16_config(tmp_path):
    make_hf_model("llama", str(tmp_path / "src"))
    cfg = hf.load_hf_config(str(tmp_path / "src"))
    model = build_model(cfg)
    params = init_params(model, make_mesh(devices=jax.devices()[:1]), jax.random.key(0))
    out = hf.export_hf(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16")
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(m.parameters()).dtype == torch.bfloat16


def test_checkpoint_shape_mismatch_is_a_clear_error(tmp_path):
    make_hf_model("llama", str(tmp_path / "src"))
    cfg = hf.load_hf_config(str(tmp_path / "src"))
    wrong = build_model(cfg.__class__(**{**cfg.__dict__, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight has shape .* expected"):
        load_params(str(tmp_path / "src"), wrong, make_mesh(devices=jax.devices()[:1]))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_load_places_shards_directly_on_a_mesh(tmp_path, mesh_shape):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    make_hf_model("olmo2", str(tmp_path))
    cfg = hf.load_hf_config(str(tmp_path))
    model = build_model(cfg)
    single = load_params(str(tmp_path), model, make_mesh(devices=jax.devices()[:1]))
    mesh = make_mesh(*mesh_shape)
    sharded = load_params(str(tmp_path), model, mesh)
    q = sharded["layers"]["self_attn"]["q_kernel"]  # [L, D, N, H]: D over fsdp, N over tensor
    assert q.sharding.shard_shape(q.shape) == (2, 64 // mesh_shape[1], 4 // mesh_shape[2], 16)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
