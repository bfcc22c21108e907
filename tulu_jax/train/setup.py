"""Run set-up shared by every trainer: inputs checked, output folder, mesh, model config, tokenizer, network,
optimizer and schedule, abstract train state and its shardings, and the starting parameters.

A trainer calls `prepare(cfg, ...)` (everything that does not depend on the data), builds its data
pipeline with `run.tokenizer`, then `run.add_optimizer(total_steps)`. Nothing here knows which stage
runs; stage-specific pieces (reference models, value heads) live in the stage's own module.

Fail closed: a run needs `model.path` (or an explicit `model.preset` for a random-init toy model) and
training files (or `data.use_bundled: true`); every configured path must exist. Each problem is a
ConfigError or InputError naming the config key and the path, raised before any compute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import optax
import yaml
from jax.sharding import Mesh

from tulu_jax import configlib
from tulu_jax import sharding as shd
from tulu_jax.config import DataFilesConfig, ModelConfig
from tulu_jax.configlib import ConfigError
from tulu_jax.data.pipeline import resolve_files
from tulu_jax.data.tokenizer import tiny_tokenizer_dir
from tulu_jax.inputs import InputError, check_data_path, check_model_dir, load_chat_tokenizer, where
from tulu_jax.models import hf
from tulu_jax.models.config import DecoderConfig, preset
from tulu_jax.models.decoder import Decoder
from tulu_jax.models.loading import build_model, init_params, load_params
from tulu_jax.train.optimizer import make_optimizer
from tulu_jax.train.reporter import log
from tulu_jax.train.state import TrainState, state_layout

# --- inputs ---------------------------------------------------------------------------------------------


def check_inputs(cfg) -> None:
    """Fail closed before any compute: a model to start from, training data, and every path present."""
    mcfg: ModelConfig = cfg.model
    if mcfg.path is None and mcfg.preset is None:
        raise ConfigError(
            "model.path: required (a Hugging Face model folder to start from); set model.preset=NAME instead "
            "only for a random-init toy run"
        )
    if mcfg.path is not None:
        if not os.path.exists(mcfg.path) and os.path.basename(os.path.normpath(mcfg.path)) == "hf":
            raise InputError(
                f"{where('model.path', mcfg.path)}: no such directory (an earlier stage's export: run that stage "
                f"first, e.g. `tulu-jax sft --config configs/sft/tiny.yaml` writes runs/sft-tiny/hf)"
            )
        check_model_dir(mcfg.path, "model.path")
    if mcfg.tokenizer is not None and not os.path.isdir(mcfg.tokenizer):
        raise InputError(f"{where('model.tokenizer', mcfg.tokenizer)}: no such directory")
    data: DataFilesConfig = cfg.data
    if not data.use_bundled:
        resolve_files(data, "train")  # ConfigError when none are given
        for key in ("train_files", "eval_files"):
            for i, path in enumerate(getattr(data, key)):
                check_data_path(path, f"data.{key}[{i}]")
    ref = getattr(getattr(cfg, "dpo", None), "reference_path", None)
    if ref is not None:
        check_model_dir(ref, "dpo.reference_path")


def load_model_and_tokenizer(mcfg: ModelConfig) -> tuple[DecoderConfig, Any]:
    """(DecoderConfig, tokenizer) of `model.path`, or of `model.preset` with `model.tokenizer` or the bundled
    tiny tokenizer. InputError/ConfigError when the tokenizer cannot be loaded, lacks an EOS token that
    encodes to itself, or has more tokens than the model's vocabulary."""
    key, tok_path = ("model.tokenizer", mcfg.tokenizer) if mcfg.tokenizer else ("model.path", mcfg.path)
    tokenizer = load_chat_tokenizer(tok_path, key)
    if mcfg.path:
        dcfg = hf.load_hf_config(mcfg.path)
    else:
        try:
            dcfg = preset(
                mcfg.preset,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
            )
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from None
    if len(tokenizer) > dcfg.vocab_size:
        raise ConfigError(
            f"{key}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{dcfg.vocab_size}: token ids would index past the embedding table"
        )
    return dcfg, tokenizer


def build_train_model(mcfg: ModelConfig, dcfg: DecoderConfig, module: type[nn.Module] = Decoder) -> nn.Module:
    """The network a run trains (the Decoder, or a head on it such as the RewardModel), as `model.*` says."""
    return build_model(
        dcfg,
        dtype=mcfg.dtype,
        param_dtype=mcfg.param_dtype,
        remat=mcfg.remat,
        scan_unroll=mcfg.scan_unroll,
        attention_block=mcfg.attention_block,
        module=module,
    )


# --- the run --------------------------------------------------------------------------------------------


def prepare_output_dir(cfg) -> str:
    """Creates output_dir and records the run's full config there (process 0)."""
    out_dir = os.path.abspath(cfg.output_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"{where('output_dir', out_dir)}: exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"{where('output_dir', out_dir)}: cannot create it: {e.strerror or e}") from None
    if jax.process_index() == 0:
        record_config(out_dir, configlib.to_dict(cfg))
    return out_dir


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def record_config(out_dir: str, config: dict) -> None:
    """Writes OUTPUT_DIR/config.yaml for a new run. A folder that already holds checkpoints keeps the
    config.yaml of the run that made them (it describes those weights); when this invocation's config
    differs, it goes to config.resumed.yaml and the differing keys are logged."""
    path = os.path.join(out_dir, "config.yaml")
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    resumed = os.path.exists(path) and os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    if resumed:
        try:
            with open(path, encoding="utf-8") as f:
                saved = _flat(yaml.safe_load(f) or {})
        except (OSError, yaml.YAMLError):
            saved = {}
        ours = _flat(yaml.safe_load(yaml.safe_dump(config, sort_keys=False)))
        changed = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
        if not changed:
            return
        log(
            f"output_dir {out_dir} holds a run started with another config ({', '.join(changed[:6])}"
            f"{', ...' if len(changed) > 6 else ''} differ): config.yaml keeps that run's; this one's is in "
            "config.resumed.yaml"
        )
        path = os.path.join(out_dir, "config.resumed.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def make_train_mesh(mesh_cfg, train_cfg, what: str = "rows", rows: int | None = None) -> Mesh:
    """The device mesh, after checking each micro-batch splits evenly over the data-parallel devices.
    `rows` (default train.batch_size) is what a step's batch holds, e.g. RL episodes = prompts x samples."""
    try:
        mesh = shd.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = train_cfg.batch_size if rows is None else rows
    micro = rows // train_cfg.grad_accum_steps
    if micro % dp:
        raise ConfigError(
            f"train.batch_size / train.grad_accum_steps: {micro} {what} per micro-batch is not "
            f"divisible by the data-parallel size data*fsdp = {dp}"
        )
    return mesh


@dataclass
class Run:
    """What a trainer builds before its loop. `tx`, `schedule`, `abstract` and `shardings` are set by
    `add_optimizer` once the number of steps is known."""

    cfg: Any
    out_dir: str
    mesh: Mesh
    dcfg: DecoderConfig
    tokenizer: Any
    model: nn.Module
    total_steps: int = 0
    tx: optax.GradientTransformation | None = None
    schedule: optax.Schedule | None = None
    abstract: TrainState | None = None
    shardings: TrainState | None = None

    @property
    def global_batch(self) -> int:
        """train.batch_size: rows (or pairs, or prompts) per step over all processes."""
        return self.cfg.train.batch_size

    def add_optimizer(self, total_steps: int, updates_per_step: int = 1) -> None:
        """AdamW + a schedule over total_steps * updates_per_step optimizer updates (RL takes several per
        step), and the train state's abstract layout and shardings."""
        self.total_steps = total_steps
        self.tx, self.schedule = make_optimizer(self.cfg.optim, total_steps * updates_per_step)
        try:
            self.abstract, self.shardings = state_layout(self.model, self.tx, self.mesh)
        except ValueError as e:  # a dimension that the mesh does not divide
            raise ConfigError(str(e)) from None

    def load_or_init(self, path: str | None, *, dtype=None):
        """Parameters on their shards: loaded from the HF folder `path`, or the random init of
        `model.preset` from `train.seed` (the same numbers on every call). `dtype` (e.g. the compute
        dtype, for a frozen reference) overrides the stored parameter dtype."""
        if path:
            return load_params(path, self.model, self.mesh, dtype=dtype)
        params = init_params(self.model, self.mesh, jax.random.key(self.cfg.train.seed))
        return params if dtype is None else cast_params(params, dtype)


def run_length(train_cfg, available: int) -> int:
    """Optimizer steps of a run: `train.max_steps`, or (-1) all `available` full batches of `train.num_epochs`
    epochs. ConfigError when the data yields no full batch, or fewer than `train.max_steps`: a run never
    silently stops short of what it was asked (with a learning-rate schedule that never decays)."""
    t = train_cfg
    if available <= 0:
        raise ConfigError(
            f"train.batch_size={t.batch_size}: the training data yields no full batch; add data or lower it"
        )
    if t.max_steps > available:
        raise ConfigError(
            f"train.max_steps={t.max_steps}: the training data yields only {available} batches of "
            f"train.batch_size={t.batch_size} in train.num_epochs={t.num_epochs}; lower train.max_steps or raise "
            f"train.num_epochs"
        )
    return t.max_steps if t.max_steps > 0 else available


def cast_params(params, dtype):
    """A copy of `params` in `dtype`, each array keeping its sharding (e.g. a frozen model in bf16)."""
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))(params)


def prepare(
    cfg, *, module: type[nn.Module] = Decoder, what: str = "rows", describe: str = "", rows: int | None = None
) -> Run:
    """Checks the inputs, then builds the output folder, mesh, tokenizer and network of a run and logs
    what it uses (model, tokenizer, data files, mesh). `rows`: a step's batch rows (default train.batch_size)."""
    check_inputs(cfg)
    out_dir = prepare_output_dir(cfg)
    mesh = make_train_mesh(cfg.mesh, cfg.train, what=what, rows=rows)
    dcfg, tokenizer = load_model_and_tokenizer(cfg.model)
    model = build_train_model(cfg.model, dcfg, module)
    mcfg = cfg.model
    source = mcfg.path if mcfg.path else f"preset {mcfg.preset!r}, random init (seed {cfg.train.seed})"
    log(
        f"model: {source}: {dcfg.family}, {dcfg.num_params / 1e6:.1f}M parameters, compute "
        f"{model.dtype.__name__}; mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} "
        f"device(s){describe}"
    )
    tok_source = mcfg.tokenizer or mcfg.path or f"bundled tiny tokenizer ({tiny_tokenizer_dir()})"
    log(f"tokenizer: {tok_source} ({len(tokenizer)} tokens)")
    bundled = " (bundled toy set)" if cfg.data.use_bundled else ""
    log(
        f"data: train {', '.join(resolve_files(cfg.data, 'train'))}{bundled}; eval "
        f"{', '.join(resolve_files(cfg.data, 'eval')) or 'none'}"
    )
    return Run(cfg=cfg, out_dir=out_dir, mesh=mesh, dcfg=dcfg, tokenizer=tokenizer, model=model)
