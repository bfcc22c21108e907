"""Typed run configs. One YAML per experiment in `configs/`, overridable as `dotted.key=value`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import Literal

from tulu_jax.data.pipeline import DataConfig
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
    loss_reduction: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"help": "sum: token NLL summed per sequence, averaged over sequences (Tülu 3); mean: per-token mean"},
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
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
