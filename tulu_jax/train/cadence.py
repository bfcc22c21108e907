"""When periodic work (evaluation, checkpoints) falls due. Steps count from 1; step 0 is the start."""

from __future__ import annotations


def eval_due(step: int, every: int, total_steps: int) -> bool:
    """Evaluate after `step`? Every `every` steps (> 0) and always after the last step; `every` = 0 means
    only at the end. (Whether to evaluate at all, e.g. `eval_every: -1`, is the evaluator's business.)"""
    return (every > 0 and step % every == 0) or step == total_steps


def checkpoint_due(step: int, every: int) -> bool:
    """Save after `step`? Every `every` steps (> 0); the last step is saved by the loop regardless."""
    return every > 0 and step % every == 0
