"""Optimizer and learning-rate schedule (AdamW, linear warm-up then linear decay to zero, global-norm clip)."""

from __future__ import annotations

import dataclasses
from dataclasses import field

import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
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


def linear_schedule(peak_lr: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Warm-up over int(total * ratio) steps (the reference's rounding), then linear decay to 0 at total."""
    warmup = int(total_steps * warmup_ratio)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak_lr, max(warmup, 1)),
            optax.linear_schedule(peak_lr, 0.0, max(total_steps - warmup, 1)),
        ],
        boundaries=[warmup],
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = linear_schedule(cfg.lr, total_steps, cfg.warmup_ratio)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw), schedule
    return adamw, schedule
