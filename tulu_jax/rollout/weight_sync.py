"""Weight folders for a vLLM server: what it starts on and what each push hands it.

vLLM reloads weights from Hugging Face-named safetensors in a folder it can read (`reload_weights`). One
trap shapes this file: on CPU, a model with *tied* embeddings keeps its startup output layer after a
reload (the LM head is a pre-packed copy of the embedding, and reloading never re-packs it), so logits come
out of the old head. We sidestep it by always serving an *untied* model: a tied checkpoint is served
through a view with an explicit `lm_head.weight` (a copy of the embedding) and `tie_word_embeddings: false`,
and every push writes `lm_head.weight` explicitly. The model computes the same function; vLLM just stores
the head twice.

`publish_weights` is the only code that moves a push's weights to the servers; `check_folder` and
`expected_tensors` let the client refuse a bad folder before any server sees it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from safetensors.numpy import save_file

from tulu_jax.models import hf
from tulu_jax.models.config import DecoderConfig, to_hf_config

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


def publish_weights(params, cfg: DecoderConfig, folder: str, dtype: str = "bfloat16") -> str:
    """Moves `params` (our layout, the model of `cfg`, any sharding) to where the vLLM servers read them:
    today an untied Hugging Face folder at `folder` in `dtype` (safetensors + config.json) that
    `reload_weights` takes. The one transport seam of a push: an in-memory or NCCL transfer (what the
    reference, open-instruct's `ppo_vllm_thread_ray_gtrl.py`, does: a broadcast of every parameter to the
    vLLM engines over a torch process group) replaces this function and nothing else. A tied model's
    `lm_head.weight` is written from the embedding already on the host (no second conversion).

    Collective: with several processes every one must call it (the gathers span them all); only process 0
    writes, and the folder is complete when process 0 returns. Returns `folder`; ConfigError for an
    unknown `dtype`."""
    config = to_hf_config(dataclasses.replace(cfg, tie_embeddings=False), dtype)
    copies = {LM_HEAD: EMBED} if cfg.tie_embeddings else None
    return hf.write_hf_folder(params, hf.param_rules(cfg), cfg, config, folder, dtype=dtype, copies=copies)


SHM = "/dev/shm"


def scratch_weights_dir(needed_bytes: int, shm: str = SHM) -> str:
    """A fresh folder for pushed weights: under `shm` (RAM-backed on Linux: a push is a memory copy, and a
    server on this host reads it back at memory speed) when it exists and has `needed_bytes` free, else
    under the system temp dir (`tempfile.gettempdir()`). Servers on other hosts cannot read either: give
    them a shared folder instead."""
    if os.path.isdir(shm):
        try:
            if shutil.disk_usage(shm).free >= needed_bytes:
                return tempfile.mkdtemp(prefix="tulu_jax_weights_", dir=shm)
        except OSError:  # not writable here (a container's read-only mount): the temp dir below
            pass
    return tempfile.mkdtemp(prefix="tulu_jax_weights_")


def push_bytes(cfg: DecoderConfig, dtype: str) -> int:
    """Bytes of tensor data one push of `cfg` writes in `dtype` (the untied model: what `publish_weights`
    stores)."""
    itemsize = 4 if dtype == "float32" else 2
    return itemsize * sum(int(np.prod(shape, dtype=np.int64)) for shape in expected_tensors(cfg).values())


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
