"""Typed run configs, all of them: one YAML per experiment in `configs/`, overridable as `dotted.key=value`.

This module is the one home of every config class and imports nothing heavy (no JAX, Grain or train code),
so tools, launchers and tests can read and check a config without building anything. Validation here is
about the values themselves; whether files exist is checked when a run starts (`tulu_jax.train.setup`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import ClassVar, Literal

ON_BAD_ROW = ("error", "skip")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # parameter and export dtypes; compute also takes "auto"
CHAT_TEMPLATES = ("tulu", "model")
LABEL_MODES = ("all", "final")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model a run starts from (an HF folder, or a preset for toy runs), its tokenizer, dtypes and
    compute options (remat, layer-scan unroll, attention block, logits chunk). ValueError on bad values."""

    path: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face model folder (config.json + safetensors) to start from; required unless `preset` "
            "is set"
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "build this architecture preset with random weights instead of loading model.path (toy runs and "
            "shape checks only; the tiny configs set `tiny`); must be null when path is set"
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "tokenizer folder; null: model.path's tokenizer, or the bundled 1,024-token tiny tokenizer when "
            "a preset is built"
        },
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

    logits_chunk: int = field(
        default=512,
        metadata={
            "help": "next-token log-probs in chunks of this many positions, so the float32 [batch, length, vocab] "
            "logits never exist whole (the backward pass recomputes each chunk); 0: all positions at once"
        },
    )

    def __post_init__(self):
        for name in ("path", "tokenizer"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.path.expanduser(value))
        if self.path is not None and self.preset is not None:
            raise ValueError(f"set model.path or model.preset, not both (got {self.path!r} and {self.preset!r})")
        if self.logits_chunk < 0:
            raise ValueError(f"logits_chunk must be >= 0, got {self.logits_chunk}")
        if self.dtype not in ("auto", *DTYPE_NAMES) or self.param_dtype not in DTYPE_NAMES:
            raise ValueError(
                f"dtype must be auto or one of {DTYPE_NAMES} and param_dtype one of {DTYPE_NAMES}, got "
                f"{self.dtype!r} and {self.param_dtype!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up then linear decay to 0 and global-norm clipping (Tülu 3 §4; open-instruct
    `finetune.py`). lr in 1/step units of the parameters; ValueError for lr < 0 or warmup_ratio outside [0, 1]."""

    lr: float = field(default=5e-6, metadata={"help": "peak learning rate (Tülu 3 SFT: 5e-6 for 8B, 2e-6 for 70B)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the steps spent warming up linearly"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    b1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    b2: float = field(default=0.999, metadata={"help": "Adam beta2"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "global-norm gradient clip; <= 0 disables it"})

    def __post_init__(self):
        if self.lr < 0 or not 0 <= self.warmup_ratio <= 1:
            raise ValueError(
                f"lr must be >= 0 and warmup_ratio in [0, 1] (got lr={self.lr}, warmup_ratio={self.warmup_ratio})"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataFilesConfig:
    """What every data section has: files, row length, bad-row policy, shuffling, template, readers.
    `bundled` names the asset folder that `use_bundled: true` trains on."""

    bundled: ClassVar[str] = "tiny_chat"

    train_files: tuple[str, ...] = field(
        default=(),
        metadata={"help": "training data: .jsonl, .parquet or datasets.save_to_disk folders (required)"},
    )
    eval_files: tuple[str, ...] = field(
        default=(),
        metadata={"help": "held-out data, same formats; empty: no evaluation (or the bundled eval split)"},
    )
    use_bundled: bool = field(
        default=False,
        metadata={
            "help": "train and evaluate on the bundled toy set shipped with the package instead of train_files "
            "(the tiny configs); never a silent fallback"
        },
    )
    max_seq_len: int = field(
        default=256,
        metadata={
            "help": "tokens per row (preference pairs: per side); longer examples are cut on the right (pairs lose "
            "the end of the reply, never the prompt)"
        },
    )
    on_bad_row: str = field(
        default="error",
        metadata={"help": "'error': stop at the first invalid row; 'skip': skip it and count it in stats"},
    )
    shuffle: bool = field(default=True, metadata={"help": "shuffle examples (seeded, reshuffled each epoch)"})
    chat_template: str = field(
        default="tulu",
        metadata={
            "help": "'tulu': the Tülu 3 format (default); 'model': the template stored with "
            "the tokenizer (chat_template.jinja or tokenizer_config.json), trained spans = each reply plus its "
            "end-of-turn token(s)"
        },
    )
    num_workers: int = field(
        default=0, metadata={"help": "Grain read threads and prefetch; 0 = read in the calling thread"}
    )

    def __post_init__(self):
        for name in ("train_files", "eval_files"):  # YAML gives lists; keep the config hashable.
            object.__setattr__(self, name, tuple(os.path.expanduser(str(p)) for p in getattr(self, name)))
        if self.on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {self.on_bad_row!r}")
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"unknown chat_template {self.chat_template!r}; known: {list(CHAT_TEMPLATES)}")
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.use_bundled and (self.train_files or self.eval_files):
            raise ValueError(
                "use_bundled=true (train on the bundled toy set) and train_files/eval_files are both set: add "
                "data.use_bundled=false to use your files"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(DataFilesConfig):
    """SFT data: conversations with `messages` (bundled: tiny_chat)."""

    pack: bool = field(
        default=True,
        metadata={"help": "pack several conversations per row (first-fit), with segment ids and restarting positions"},
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreferenceDataConfig(DataFilesConfig):
    """Preference pairs (bundled: tiny_prefs). max_seq_len counts tokens per side: chosen and rejected are
    each cut on the right, and pairs whose prompt leaves no room for a reply token are skipped."""

    bundled: ClassVar[str] = "tiny_prefs"

    label: str = field(
        default="all",
        metadata={
            "help": "'all': train every assistant turn, as the reference does; 'final': only the last reply and its EOS"
        },
    )

    trim_padding: bool = field(
        default=True,
        metadata={
            "help": "pad each batch only to its longest side rounded up to a power of two (at least 64, at most "
            "max_seq_len) instead of always to max_seq_len: no compute on padding columns, a few compiled shapes"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.label not in LABEL_MODES:
            raise ValueError(f"label must be one of {LABEL_MODES}, got {self.label!r}")
        if self.max_seq_len < 2:
            raise ValueError(f"need max_seq_len >= 2 (a prompt token and a reply token), got {self.max_seq_len}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device-mesh axis sizes (`data`, `fsdp`, `tensor`); -1 takes the remaining devices."""

    data: int = field(default=-1, metadata={"help": "data-parallel axis size (-1: the remaining devices)"})
    fsdp: int = field(default=1, metadata={"help": "fully sharded data-parallel axis size (-1: the rest)"})
    tensor: int = field(default=1, metadata={"help": "tensor-parallel axis size (-1: the rest)"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Run length, global batch (rows over all devices), accumulation, seed and logging/eval cadence.
    ValueError for a batch that is not a positive multiple of grad_accum_steps or non-positive counts."""

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
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of steps or -1 (all epochs), got {self.max_steps}")
        if self.batch_size <= 0 or self.grad_accum_steps <= 0 or self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a positive multiple of grad_accum_steps "
                f"({self.grad_accum_steps})"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTTrainConfig(TrainConfig):
    """TrainConfig plus the SFT loss reduction (Tülu 3: `sum`, open-instruct `--reduce_loss sum`)."""

    loss_reduction: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"help": "sum: token NLL summed per sequence, averaged over sequences (Tülu 3); mean: per-token mean"},
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoint cadence (steps) and how many to keep (>= 1). ValueError otherwise."""

    every_steps: int = field(default=100, metadata={"help": "save a checkpoint every N steps (0: only at the end)"})
    keep: int = field(default=2, metadata={"help": "how many recent checkpoints to keep (>= 1: a run must resume)"})

    def __post_init__(self):
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints kept on disk), got {self.keep}")
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0 (0: only at the end), got {self.every_steps}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """The final Hugging Face export to OUTPUT_DIR/hf and its safetensors dtype. ValueError for an unknown dtype."""

    enabled: bool = field(default=True, metadata={"help": "export the final model to OUTPUT_DIR/hf"})
    dtype: str = field(default="float32", metadata={"help": f"dtype of the exported safetensors: {DTYPE_NAMES}"})

    def __post_init__(self):
        if self.dtype not in DTYPE_NAMES:  # checked now, not after hours of training
            raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {self.dtype!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """`tulu-jax sft`: one experiment (Tülu 3 §4 SFT), from YAML plus dotted overrides."""

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
    """TrainConfig for pairwise stages: batch_size counts preference pairs; one epoch by default."""

    batch_size: int = field(default=8, metadata={"help": "preference pairs per optimizer step, over all devices"})
    num_epochs: int = field(default=1, metadata={"help": "passes over the preference data"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOOptimConfig(OptimConfig):
    """OptimConfig with Tülu 3 DPO defaults (lr 5e-7, 10 % warm-up; Tülu 3 §5)."""

    lr: float = field(default=5e-7, metadata={"help": "peak learning rate (Tülu 3 DPO: 5e-7 for 8B, 2e-7 for 70B)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming up linearly"})


# β when dpo.beta is null: Tülu 3's 5 for the length-normalized loss, SimPO's paper value, 0.1 (TRL) else.
DEFAULT_BETA: dict[str, float] = {"dpo": 0.1, "dpo_norm": 5.0, "simpo": 2.0, "ipo": 0.1, "wpo": 0.1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOLossConfig:
    """The preference loss (Tülu 3 §5: dpo_norm, β 5), its parameters, and how the frozen reference is
    used (cached log-probs or live). ValueError for β <= 0 or label_smoothing outside [0, 0.5)."""

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
        if self.beta is None:  # β = 5 only makes sense with length normalization (Tülu 3 §5, dpo_norm)
            object.__setattr__(self, "beta", DEFAULT_BETA[self.loss])
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss uses reference log-probs (every loss but the reference-free SimPO)."""
        return self.loss != "simpo"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """`tulu-jax dpo`: one preference-tuning experiment (open-instruct `dpo_tune_cache.py`)."""

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
    """OptimConfig with the Tülu 3 8B reward-model defaults (lr 3e-6, eps 1e-5)."""

    lr: float = field(default=3e-6, metadata={"help": "peak learning rate (Tülu 3 8B RM: 3e-6)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps spent warming up linearly"})
    eps: float = field(default=1e-5, metadata={"help": "Adam epsilon (Tülu 3 RM: 1e-5)"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
    """`tulu-jax rm`: one reward-model experiment (open-instruct `reward_modeling.py`)."""

    output_dir: str = field(default="runs/rm-tiny", metadata={"help": "where checkpoints, metrics and hf/ go"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: RMOptimConfig = field(default_factory=RMOptimConfig)
    train: PreferenceTrainConfig = field(default_factory=PreferenceTrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --- RLVR (Tülu 3 §6; open-instruct `ppo_vllm_thread_ray_gtrl.py`, `grpo_fast.py`) ------------------------

RL_ALGOS = ("ppo", "grpo")


def _at_least(section, **minimums) -> None:
    """ValueError naming the first field of `section` below its minimum (one field per message, so the
    config loader can name the key)."""
    for name, low in minimums.items():
        if getattr(section, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(section, name)}")


KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token", "sequence", "constant")
VALUE_INITS = ("reward_model", "policy")
ROLLOUT_BACKENDS = ("local", "vllm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLVRDataConfig(DataFilesConfig):
    """RLVR prompts: Tülu's rows {"messages", "ground_truth", "dataset"} (bundled: the tiny_arith and tiny_if
    train sets; their eval sets for `eval_files`). Every ground truth is checked against its verifier before
    training. `max_seq_len` bounds the prompt: longer prompts are skipped and counted, as the reference drops
    prompts over 2,048 tokens."""

    bundled: ClassVar[tuple[str, ...]] = ("tiny_arith", "tiny_if")

    max_seq_len: int = field(
        default=256,
        metadata={"help": "most prompt tokens (chat template included); longer prompts are skipped and counted"},
    )
    eval_limit: int = field(
        default=0, metadata={"help": "evaluate on at most this many eval prompts (0: all), greedily"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.eval_limit < 0:
            raise ValueError(f"eval_limit must be >= 0, got {self.eval_limit}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Where and how responses are sampled. ValueError for a bad backend, sampling value or async depth."""

    backend: str = field(
        default="local",
        metadata={"help": "local: the in-process JAX sampler on the trainer's devices; vllm: external vLLM servers"},
    )
    servers: tuple[str, ...] = field(
        default=(), metadata={"help": "vLLM server URLs (backend vllm), e.g. [http://h1:8000, http://h2:8000]"}
    )
    max_tokens: int = field(default=2048, metadata={"help": "response length budget (Tülu 3: 2048)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (Tülu 3: 1.0), also in log-probs"})
    top_p: float = field(
        default=1.0,
        metadata={"help": "nucleus sampling; must stay 1.0 (the trainer's log-probs use the full vocabulary)"},
    )
    top_k: int = field(default=0, metadata={"help": "top-k sampling; must stay 0 for training (see top_p)"})
    n: int = field(default=1, metadata={"help": "samples per prompt (Tülu 3 PPO: 1; GRPO: the group size)"})
    async_steps: int = field(
        default=0,
        metadata={
            "help": "0: generate each batch with the latest weights; k >= 1: generate batch t+k while training on "
            "batch t (responses at most k weight versions stale; Tülu 3 ran 1 step off-policy)"
        },
    )
    push_every: int = field(default=1, metadata={"help": "push the policy's weights to the generator every N steps"})
    max_batch: int = field(
        default=0, metadata={"help": "local backend: most rows per sampler call (0: the whole rollout batch)"}
    )
    push_dtype: str = field(
        default="bfloat16",
        metadata={"help": "vllm: dtype of weight pushes, the servers' --dtype (float32: the trainer's exact weights)"},
    )
    weights_dir: str = field(
        default="",
        metadata={
            "help": "vllm: folder pushes are written to, read by every server at the same path; empty: /dev/shm (or "
            "the temp dir) when every server is on this host, else OUTPUT_DIR/pushed_weights (a shared filesystem)"
        },
    )

    def __post_init__(self):
        object.__setattr__(self, "servers", tuple(str(s) for s in self.servers))
        if self.backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"backend must be one of {ROLLOUT_BACKENDS}, got {self.backend!r}")
        if self.backend == "local" and self.servers:
            raise ValueError("servers are only used by backend vllm (set rollout.backend=vllm)")
        _at_least(self, max_tokens=1, n=1, push_every=1, async_steps=0, max_batch=0)
        if self.push_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"push_dtype must be bfloat16, float16 or float32, got {self.push_dtype!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for training rollouts, got {self.temperature}")
        # The trainer's log-probs (old, reference, KL) are over the full vocabulary; samples from a truncated
        # distribution would make every ratio and KL estimate biased.
        for name, full in (("top_p", 1.0), ("top_k", 0)):
            if getattr(self, name) != full:
                raise ValueError(
                    f"{name}={getattr(self, name)}: training rollouts must sample the full distribution (top_p 1.0, "
                    "top_k 0), the support the trainer's log-probs are computed on"
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyLossConfig:
    """What PPO and GRPO share: rewards, KL, the clipped surrogate, epochs and minibatches, aggregation, TIS."""

    verify_reward: float = field(default=10.0, metadata={"help": "score of a verified response (Tülu 3: 10), else 0"})
    non_stop_penalty: float | None = field(
        default=-10.0,
        metadata={"help": "score that REPLACES the verifier's for a response without EOS (Tülu 3: -10); null: off"},
    )
    beta: float = field(default=0.05, metadata={"help": "KL coefficient β (Tülu 3 8B: 0.05, 70B: 0.07)"})
    kl_estimator: str = field(default="k1", metadata={"help": f"per-token KL estimator: {KL_ESTIMATORS}"})
    clip: float = field(default=0.2, metadata={"help": "PPO ratio clip ε (lower side, and upper unless clip_high)"})
    clip_high: float | None = field(
        default=None, metadata={"help": "upper ratio clip (DAPO clip-higher, e.g. 0.28); null: = clip"}
    )
    epochs: int = field(default=4, metadata={"help": "passes over each rollout batch (Tülu 3: 4)"})
    minibatches: int = field(default=1, metadata={"help": "optimizer steps per pass (Tülu 3: 1)"})
    aggregation: str = field(
        default="token",
        metadata={
            "help": "token: mean over all response tokens of the minibatch (Tülu 3, DAPO); sequence: mean of per-"
            "response means (GRPO); constant: token sum / (responses x max_tokens) (Dr. GRPO)"
        },
    )
    tis_cap: float = field(
        default=0.0,
        metadata={
            "help": "truncated importance sampling: weight each token by min(π_trainer/π_sampler, tis_cap) to "
            "correct the sampler/trainer mismatch; 0: off"
        },
    )

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {LOSS_AGGREGATIONS}, got {self.aggregation!r}")
        _at_least(self, beta=0.0, epochs=1, minibatches=1, tis_cap=0.0)
        if not self.verify_reward > 0:
            raise ValueError(f"verify_reward must be > 0 (the score of a verified response), got {self.verify_reward}")
        if not self.clip > 0 or (self.clip_high is not None and not self.clip_high > 0):
            raise ValueError(f"clip and clip_high must be > 0, got {self.clip} and {self.clip_high}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig(PolicyLossConfig):
    """Tülu 3's PPO (§6; open-instruct `ppo_vllm_thread_ray_gtrl.py`): KL in the reward, GAE over a value
    model, whitened advantages, clipped value loss."""

    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ (Tülu 3: 1.0)"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ (Tülu 3: 0.95)"})
    value_clip: float = field(default=0.2, metadata={"help": "value clip around the rollout's values (Tülu 3: 0.2)"})
    value_coef: float = field(default=0.1, metadata={"help": "value-loss coefficient c1 (Tülu 3: 0.1)"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over the batch's tokens"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        _at_least(self, value_coef=0.0)
        if not self.value_clip > 0:
            raise ValueError(f"value_clip must be > 0, got {self.value_clip}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(PolicyLossConfig):
    """The GRPO family (open-instruct `grpo_fast.py`, Tülu 3.1): group-normalised scores as advantages, no
    value model, KL in the loss; Dr. GRPO (no std division, constant aggregation) and DAPO (clip-higher,
    dynamic sampling) by their switches."""

    non_stop_penalty: float | None = field(
        default=None, metadata={"help": "score that replaces the verifier's for a response without EOS; null: off"}
    )
    beta: float = field(default=0.01, metadata={"help": "KL coefficient in the loss (grpo_fast 8B: 0.01)"})
    kl_estimator: str = field(default="k3", metadata={"help": f"KL estimator in the loss: {KL_ESTIMATORS}"})
    epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    normalize_std: bool = field(
        default=True, metadata={"help": "divide by the group's score std (false: Dr. GRPO, mean-centred only)"}
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "drop groups whose samples all scored the same (no signal) and refill from the next prompts (DAPO)"
        },
    )
    max_refills: int = field(
        default=4, metadata={"help": "dynamic sampling: most extra prompt batches drawn to refill one step"}
    )

    def __post_init__(self):
        super().__post_init__()
        _at_least(self, max_refills=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueConfig:
    """PPO's value model: a reward-model export (Tülu 3) or the policy with a fresh scalar head."""

    init: str = field(
        default="reward_model",
        metadata={
            "help": "reward_model: load value.path (a `tulu-jax rm` export; Tülu 3 uses its 8B RM); policy: the "
            "policy's weights plus a fresh score head (no value.path)"
        },
    )
    path: str | None = field(default=None, metadata={"help": "reward-model folder the value model starts from"})
    lr: float | None = field(default=None, metadata={"help": "value learning rate; null: optim.lr (Tülu 3: the same)"})

    def __post_init__(self):
        if self.path is not None:
            object.__setattr__(self, "path", os.path.expanduser(self.path))
        if self.init not in VALUE_INITS:
            raise ValueError(f"init must be one of {VALUE_INITS}, got {self.init!r}")
        if self.init == "policy" and self.path is not None:
            raise ValueError("init=policy starts from the policy's weights: leave value.path null")
        if self.lr is not None and self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLVROptimConfig(OptimConfig):
    """AdamW for the policy (and the value model) with Tülu 3 8B RLVR defaults: lr 3e-7, no warm-up, linear decay,
    weight decay 0.01 (torch's AdamW default, which the reference kept)."""

    lr: float = field(default=3e-7, metadata={"help": "peak learning rate (Tülu 3 RLVR: 3e-7 for 8B, 1e-7 for 70B)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps spent warming up linearly"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay (Tülu 3 RLVR: 0.01)"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLVRTrainConfig(TrainConfig):
    """TrainConfig for RLVR: batch_size counts prompts per step (each sampled rollout.n times); grad_accum_steps
    splits each minibatch into micro-batches."""

    batch_size: int = field(default=8, metadata={"help": "prompts per RL step, over all devices"})
    num_epochs: int = field(default=1, metadata={"help": "passes over the prompts"})
    max_steps: int = field(
        default=-1,
        metadata={
            "help": "stop after this many RL steps (each: one rollout batch, then epochs x minibatches optimizer "
            "updates); -1: all prompts for num_epochs"
        },
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "greedy accuracy on data.eval_files at step 0, every N steps and at the end (0: step 0 and the "
            "end; -1: never)"
        },
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLVRConfig:
    """`tulu-jax rlvr`: one RL-with-verifiable-rewards experiment (Tülu 3 §6). `algo` picks the `ppo` or
    `grpo` section; the other is ignored."""

    output_dir: str = field(default="runs/rlvr-tiny", metadata={"help": "where checkpoints, metrics and hf/ go"})
    algo: str = field(default="ppo", metadata={"help": f"{RL_ALGOS}: Tülu 3's PPO, or the GRPO family"})
    model: ModelConfig = field(default_factory=ModelConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    data: RLVRDataConfig = field(default_factory=RLVRDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: RLVROptimConfig = field(default_factory=RLVROptimConfig)
    train: RLVRTrainConfig = field(default_factory=RLVRTrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        if self.algo not in RL_ALGOS:
            raise ValueError(f"algo must be one of {RL_ALGOS}, got {self.algo!r}")
        if self.algo == "grpo" and self.rollout.n < 2:
            raise ValueError("algo grpo needs rollout.n >= 2 samples per prompt (the group)")
        if self.algo == "grpo" and self.grpo.dynamic_sampling and self.rollout.async_steps > 0:
            # Refills would draw prompts past the batches already in flight, so a checkpoint could not name
            # where the prompt stream stands.
            raise ValueError(
                "grpo.dynamic_sampling needs rollout.async_steps=0 (refills and batches sampled ahead would "
                "interleave in the prompt stream)"
            )

    @property
    def loss(self) -> PolicyLossConfig:
        """The active algorithm's section (`ppo` or `grpo`)."""
        return self.ppo if self.algo == "ppo" else self.grpo
