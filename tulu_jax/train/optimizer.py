"""Optimizer and learning-rate schedule (AdamW, linear warm-up then linear decay to zero, global-norm clip)."""

from __future__ import annotations

import optax

from tulu_jax.config import OptimConfig


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
