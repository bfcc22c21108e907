"""Per-step metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    """Appends to OUTPUT_DIR/metrics.jsonl. On resume from step S, lines after S are dropped first: the
    resumed run recomputes them, so the file ends up as if the run had never stopped."""

    def __init__(self, output_dir: str, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and _step_of(line) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends {"step": step, **metrics} (non-finite values as null) and the numeric ones to TensorBoard."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Closes metrics.jsonl and the TensorBoard writer."""
        if self.enabled:
            self._file.close()
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError):
        return 1 << 62  # a torn last line from a killed run: drop it


def _clean(v):
    v = float(v) if hasattr(v, "__float__") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_metrics(output_dir: str) -> dict[int, dict]:
    """OUTPUT_DIR/metrics.jsonl as {step: row}; where a step appears twice (a run resumed before the file was
    trimmed), the later row wins. FileNotFoundError when the file is missing."""
    rows: dict[int, dict] = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return rows
