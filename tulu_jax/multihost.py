"""Multi-process (multi-host) runs: joining the job, and decisions every process must take the same way.

Joining: `initialize(auto_detect)` calls `jax.distributed.initialize` when the environment names a job
(`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`: what `tpu/launch.sh`, SLURM scripts or a
test harness set) or when `--distributed` asks JAX to find the job itself (TPU pods, SLURM, Open MPI). After
that the run is multi-controller SPMD: every process runs the same program on the global device mesh.

Decisions: one that depends on local files (does a cache exist? is a checkpoint there?) can come out
differently on different hosts (a file still being written, a shared filesystem's lag); if the hosts then
run different collectives the job hangs. Such decisions are taken once, on process 0, and shared.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np

ENV_COORDINATOR, ENV_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class DistributedSetupError(ValueError):
    """The environment describes a multi-process job badly (a missing or non-integer variable), or JAX could
    not join it: reported by the CLI as one line naming the variable."""


def job_from_env(env=None, auto_detect: bool = False) -> dict | None:
    """The job the environment names -> {coordinator_address, num_processes, process_id}, or None when
    JAX_NUM_PROCESSES is unset (with `auto_detect`, JAX may then find the rest itself). DistributedSetupError
    for a partial or malformed description, naming the variable."""
    env = os.environ if env is None else env
    if not env.get(ENV_PROCESSES):
        partial = [v for v in (ENV_COORDINATOR, ENV_PROCESS_ID) if env.get(v)]
        if partial and not auto_detect:
            raise DistributedSetupError(
                f"{' and '.join(partial)} set but {ENV_PROCESSES} is not: set all three to join a multi-process job "
                f"(or none to run alone)"
            )
        return None
    address = env.get(ENV_COORDINATOR, "")
    if not address:
        raise DistributedSetupError(f"{ENV_PROCESSES} is set but {ENV_COORDINATOR} (host:port of process 0) is not")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(f"{ENV_COORDINATOR}={address!r}: expected host:port of process 0 (port 1-65535)")
    out = {"coordinator_address": address}
    for key, var in (("num_processes", ENV_PROCESSES), ("process_id", ENV_PROCESS_ID)):
        raw = env.get(var, "")
        if not raw:
            raise DistributedSetupError(f"{var} is not set: every process of the job needs it")
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
    MPI). On CPU devices cross-process collectives go through gloo (JAX's default). DistributedSetupError
    (one line) when the job is described badly or cannot be detected; JAX itself ends the process when the
    others do not join within `timeout_s` seconds. Once joined, SIGTERM (a launcher's stop, a preemption
    notice) interrupts the run like Ctrl-C: the last checkpoint stays, and the same command resumes."""
    job = job_from_env(auto_detect=auto_detect)
    if job is None and not auto_detect:
        return False
    where = f"at {job['coordinator_address']} as process {job['process_id']}" if job else "(detected by JAX)"
    total = f"a {job['num_processes']}-process job" if job else "a multi-process job"
    print(f"[tulu_jax] joining {total} {where}; waiting up to {timeout_s} s for every process", flush=True)
    try:
        jax.distributed.initialize(**(job or {}), initialization_timeout=timeout_s)
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if job is None:
            raise DistributedSetupError(
                f"--distributed: JAX found no multi-process job here ({first}); it detects TPU pod slices, SLURM "
                f"and Open MPI, elsewhere set {ENV_COORDINATOR}, {ENV_PROCESSES} and {ENV_PROCESS_ID}"
            ) from None
        raise DistributedSetupError(
            f"cannot join the multi-process job at {ENV_COORDINATOR}={job['coordinator_address']} as process "
            f"{job['process_id']} of {job['num_processes']}: {first}"
        ) from None
    print(
        f"[tulu_jax] joined: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} of {jax.device_count()} devices here",
        flush=True,
    )

    def interrupt(signum, frame):  # JAX's own SIGTERM handler would only note it and train on
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
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


def to_host(tree):
    """Every array of `tree` as a whole numpy array on this process: arrays that span other processes'
    devices are all-gathered (a collective: every process must call it at the same point), the rest fetched."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def broadcast_object(obj):
    """Process 0's `obj` (anything picklable; the others pass anything, e.g. None) on every process. Between
    the job's own processes only, so unpickling trusts its source. A collective: every process calls it."""
    if jax.process_count() == 1:
        return obj
    import pickle

    from jax.experimental import multihost_utils

    data = pickle.dumps(obj) if jax.process_index() == 0 else b""
    size = process_zero_value(len(data))
    # Padded to a power of two (>= 4 KiB): the broadcast compiles once per shape, not once per payload.
    buf = np.zeros(max(4096, 1 << (size - 1).bit_length()), np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return pickle.loads(buf[:size].tobytes())  # noqa: S301 - bytes from process 0 of this same job


class ProcessZeroError(RuntimeError):
    """Raised on the other processes when work that process 0 led failed there (its message included)."""


def process_zero_result(fn):
    """Runs `fn()` on every process and returns process 0's result everywhere (a collective). `fn` does
    this process's share: on process 0 the work whose result counts (e.g. talking to vLLM), elsewhere
    perhaps nothing, or the same SPMD program. If it raises on process 0, the exception is re-raised there
    and a ProcessZeroError with its message on the others, so no process waits for process 0 forever; if it
    raises only elsewhere, that process raises its own exception after the broadcast."""
    if jax.process_count() == 1:
        return fn()
    value, failure = None, None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - shared first, re-raised below
        failure = e
    lead = jax.process_index() == 0
    outcome = ("ok", value) if failure is None else ("error", f"{type(failure).__name__}: {failure}")
    shared = broadcast_object(outcome if lead else None)
    if failure is not None:
        raise failure
    if shared[0] == "error":
        raise ProcessZeroError(f"process 0 failed: {shared[1]}")
    return shared[1]
