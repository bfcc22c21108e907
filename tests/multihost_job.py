"""Runs one `tulu-jax` command (or any Python module) as an N-process JAX job on this machine: the processes
join on a loopback coordinator through the same environment variables a pod launcher sets, each with its
own CPU devices, so together they see one global mesh (e.g. 2 processes x 4 devices = a 2x2x2 mesh)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, processes: int, devices: int, port: int) -> dict:
    """Environment of process `process_id` of a `processes`-process job with `devices` CPU devices each."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if processes > 1:
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(processes),
            JAX_PROCESS_ID=str(process_id),
        )
    else:
        for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            env.pop(var, None)
    return env


def start(args: list[str], processes: int = 2, devices: int = 4, logs: Path | None = None) -> list[subprocess.Popen]:
    """Starts `python ARGS` (e.g. ["-m", "tulu_jax.cli", "sft", ...]) as every process of one job. Output goes
    to `logs`/process-<i>.log when given, else is captured (read it with `finish`)."""
    port, procs = free_port(), []
    for i in range(processes):
        out = open(logs / f"process-{i}.log", "w") if logs is not None else subprocess.PIPE  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=process_env(i, processes, devices, port),
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=REPO,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    """Waits for every process -> [(exit code, output)]; kills them all when one overruns `timeout` s."""
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out or ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def ok(results: list[tuple[int, str]]) -> str:
    """Process 0's output, after checking that every process exited 0 (else the failing one's output tail)."""
    for i, (code, out) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{out[-4000:]}"
    return results[0][1]


def run(args: list[str], processes: int = 2, devices: int = 4, timeout: float = 900) -> list[tuple[int, str]]:
    """`start` then `finish`: every process's (exit code, output)."""
    return finish(start(args, processes, devices), timeout)
