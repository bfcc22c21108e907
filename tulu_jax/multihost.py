"""Multi-process (multi-host) runs: joining the job, and decisions every process must take the same way.

Joining: `initialize(flag)` calls `jax.distributed.initialize` when the environment names a job
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`: what `tpu/launch.sh`, SLURM scripts or a
test harness set) or when `--distributed` asks JAX to find the job itself (TPU pods, SLURM, Open MPI). After
that the run is multi-controller SPMD: every process runs the same program on the global device mesh.

Decisions: one that depends on local files (does a cache exist? is a checkpoint there?) can come out
differently on different hosts (a file still being written, a shared filesystem's lag); if the hosts then
run different collectives the job hangs. Such decisions are taken once, on process 0, and shared.
"""

from __future__ import annotations

import os

import jax
import numpy as np

ENV_COORDINATOR, ENV_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class DistributedSetupError(ValueError):
    """The environment describes a multi-process job badly (a missing or non-integer variable), or JAX could
    not join it: reported by the CLI as one line naming the variable."""


def job_from_env(env=None) -> dict | None:
    """The job the environment names -> {coordinator_address, num_processes, process_id}, or None when
    JAX_NUM_PROCESSES is unset. DistributedSetupError for a partial or malformed description."""
    env = os.environ if env is None else env
    if not env.get(ENV_PROCESSES):
        return None
    out = {"coordinator_address": env.get(ENV_COORDINATOR, "")}
    if not out["coordinator_address"]:
        raise DistributedSetupError(f"{ENV_PROCESSES} is set but {ENV_COORDINATOR} (host:port of process 0) is not")
    for key, var in (("num_processes", ENV_PROCESSES), ("process_id", ENV_PROCESS_ID)):
        raw = env.get(var, "")
        try:
            out[key] = int(raw)
        except ValueError:
            raise DistributedSetupError(f"{var}={raw!r}: expected an integer") from None
    if out["num_processes"] < 1 or not 0 <= out["process_id"] < out["num_processes"]:
        raise DistributedSetupError(
            f"{ENV_PROCESS_ID}={out['process_id']} with {ENV_PROCESSES}={out['num_processes']}: need 0 <= id < count"
        )
    return out


def initialize(auto_detect: bool = False, timeout_s: int = 300) -> bool:
    """Joins the multi-process job if there is one -> whether it did. The environment's job (see
    `job_from_env`) wins; else with `auto_detect` JAX finds the job itself (TPU pod metadata, SLURM, Open
    MPI). On CPU devices cross-process collectives go through gloo. DistributedSetupError (one line) when
    the job cannot be joined within `timeout_s` seconds or cannot be detected."""
    job = job_from_env()
    if job is None and not auto_detect:
        return False
    if (os.environ.get("JAX_PLATFORMS") or "").strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**(job or {}), initialization_timeout=timeout_s)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"coordinator {job['coordinator_address']}" if job else "auto-detected job (--distributed)"
        raise DistributedSetupError(f"cannot join the multi-process job ({where}): {first}") from None
    return True


def process_zero_value(value: int) -> int:
    """Process 0's `value` (an int), on every process (a broadcast when there are several processes)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def process_zero_decides(flag: bool) -> bool:
    """Process 0's `flag`, on every process."""
    return bool(process_zero_value(int(bool(flag))))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier called `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_zero_text(text: str, max_bytes: int = 4096) -> str:
    """Process 0's `text` (UTF-8, at most `max_bytes` bytes), on every process (a broadcast when there are
    several): e.g. a folder name only process 0 chose; the others' `text` is ignored. ValueError (on every
    process alike, after the broadcast) when process 0's text is longer than `max_bytes`."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    raw = text.encode() if jax.process_index() == 0 else b""
    too_long = len(raw) > max_bytes
    buf = np.zeros(max_bytes + 2, np.uint8)  # [too long?, text bytes..., 0 end marker]
    buf[0] = too_long
    if not too_long:
        buf[1 : 1 + len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8).tobytes()
    if out[0]:
        raise ValueError(f"process_zero_text: process 0's text is longer than max_bytes={max_bytes}")
    return out[1 : out.index(0, 1)].decode()
