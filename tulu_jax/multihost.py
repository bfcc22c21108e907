"""Decisions that every process of a multi-host run must take the same way.

A decision that depends on local files (does a cache exist? is a checkpoint there?) can come out
differently on different hosts (a file still being written, a shared filesystem's lag); if the hosts then
run different collectives the job hangs. Such decisions are taken once, on process 0, and shared.
"""

from __future__ import annotations

import jax
import numpy as np


def process_zero_value(value: int) -> int:
    """Process 0's `value` (an int), on every process (a broadcast when there are several processes)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def process_zero_decides(flag: bool) -> bool:
    """Process 0's `flag`, on every process."""
    return bool(process_zero_value(int(bool(flag))))
