"""Per-step metrics: deferred read-back, the non-finite stop, metrics.jsonl/TensorBoard and the progress bar.

Reading a step's metrics waits for that step to finish on the device. The reporter therefore keeps the
metrics of the step just dispatched and reads them only after the next step has been dispatched
(`submit` -> `flush`), so the host never stalls the device. Any trainer (SFT, DPO, RM, PPO with several
updates per step) reports through it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
from tqdm import tqdm

from tulu_jax.train.metrics import MetricsLogger

# Metrics whose non-finite value means the parameters are (or are about to be) ruined.
FATAL_METRICS = ("loss", "grad_norm")


def log(msg: str) -> None:
    """One line on the console (process 0 only), printed above the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(f"[tulu_jax] {msg}")


class NonFiniteError(FloatingPointError):
    """A step produced a NaN or infinite loss or gradient norm; the run stopped before checkpointing it."""


class MetricsReporter:
    """Logs each step's device metrics once they are ready.

    `submit(step, metrics, host=..., extra=...)` queues step N's (device) metrics and reports step N-1's;
    `flush()` reports what is queued. Reporting a step reads its metrics (float), stops the run with
    NonFiniteError when any of `FATAL_METRICS` present is NaN/inf (naming `last_good()`, e.g. the latest
    checkpoint), adds host-side figures (`host["tokens"]` becomes `tokens_per_s`), writes every
    `log_every`-th step (and `total_steps`) to `logger`, and advances the progress bar.
    """

    def __init__(
        self,
        *,
        name: str,
        start: int,
        total_steps: int,
        logger: MetricsLogger,
        log_every: int = 1,
        show: tuple[str, ...] = ("loss",),
        last_good: Callable[[], str] = lambda: "none",
    ):
        self.logger, self.log_every, self.total_steps, self.show = logger, max(log_every, 1), total_steps, show
        self._last_good = last_good
        self._bar = tqdm(
            total=total_steps, initial=start, desc=name, disable=jax.process_index() != 0, dynamic_ncols=True
        )
        self._pending: tuple | None = None
        self._clock = time.perf_counter()
        self.last: dict[str, Any] = {}

    def submit(
        self,
        step: int,
        metrics: dict,
        host: dict[str, float] | None = None,
        extra: dict | None = None,
        late: Callable[[], dict] | None = None,
    ):
        """Queue step `step`'s metrics (device arrays); report the previously queued step first. `late()`
        (e.g. an evaluation) runs when the step is reported, after its time is taken, and its metrics join
        the step's row; its own time counts towards no step's tokens_per_s."""
        previous, self._pending = self._pending, (step, metrics, host or {}, extra or {}, late)
        if previous is not None:
            self._report(*previous)

    def flush(self) -> None:
        """Report the queued step now (e.g. before a checkpoint: a non-finite step must never be saved)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._report(*pending)

    def log_now(self, step: int, metrics: dict[str, float]) -> None:
        """Write host metrics (e.g. an evaluation before the first step) straight to the logger."""
        self.logger.log(step, metrics)

    def _report(self, step: int, metrics: dict, host: dict[str, float], extra: dict, late=None) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for that step
        bad = {k: metrics[k] for k in FATAL_METRICS if k in metrics and not math.isfinite(metrics[k])}
        if bad:
            what = ", ".join(f"{k} is {v}" for k, v in bad.items())
            raise NonFiniteError(f"{what} at step {step}; the last good checkpoint is {self._last_good()}")
        now = time.perf_counter()
        metrics.update({k: v for k, v in host.items() if k != "tokens"})
        metrics["tokens_per_s"] = host.get("tokens", 0.0) / max(now - self._clock, 1e-9)
        if late is not None:
            metrics.update(late())
            now = time.perf_counter()
        self._clock = now
        metrics.update(extra)
        if step % self.log_every == 0 or step == self.total_steps:
            self.logger.log(step, metrics)
        post = {k: f"{metrics[k]:.4g}" for k in self.show if k in metrics}
        post["tok_s"] = f"{metrics['tokens_per_s']:.0f}"
        self._bar.set_postfix(post)
        self._bar.update(1)
        self.last = {**metrics, "step": step}

    def close(self) -> None:
        self._bar.close()
        self.logger.close()
