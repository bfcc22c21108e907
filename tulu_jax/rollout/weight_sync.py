"""Weight folders for a vLLM server: what it starts on and what each push hands it.

vLLM reloads weights from Hugging Face-named safetensors in a folder it can read (`reload_weights`). One
trap shapes this file: on CPU, a model with *tied* embeddings keeps its startup output layer after a
reload (the LM head is a pre-packed copy of the embedding, and reloading never re-packs it), so logits come
out of the old head. We sidestep it by always serving an *untied* model: a tied checkpoint is served
through a view with an explicit `lm_head.weight` (a copy of the embedding) and `tie_word_embeddings: false`,
and every push writes `lm_head.weight` explicitly. The model computes the same function; vLLM just stores
the head twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
from safetensors.numpy import save_file

from tulu_jax.models import hf
from tulu_jax.models.config import DecoderConfig

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
_INDEX = "model.safetensors.index.json"


def is_tied(model_dir: str) -> bool:
    """Whether the config.json of `model_dir` ties the LM head to the embedding (FileNotFoundError if none)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        return bool(json.load(f).get("tie_word_embeddings", False))


def untied_view(model_dir: str, out_dir: str) -> str:
    """A folder that serves `model_dir` untied: symlinks to its files, plus `lm_head.safetensors` holding a
    copy of the embedding, an index naming every tensor, and config.json with `tie_word_embeddings: false`.
    Returns `model_dir` itself when it is already untied (nothing to do)."""
    model_dir = os.path.abspath(model_dir)
    if not is_tied(model_dir):
        return model_dir
    index = hf._SafetensorsIndex(model_dir)
    embed = index.get(EMBED)
    weight_map = dict(index._map)
    weight_map.pop(LM_HEAD, None)  # some tied exports carry a stale head; the embedding is the truth
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    for name in os.listdir(model_dir):
        if name not in ("config.json", _INDEX):
            os.symlink(os.path.join(model_dir, name), os.path.join(out_dir, name))
    save_file({LM_HEAD: np.ascontiguousarray(embed)}, os.path.join(out_dir, "lm_head.safetensors"))
    weight_map[LM_HEAD] = "lm_head.safetensors"
    with open(os.path.join(out_dir, _INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = False
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def untie_params(params, cfg: DecoderConfig):
    """(params, cfg) of the same model with an explicit LM head: ours is [D, V], the embedding [V, D]."""
    if not cfg.tie_embeddings:
        return params, cfg
    return {**params, "lm_head": jax.numpy.asarray(params["embed"]).T}, dataclasses.replace(cfg, tie_embeddings=False)


def write_weights(params, cfg: DecoderConfig, out_dir: str, dtype: str = "float32") -> str:
    """`params` (our layout) as an untied Hugging Face folder at `out_dir`, ready for `reload_weights`."""
    params, cfg = untie_params(params, cfg)
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.numpy.asarray(x), params)  # host leaves too
    return hf.export_hf(params, cfg, out_dir, dtype=dtype)


def expected_tensors(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape of the untied model a push must contain (shapes only, no memory)."""
    from flax import linen as nn

    from tulu_jax.models.loading import boxed_param_shapes, build_model

    cfg = dataclasses.replace(cfg, tie_embeddings=False)
    abstract = nn.unbox(boxed_param_shapes(build_model(cfg)))
    rules, out = hf.param_rules(cfg), {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        rule = rules[tuple(p.key for p in path)]
        stacked = "{i}" in rule.hf_name  # one tensor per layer, from our leading layers axis
        names = [rule.hf_name.format(i=i) for i in range(cfg.num_layers)] if stacked else [rule.hf_name]
        one = jax.ShapeDtypeStruct(leaf.shape[1:] if stacked else leaf.shape, leaf.dtype)
        shape = tuple(jax.eval_shape(lambda w, rule=rule: rule.to_hf(w, cfg), one).shape)
        out.update({name: shape for name in names})
    return out


def check_folder(folder: str, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """What is wrong with `folder` as a push (missing, misshapen or unreadable tensors); [] when it is fine.
    vLLM checks less: a missing tensor is skipped silently and the old values stay in place."""
    from safetensors import safe_open

    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    found, problems = {}, []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="numpy") as f:
                    found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except Exception as e:  # a truncated or corrupt file: safetensors raises its own error types
                problems.append(f"{name}: {e}")
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name}")
        elif found[name] != shape:
            problems.append(f"tensor {name} has shape {found[name]}, expected {shape}")
    return problems
