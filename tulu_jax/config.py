"""Typed run configs. One YAML per experiment in `configs/`, overridable as `dotted.key=value`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import Literal

from tulu_jax.data.pipeline import DataConfig
from tulu_jax.data.preference import PreferenceDataConfig
from tulu_jax.train.optimizer import OptimConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face model folder (config.json + safetensors); null builds `preset` with random weights"
        },
    )
    preset: str = field(default="tiny", metadata={"help": "architecture preset used when path is null"})
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "tokenizer folder; null uses model.path, or the bundled tiny tokenizer when path is null"},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16"},
    )
    param_dtype: str = field(default="float32", metadata={"help": "dtype of the master weights"})
    remat: bool = field(default=False, metadata={"help": "rematerialise each layer in the backward pass"})
    scan_unroll: int = field(
        default=1,
        metadata={
            "help": "layers per iteration of the layer scan; a large value unrolls fully (faster steps on CPU and "
            "small models, longer compiles)"
        },
    )
    attention_block: int = field(
        default=256,
        metadata={
            "help": "causal attention in query blocks of this size that skip the masked upper triangle (same "
            "result, about half the attention work at long lengths); 0: one full T x T block"
        },
    )

    def __post_init__(self):
        for name in ("path", "tokenizer"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.path.expanduser(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    data: int = field(default=-1, metadata={"help": "data-parallel axis size (-1: the remaining devices)"})
    fsdp: int = field(default=1, metadata={"help": "fully sharded data-parallel axis size (-1: the rest)"})
    tensor: int = field(default=1, metadata={"help": "tensor-parallel axis size (-1: the rest)"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seed: int = field(default=123, metadata={"help": "seed of the initialisation, data order and RNG"})
    batch_size: int = field(
        default=8,
        metadata={
            "help": "rows per optimizer step, over all devices (a row holds max_seq_len tokens; packed rows hold "
            "several conversations)"
        },
    )
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    num_epochs: int = field(default=2, metadata={"help": "passes over the training data"})
    max_steps: int = field(
        default=-1,
        metadata={
            "help": "stop after this many optimizer steps (-1: run all epochs); also sets the LR schedule length"
        },
    )
    log_every: int = field(default=1, metadata={"help": "write metrics every N steps"})
    eval_every: int = field(
        default=0,
        metadata={"help": "evaluate on data.eval_files every N steps and at the end (0: only at the end; -1: never)"},
    )

    def __post_init__(self):
        if self.batch_size <= 0 or self.grad_accum_steps <= 0 or self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum_steps "
                f"({self.grad_accum_steps})"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTTrainConfig(TrainConfig):
    loss_reduction: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"help": "sum: token NLL summed per sequence, averaged over sequences (Tülu 3); mean: per-token mean"},
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_steps: int = field(default=100, metadata={"help": "save a checkpoint every N steps (0: only at the end)"})
    keep: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    enabled: bool = field(default=True, metadata={"help": "export the final model to OUTPUT_DIR/hf"})
    dtype: str = field(default="float32", metadata={"help": "dtype of the exported safetensors"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    output_dir: str = field(default="runs/sft-tiny", metadata={"help": "where checkpoints, metrics and hf/ go"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --- preference tuning (DPO family) and the reward model ---------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceTrainConfig(TrainConfig):
    batch_size: int = field(default=8, metadata={"help": "preference pairs per optimizer step, over all devices"})
    num_epochs: int = field(default=1, metadata={"help": "passes over the preference data"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOOptimConfig(OptimConfig):
    lr: float = field(default=5e-7, metadata={"help": "peak learning rate (Tülu 3 DPO: 5e-7 for 8B, 2e-7 for 70B)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming up linearly"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOLossConfig:
    loss: Literal["dpo", "dpo_norm", "simpo", "ipo", "wpo"] = field(
        default="dpo_norm", metadata={"help": "preference loss (Tülu 3: dpo_norm, the length-normalized DPO)"}
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "β; null: the loss's default (dpo_norm 5 as in Tülu 3, simpo 2, dpo/ipo/wpo 0.1)"},
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative-DPO label flip probability ε"})
    gamma_beta_ratio: float = field(default=0.3, metadata={"help": "SimPO target margin γ/β"})
    reference: Literal["cache", "live"] = field(
        default="cache",
        metadata={
            "help": "cache: reference log-probs computed once before training and stored on disk (reused on "
            "resume); live: a frozen reference model runs alongside the policy every step"
        },
    )
    reference_path: str | None = field(
        default=None,
        metadata={"help": "reference model folder; null: the model the policy starts from (model.path or preset)"},
    )
    reference_cache_dir: str | None = field(
        default=None, metadata={"help": "folder of the reference log-prob cache; null: OUTPUT_DIR/reference_cache"}
    )

    def __post_init__(self):
        if self.beta is None:  # β = 5 is only sensible with length normalization (spec §9.8)
            from tulu_jax.losses.preference import DEFAULT_BETA

            object.__setattr__(self, "beta", DEFAULT_BETA[self.loss])
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"need beta > 0 and 0 <= label_smoothing < 0.5, got {self.beta}, {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    output_dir: str = field(default="runs/dpo-tiny", metadata={"help": "where checkpoints, metrics and hf/ go"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    optim: DPOOptimConfig = field(default_factory=DPOOptimConfig)
    train: PreferenceTrainConfig = field(default_factory=PreferenceTrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMOptimConfig(OptimConfig):
    lr: float = field(default=3e-6, metadata={"help": "peak learning rate (Tülu 3 8B RM: 3e-6)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps spent warming up linearly"})
    eps: float = field(default=1e-5, metadata={"help": "Adam epsilon (Tülu 3 RM: 1e-5)"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
    output_dir: str = field(default="runs/rm-tiny", metadata={"help": "where checkpoints, metrics and hf/ go"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: RMOptimConfig = field(default_factory=RMOptimConfig)
    train: PreferenceTrainConfig = field(default_factory=PreferenceTrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
