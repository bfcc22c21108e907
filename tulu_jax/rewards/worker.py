"""The Scorer's worker process: verifies chunks of items sent over its pipe, in order.

Before each item it writes (index in chunk, start time in CLOCK_MONOTONIC ns) to a shared array, so that
the parent can tell which item overran its deadline without a message per item. Imports only the
verifiers (no JAX): it starts in a forkserver/spawn child, never a fork of the (threaded) trainer.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import threading
import time

from tulu_jax.rewards.math_answer import symbolic_equiv
from tulu_jax.rewards.registry import verify


def warm_up() -> None:
    """Imports math-verify and runs one symbolic comparison, so the first real item does not pay for its
    set-up (parser, regexes: about a second). Done once in the forkserver (see scorer.py), whose forks
    inherit it, and again in each worker in case the forkserver was started by someone else."""
    symbolic_equiv("2\\sqrt{2}", "\\sqrt{8}")


def verify_chunk(items, legacy: frozenset[str], progress) -> list[tuple]:
    """(score, status, details, elapsed_s, message) for every (dataset, response, ground_truth) of
    `items`; a verifier's exception becomes status "error" with score 0."""
    out = []
    for i, (dataset, response, ground_truth) in enumerate(items):
        progress[1] = time.monotonic_ns()
        progress[0] = i  # after the start time, so the parent never pairs this index with an older start
        start = time.perf_counter()
        try:
            v = verify(dataset, response, ground_truth, legacy)
            out.append((v.score, "ok", v.details, time.perf_counter() - start, ""))
        except Exception as e:  # noqa: BLE001 - any verifier failure scores 0, never reaches the trainer
            message = f"{type(e).__name__}: {str(e)[:300]}"
            out.append((0.0, "error", None, time.perf_counter() - start, message))
    progress[1] = time.monotonic_ns()
    progress[0] = -1
    return out


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_owner(owner_alive) -> None:
    """Makes this process exit when the Scorer's owner dies, even mid-hang in a verifier.

    `owner_alive` is the read end of a pipe whose write end only the owner holds (and never writes): a
    daemon thread blocks on it and calls os._exit(1) at EOF. A verifier stuck in pure Python (sympy) still
    lets that thread run. On Linux the worker also asks for SIGKILL when its parent, the forkserver, dies
    (the forkserver exits when the owner does), which also covers a verifier holding the GIL in C code."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog thread alone
            pass

    def watch() -> None:
        try:
            owner_alive.poll(None)  # readable only at EOF: the owner never writes
        except (OSError, EOFError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="owner-watchdog", daemon=True).start()


def worker_main(conn, progress, legacy: frozenset[str], plugins: tuple[str, ...] = (), owner_alive=None) -> None:
    """Imports `plugins`, then serves (chunk_id, items) requests from `conn` until None or EOF, answering
    (chunk_id, results). With `owner_alive` (see `exit_with_owner`) it exits when the owner dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it kills us)
    if owner_alive is not None:
        exit_with_owner(owner_alive)
    for name in plugins:
        importlib.import_module(name)
    warm_up()
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        chunk_id, items = msg
        conn.send((chunk_id, verify_chunk(items, legacy, progress)))
