"""Hugging Face interop: read `config.json` + (sharded) safetensors into sharded parameters, and export back.

Loading builds each device's shard on the host, one layer tensor at a time, and places it straight on
its device (`jax.make_array_from_single_device_arrays`), so no process ever holds more than its own
devices' share of a parameter plus one layer tensor: a 70B model is never gathered on one host.
The name table below is the only place that knows Hugging Face's parameter names.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open

from tulu_jax.configlib import ConfigError
from tulu_jax.models.config import DecoderConfig, from_hf_config, to_hf_config
from tulu_jax.models.safetensors_files import (
    DTYPE_TAGS,
    INDEX_NAME,
    SafetensorsWriter,
    TensorSpec,
    file_names,
    split_files,
)


@dataclass(frozen=True)
class TensorRule:
    """How one parameter maps to Hugging Face: its tensor name and the layout conversions both ways
    (transformers stores Linear weights as [out, in]; we keep [in, heads, head_dim]-style kernels)."""

    hf_name: str  # "{i}" stands for the layer index
    to_ours: Callable[[np.ndarray, DecoderConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, DecoderConfig], np.ndarray]


def _heads_in(heads_attr):
    """HF [heads*H, D] (out, in) <-> ours [D, heads, H]."""

    def to_ours(w, c):
        return w.T.reshape(c.hidden_size, getattr(c, heads_attr), c.head_dim)

    def to_hf(w, c):
        return w.reshape(c.hidden_size, -1).T

    return to_ours, to_hf


def _rule(hf_name, to_ours=None, to_hf=None):
    return TensorRule(hf_name, to_ours or _same, to_hf or _same)


# The conversions are module-level functions, made once: equal rules then compare (and hash) equal across
# `param_rules` calls, so the export's compiled conversions are reused from one push to the next.
def _same(w, c):
    return w


_T = (lambda w, c: w.T, lambda w, c: w.T)
_Q_IN, _KV_IN = _heads_in("num_heads"), _heads_in("num_kv_heads")
_O_OUT = (
    lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
    lambda w, c: w.reshape(-1, c.hidden_size).T,
)
_HEAD_BIAS = {
    "q": (lambda w, c: w.reshape(c.num_heads, c.head_dim), lambda w, c: w.reshape(-1)),
    "kv": (lambda w, c: w.reshape(c.num_kv_heads, c.head_dim), lambda w, c: w.reshape(-1)),
}


def param_rules(cfg: DecoderConfig) -> dict[tuple[str, ...], TensorRule]:
    """Our parameter path -> how to read it from / write it to a Hugging Face checkpoint."""
    layer = "model.layers.{i}."
    rules = {
        ("embed",): _rule("model.embed_tokens.weight"),
        ("final_norm", "scale"): _rule("model.norm.weight"),
        ("layers", "self_attn", "q_kernel"): _rule(layer + "self_attn.q_proj.weight", *_Q_IN),
        ("layers", "self_attn", "k_kernel"): _rule(layer + "self_attn.k_proj.weight", *_KV_IN),
        ("layers", "self_attn", "v_kernel"): _rule(layer + "self_attn.v_proj.weight", *_KV_IN),
        ("layers", "self_attn", "o_kernel"): _rule(layer + "self_attn.o_proj.weight", *_O_OUT),
        ("layers", "mlp", "gate_kernel"): _rule(layer + "mlp.gate_proj.weight", *_T),
        ("layers", "mlp", "up_kernel"): _rule(layer + "mlp.up_proj.weight", *_T),
        ("layers", "mlp", "down_kernel"): _rule(layer + "mlp.down_proj.weight", *_T),
        ("layers", "post_attention_layernorm", "scale"): _rule(layer + "post_attention_layernorm.weight"),
    }
    if cfg.post_norm:
        rules[("layers", "post_feedforward_layernorm", "scale")] = _rule(layer + "post_feedforward_layernorm.weight")
    else:
        rules[("layers", "input_layernorm", "scale")] = _rule(layer + "input_layernorm.weight")
    if cfg.qkv_bias:
        rules[("layers", "self_attn", "q_bias")] = _rule(layer + "self_attn.q_proj.bias", *_HEAD_BIAS["q"])
        rules[("layers", "self_attn", "k_bias")] = _rule(layer + "self_attn.k_proj.bias", *_HEAD_BIAS["kv"])
        rules[("layers", "self_attn", "v_bias")] = _rule(layer + "self_attn.v_proj.bias", *_HEAD_BIAS["kv"])
    if cfg.o_bias:
        rules[("layers", "self_attn", "o_bias")] = _rule(layer + "self_attn.o_proj.bias")
    if cfg.qk_norm:
        rules[("layers", "self_attn", "q_norm", "scale")] = _rule(layer + "self_attn.q_norm.weight")
        rules[("layers", "self_attn", "k_norm", "scale")] = _rule(layer + "self_attn.k_norm.weight")
    if not cfg.tie_embeddings:
        rules[("lm_head",)] = _rule("lm_head.weight", *_T)
    return rules


SCORE_NAME = "score.weight"  # the [num_labels, D] head of *ForSequenceClassification


def decoder_body_rules(cfg: DecoderConfig) -> dict[tuple[str, ...], TensorRule]:
    """The decoder's rules without the LM head: what a *ForSequenceClassification checkpoint shares with a
    causal LM (same `model.` names, and no `lm_head` even for untied models)."""
    return {k: r for k, r in param_rules(cfg).items() if k != ("lm_head",)}


def reward_param_rules(cfg: DecoderConfig) -> dict[tuple[str, ...], TensorRule]:
    """Rules for a RewardModel tree: the decoder body under `model`, plus the scalar `score` head [D, 1]."""
    rules = {("model", *k): r for k, r in decoder_body_rules(cfg).items()}
    rules[("score",)] = _rule(SCORE_NAME, *_T)
    return rules


def reward_pad_token_id(tokenizer) -> int:
    """The pad id a reward model trains with and its export writes: the tokenizer's pad token, else its EOS.

    transformers' *ForSequenceClassification reads the score at the last token that is not
    `config.pad_token_id` and refuses batches without one, so an exported reward model needs a pad id, and it
    must be the one training read the score by (`reward.last_token_scores`). Without a pad token, EOS is the
    usual stand-in (as for SmolLM2, whose pad token is its EOS); the score is then read at the token before
    a trailing EOS, in training and in transformers alike. Raises ConfigError, at start-up rather than at the
    export, when the tokenizer has neither."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    raise ConfigError(
        f"tokenizer {name}: a reward model needs a pad or EOS token to read its score by, and it has none"
    )


def reward_hf_config(cfg: DecoderConfig, torch_dtype: str = "float32", pad_token_id: int | None = None) -> dict:
    """config.json of a one-label *ForSequenceClassification. transformers reads the score at the rightmost
    token that is not `pad_token_id` (default: `cfg.pad_token_id`, else `cfg.eos_token_id`, as
    `reward_pad_token_id` picks for a tokenizer), so it must be set; ConfigError when none is known."""
    pad = next((p for p in (pad_token_id, cfg.pad_token_id, cfg.eos_token_id) if p is not None), None)
    if pad is None:
        raise ConfigError("a reward model export needs a pad_token_id (from the tokenizer or the model config)")
    out = to_hf_config(cfg, torch_dtype)
    out["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification") for a in out["architectures"]]
    out["pad_token_id"] = int(pad)
    out["id2label"] = {"0": "LABEL_0"}  # num_labels = 1
    out["label2id"] = {"LABEL_0": 0}
    return out


def _model_dir(model_dir: str) -> str:
    if not os.path.exists(model_dir):
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    if not os.path.isdir(model_dir):
        raise ConfigError(f"model path {model_dir} is not a folder: expected a Hugging Face model folder")
    return model_dir


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_hf_config(model_dir: str) -> DecoderConfig:
    """The DecoderConfig of a Hugging Face model folder's config.json (see `config.from_hf_config`).

    Raises FileNotFoundError when the folder or its config.json is missing, ConfigError when the path is not
    a folder, config.json is unreadable or not a JSON object, or it describes a model we do not implement."""
    path = os.path.join(_model_dir(model_dir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: model.path must be a Hugging Face model folder")
    return from_hf_config(_read_json(path), source=path)


class _SafetensorsIndex:
    """Finds a tensor by name across the shards of a checkpoint folder, opening each file once.

    Raises FileNotFoundError when the folder has no safetensors (or a shard its index names is missing),
    ConfigError when the index or a shard cannot be parsed."""

    def __init__(self, model_dir: str):
        _model_dir(model_dir)
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index}: no 'weight_map' object")
        else:
            single = os.path.join(model_dir, "model.safetensors")
            if not os.path.exists(single):
                others = sorted(f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
                hint = f" (it has {', '.join(others)}: convert to safetensors)" if others else ""
                raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}{hint}")
            weight_map = {k: "model.safetensors" for k in self._open_file(model_dir, "model.safetensors").keys()}
        self._dir, self._map, self._open = model_dir, weight_map, {}

    @staticmethod
    def _open_file(model_dir: str, file: str):
        path = os.path.join(model_dir, file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (listed in model.safetensors.index.json)")
        try:
            return safe_open(path, framework="numpy")
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._map)

    def __contains__(self, name):
        return name in self._map

    def get(self, name: str) -> np.ndarray:
        """The tensor as stored (numpy, its file dtype); ConfigError if the checkpoint lacks it."""
        if name not in self._map:
            raise ConfigError(f"{self._dir}: checkpoint has no tensor {name}, which config.json's model needs")
        file = self._map[name]
        if file not in self._open:
            self._open[file] = self._open_file(self._dir, file)
        return self._open[file].get_tensor(name)


def checkpoint_has(model_dir: str, name: str) -> bool:
    """Whether the safetensors checkpoint in `model_dir` holds a tensor called `name`."""
    return name in _SafetensorsIndex(model_dir)


def _place(shape, dtype, sharding, num_layers: int | None, read: Callable[[int | None], np.ndarray]):
    """Builds a global array from per-layer host tensors, filling only this process's device shards."""
    index_map = sharding.addressable_devices_indices_map(shape)
    key = lambda idx: tuple(s.indices(n) for s, n in zip(idx, shape))
    buffers = {key(idx): np.empty(_slice_shape(shape, idx), dtype=dtype) for idx in index_map.values()}
    if num_layers is None:
        full = read(None)
        for idx in index_map.values():
            buffers[key(idx)][...] = full[idx]
    else:
        if any(key(idx)[0] != (0, num_layers, 1) for idx in index_map.values()):
            raise ValueError("the layers axis must not be sharded")  # the rules table keeps it whole
        for i in range(num_layers):  # one layer tensor on the host at a time
            full = read(i)
            for idx in index_map.values():
                buffers[key(idx)][i] = full[idx[1:]]
    arrays = [jax.device_put(buffers[key(idx)], d) for d, idx in index_map.items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _slice_shape(shape, idx):
    return tuple(len(range(*s.indices(n))) for s, n in zip(idx, shape))


def _stacked(rule: TensorRule) -> bool:
    return "{i}" in rule.hf_name  # one HF tensor per layer, stacked on our leading layers axis


# Buffers some older checkpoints saved: RoPE frequencies, recomputed from config.json (transformers skips them too).
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def expected_tensor_names(rules: dict[tuple[str, ...], TensorRule], num_layers: int) -> set[str]:
    """Every checkpoint tensor name `rules` reads, per-layer names expanded for `num_layers` layers."""
    names = set()
    for rule in rules.values():
        layers = range(num_layers) if _stacked(rule) else [None]
        names.update(rule.hf_name.format(i=i) for i in layers)
    return names


def _check_tensor_names(index: _SafetensorsIndex, expected: set[str], cfg: DecoderConfig, ignore) -> None:
    """ConfigError naming the folder and the first tensor the model needs but the checkpoint lacks, or the
    checkpoint holds but the model would not read (never dropped silently: it would change the outputs)."""
    have = index.names()
    missing = sorted(expected - have)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{index._dir}: checkpoint has no tensor {missing[0]}{more}, which config.json's model needs")
    unused = {n for n in have - expected - set(ignore) if not n.endswith(_DERIVED_SUFFIXES)}
    if cfg.tie_embeddings and LM_HEAD in unused and EMBED in have:
        # Some tied checkpoints also store the head; transformers ties it to the embedding, so it must equal it.
        if np.array_equal(index.get(LM_HEAD), index.get(EMBED)):
            unused.discard(LM_HEAD)
    if unused:
        first = sorted(unused)[0]
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise ConfigError(
            f"{index._dir}: checkpoint tensor {first}{more} is not used by the model config.json describes "
            f"({cfg.family}, {cfg.num_layers} layers, qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
            f"tie_word_embeddings={cfg.tie_embeddings})"
        )


def load_hf_params(
    model_dir: str, cfg: DecoderConfig, abstract_params, shardings, dtype=np.float32, rules=None, ignore=()
):
    """Reads a Hugging Face checkpoint into a params pytree laid out like `abstract_params`, sharded by
    `shardings` (both from `jax.eval_shape` of the init and the rules table). `rules` defaults to the
    decoder's `param_rules(cfg)`; other trees (the reward model's) pass their own. Leaves come back as `dtype`
    with our shapes ([L, ...] for per-layer tensors).

    Every tensor in the checkpoint must be read by `rules`, except the names in `ignore` (e.g. a causal
    LM's lm_head when it seeds a reward model) and RoPE inv_freq buffers. Raises FileNotFoundError /
    ConfigError (naming `model_dir` and the tensor) for a missing folder or safetensors, a tensor the model
    needs but the checkpoint lacks, one it holds but the model would not use, or a shape mismatch."""
    index = _SafetensorsIndex(model_dir)
    rules = param_rules(cfg) if rules is None else rules
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    ours = {tuple(p.key for p in path) for path, _ in flat}
    if ours != set(rules):
        raise ValueError(f"parameter tree and name table disagree: {sorted(ours ^ set(rules))}")
    _check_tensor_names(index, expected_tensor_names(rules, cfg.num_layers), cfg, ignore)
    leaves = []
    for (path, leaf), sharding in zip(flat, flat_shardings):
        key = tuple(p.key for p in path)
        rule = rules[key]
        stacked = _stacked(rule)

        def read(i, rule=rule, leaf=leaf, stacked=stacked):
            w = rule.to_ours(index.get(rule.hf_name.format(i=i)), cfg).astype(dtype)
            expected = leaf.shape[1:] if stacked else leaf.shape
            if w.shape != expected:
                raise ConfigError(
                    f"{model_dir}: tensor {rule.hf_name.format(i=i)} has shape {w.shape} after conversion, "
                    f"expected {expected} from config.json"
                )
            return w

        leaves.append(_place(leaf.shape, dtype, sharding, cfg.num_layers if stacked else None, read))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_params), leaves)


def export_hf(
    params, cfg: DecoderConfig, out_dir: str, tokenizer=None, dtype: str = "float32", max_shard_bytes: int = 2 << 30
) -> str:
    """Writes `params` as a Hugging Face folder (config.json, safetensors shards, tokenizer) that
    `AutoModelForCausalLM.from_pretrained` and vLLM load, through `write_hf_folder` (chunked on-device
    conversion, files of at most `max_shard_bytes`).
    `dtype` ('float32', 'bfloat16' or 'float16') is the stored tensors' and config.json's torch_dtype. Raises
    ConfigError for another dtype or a bias layout the family's config.json cannot express (`to_hf_config`).
    Returns `out_dir`."""
    return write_hf_folder(
        params, param_rules(cfg), cfg, to_hf_config(cfg, dtype), out_dir, tokenizer, dtype, max_shard_bytes
    )


def export_reward_hf(
    params, cfg: DecoderConfig, out_dir: str, tokenizer=None, dtype: str = "float32", max_shard_bytes: int = 2 << 30
) -> str:
    """Writes a RewardModel's params as a one-label *ForSequenceClassification folder (`score.weight`, no
    lm_head) that `AutoModelForSequenceClassification.from_pretrained` loads and scores exactly as
    `reward.last_token_scores` does. The pad id is `reward_pad_token_id(tokenizer)` when a tokenizer is
    given (the id training read the score by), else `cfg`'s pad or EOS id; a tokenizer without a pad token
    is saved with its EOS as pad, so the folder pads as its config says. ConfigError when no id is known."""
    pad = None
    if tokenizer is not None:
        pad = reward_pad_token_id(tokenizer)
        if tokenizer.pad_token_id is None:
            tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer stays as it was
            tokenizer.pad_token = tokenizer.eos_token
    config = reward_hf_config(cfg, dtype, pad)
    return write_hf_folder(params, reward_param_rules(cfg), cfg, config, out_dir, tokenizer, dtype, max_shard_bytes)


def write_hf_folder(
    params,
    rules: dict[tuple[str, ...], TensorRule],
    cfg: DecoderConfig,
    config: dict,
    out_dir: str,
    tokenizer=None,
    dtype: str = "float32",
    max_shard_bytes: int = 2 << 30,
    *,
    copies: dict[str, str] | None = None,
    fetch_bytes: int = 512 << 20,
    threads: int | None = None,
) -> str:
    """The writer behind the exports and the vLLM weight pushes: every leaf of `params` (jax or numpy arrays,
    any sharding) goes out under its name in `rules`, with `config` as config.json, as `dtype` ('float32',
    'bfloat16', 'float16'; else ConfigError). `copies` maps extra tensor names to the name whose tensor they
    repeat (an untied LM head written from the embedding, without a second conversion or transfer).

    Each leaf is converted on its devices in one compiled step (cast to `dtype` first, which halves the
    bytes for bf16, then the layout transposes of `rules`), in chunks of whole layers of at most
    `fetch_bytes` converted bytes, gathered to the host once per chunk, and written straight into
    pre-laid-out safetensors files (`safetensors_files`) by `threads` writer threads (default: up to 4) while
    the next chunk converts; files hold at most `max_shard_bytes` each. The host holds at most
    `threads` + 2 chunks. The folder appears at `out_dir` only once complete (written to `out_dir`.tmp, then
    renamed). With several processes every one must call this (the gathers are collectives) and only
    process 0 writes. ValueError when `params` and `rules` disagree. Returns `out_dir`."""
    if dtype not in DTYPE_TAGS:
        raise ConfigError(f"export dtype {dtype!r} is not one of {sorted(DTYPE_TAGS)}")
    copies = dict(copies or {})
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    chunks, specs = [], []  # chunks: (leaf, rule, first layer or None, layer count or None, names)
    for path, leaf in flat:
        key = tuple(p.key for p in path)
        if key not in rules:
            raise ValueError(f"parameter {'/'.join(map(str, key))} has no Hugging Face name in the rules table")
        rule, leaf = rules[key], leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)
        stacked = _stacked(rule)
        if stacked and leaf.shape[0] != cfg.num_layers:
            raise ValueError(f"parameter {'/'.join(key)} has {leaf.shape[0]} layers, the config {cfg.num_layers}")
        one = jax.ShapeDtypeStruct(leaf.shape[1:] if stacked else leaf.shape, leaf.dtype)
        shape = tuple(jax.eval_shape(lambda w, rule=rule: rule.to_hf(w, cfg), one).shape)
        names = [rule.hf_name.format(i=i) for i in range(cfg.num_layers)] if stacked else [rule.hf_name]
        for name in names:
            specs.append(TensorSpec(name, shape, dtype))
            specs += [TensorSpec(extra, shape, dtype) for extra, source in copies.items() if source == name]
        if stacked:
            per_layer = specs[-1].nbytes
            fits = [d for d in range(1, cfg.num_layers + 1) if cfg.num_layers % d == 0 and d * per_layer <= fetch_bytes]
            k = max(fits, default=1)  # equal chunks: one compilation per leaf
            chunks += [(leaf, rule, i, k, names[i : i + k]) for i in range(0, cfg.num_layers, k)]
        else:
            chunks.append((leaf, rule, None, None, names))
    unknown = sorted(set(copies.values()) - {s.name for s in specs})
    if unknown:
        raise ValueError(f"copies name source tensors that are not written: {unknown}")

    write = jax.process_index() == 0  # every process joins the gathers; only the first writes
    threads = threads or min(4, os.cpu_count() or 1)
    tmp = out_dir.rstrip("/") + ".tmp"
    files = split_files(specs, max_shard_bytes)
    layout = list(zip(file_names(len(files)), files))
    extra_of = {source: [e for e, s in copies.items() if s == source] for source in copies.values()}
    # A host-side failure on process 0 (disk full, permissions) must not stop it joining the remaining
    # gathers, or the other processes would wait in them forever: it is kept, and raised everywhere at the end.
    failure: BaseException | None = None
    writer = pool = None
    if write:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            writer = SafetensorsWriter(tmp, layout, {"format": "pt"})
            pool = ThreadPoolExecutor(threads)
        except OSError as e:
            failure = e

    def store(host, names, stacked):
        for i, name in enumerate(names):
            tensor = host[i] if stacked else host
            for target in (name, *extra_of.get(name, ())):
                writer.write(target, tensor)

    def dispatch(chunk):
        leaf, rule, start, k, _ = chunk
        return _converter(rule, cfg, dtype, k, _replicated_on(leaf))(leaf, 0 if start is None else start)

    try:
        pending, queued = dispatch(chunks[0]) if chunks else None, []
        for n, chunk in enumerate(chunks):
            converted = pending
            if n + 1 < len(chunks):
                pending = dispatch(chunks[n + 1])  # converts on the devices while this chunk is written
            if not write or failure is not None:
                converted.block_until_ready()  # this process's part of the gather is done
                continue
            host = np.asarray(converted if converted.is_fully_addressable else converted.addressable_data(0))
            while len(queued) > threads:  # bounds the host memory held by chunks waiting to be written
                failure = failure or queued.pop(0).exception()
            queued.append(pool.submit(store, host, chunk[4], chunk[2] is not None))
        for future in queued:
            failure = failure or future.exception()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if writer is not None:
            writer.close()
    if write and failure is None:
        try:
            _finish_folder(writer, tmp, out_dir, files, specs, config, tokenizer)
        except (OSError, RuntimeError) as e:
            failure = e
    _raise_everywhere(failure, out_dir)
    return out_dir


def _finish_folder(writer, tmp: str, out_dir: str, files, specs, config: dict, tokenizer) -> None:
    """Index, config and tokenizer into `tmp`, then `tmp` renamed to `out_dir` (process 0)."""
    if writer.missing():  # a bug here, not bad input: refuse to publish a folder with holes
        raise RuntimeError(f"{tmp}: tensors never written: {writer.missing()[:5]}")
    if len(files) > 1:
        total = sum(s.nbytes for s in specs)
        with open(os.path.join(tmp, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": writer.weight_map}, f, indent=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _raise_everywhere(failure: BaseException | None, out_dir: str) -> None:
    """Process 0's write outcome on every process (a collective with several): its error re-raised there,
    a RuntimeError naming it on the others; returns when the folder is complete."""
    from tulu_jax.multihost import broadcast_object

    shared = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if shared is not None:
        raise RuntimeError(f"process 0 could not write {out_dir}: {shared}")


_CONVERTERS: dict = {}  # compiled conversions, reused by every later export of the same model


def _converter(rule: TensorRule, cfg: DecoderConfig, dtype: str, layers: int | None, gather):
    """jit(leaf, start) -> `rule.to_hf` of the leaf (or of its layers [start, start + layers) when `layers` is
    set: [layers, *hf_shape]) cast to `dtype`; with `gather` (a replicated sharding) the result is copied to
    every device, so each process holds all of it."""
    key = (rule, repr(cfg), dtype, layers, gather)
    if key not in _CONVERTERS:
        target = jnp.dtype(dtype)

        def convert(x, start):
            if layers is None:
                return rule.to_hf(x.astype(target), cfg)
            chunk = jax.lax.dynamic_slice_in_dim(x, start, layers, axis=0).astype(target)
            return jax.vmap(lambda w: rule.to_hf(w, cfg))(chunk)

        if len(_CONVERTERS) > 512:  # many different models in one process (tests): start over
            _CONVERTERS.clear()
        _CONVERTERS[key] = jax.jit(convert, out_shardings=gather)
    return _CONVERTERS[key]


def _replicated_on(x: jax.Array):
    """None when this process holds all of `x`; else a sharding that copies `x` to every one of its devices
    (the gather that lets process 0 read it)."""
    if x.is_fully_addressable:
        return None
    mesh = getattr(x.sharding, "mesh", None)
    if not isinstance(mesh, Mesh):
        mesh = Mesh(np.array(sorted(x.sharding.device_set, key=lambda d: d.id)), ("devices",))
    return NamedSharding(mesh, PartitionSpec())
