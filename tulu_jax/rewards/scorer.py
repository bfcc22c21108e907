"""Verifying many responses under a hard per-response deadline, in a pool of worker processes.

A verifier can run for minutes on a hostile response (sympy expanding `(x+y+z)^{999}`), in C code that no
signal-based timeout interrupts, and math-verify's SIGALRM timeout does nothing outside the main thread.
So the deadline is enforced from outside: each worker is a process that reports which item it is on and
since when (a shared array); one that overruns `timeout_s` on an item is SIGKILLed and replaced, that
item scores 0 with status "timeout", and the rest of its chunk is sent again. A worker that dies
outright marks its current item "error". A replacement worker has `start_timeout_s` to start, like the
first ones; a failed start (death or overrun) is retried, up to START_TRIES times in a row per slot.
Items travel in chunks (one pipe message per chunk), so cheap verifiers (GSM8K, IF) are not dominated
by IPC.

The pool starts once, from a forkserver (the parent may run JAX threads, which fork would copy into a
broken state), and is reused by every `score` call. Not thread-safe: one `score` call at a time.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait

from tulu_jax.rewards.registry import canonical_dataset
from tulu_jax.rewards.verdict import STATUSES, Verdict
from tulu_jax.rewards.worker import worker_main

MAX_CHUNK = 256
START_TIMEOUT_S = 300.0  # a cold start imports sympy and math-verify in every worker
START_TRIES = 3  # consecutive failed starts of one worker slot before `score` gives up
# Default pool size cap: each worker is a process holding its own sympy and math-verify (~100 MB), and
# past a few workers the parent's IPC, not verification, limits throughput. Shared by `verify` and `eval`.
DEFAULT_MAX_WORKERS = 8
# The forkserver imports these once; each worker is then a cheap fork of it.
_PRELOAD = ["tulu_jax.rewards.warm"]


@dataclass(frozen=True)
class VerifyItem:
    """One response to verify: `dataset` (a name `canonical_dataset` knows, e.g. "gsm8k", "MATH"),
    `response` (the model output; the text after its last `<|assistant|>\\n` is checked) and
    `ground_truth` (None scores 0)."""

    dataset: str
    response: str
    ground_truth: str | None


def default_workers() -> int:
    """The default Scorer pool size: one worker per CPU (os.cpu_count(), 1 when unknown), at most
    DEFAULT_MAX_WORKERS."""
    return min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS)


def parse_legacy(if_semantics: str) -> frozenset[str]:
    """The IF functions to run with 2024 semantics for an `--if-semantics` spec (`head` in any case, `2024`,
    `2024:f1,f2`), parsed by `tulu_jax.rewards.ifeval.parse_if_semantics` (imported only when the spec is
    not "head"). Raises ValueError for a bad spec."""
    if isinstance(if_semantics, str) and if_semantics.lower() == "head":
        return frozenset()
    from tulu_jax.rewards.ifeval import parse_if_semantics

    return frozenset(parse_if_semantics(if_semantics))


class _Worker:
    """One worker process, its pipe, its progress array and the chunk it is working on."""

    def __init__(self, ctx, legacy: frozenset[str], plugins: tuple[str, ...], start_timeout_s: float):
        self.progress = ctx.RawArray("q", 2)  # [index in chunk or -1, CLOCK_MONOTONIC ns it started]
        self.progress[0] = -1
        self.conn, child = ctx.Pipe()
        # Never written: the worker sees EOF on its end when this process dies, however it dies (SIGKILL).
        owner_alive, self._alive = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=worker_main, args=(child, self.progress, legacy, plugins, owner_alive), daemon=True
        )
        self.proc.start()
        child.close()
        owner_alive.close()
        self.ready = False
        self.start_deadline = time.monotonic() + start_timeout_s  # until it reports ready
        self.job: list[int] | None = None  # item indices of the chunk it holds

    def send(self, job: list[int], payload: list[tuple]) -> None:
        """Hands the worker one chunk: `job` (the items' indices in the score() call) and `payload` (their
        (dataset, response, ground_truth) tuples); its deadline clock starts now."""
        self.progress[0] = -1
        self.progress[1] = time.monotonic_ns()  # until the first item starts, the deadline runs from now
        self.job = job
        self.conn.send((0, payload))

    def current(self) -> tuple[int, int]:
        """(index in the chunk of the item being verified or -1, its start in ns)."""
        index = self.progress[0]  # read first: the start read next is at least this item's start
        return index, self.progress[1]

    def stop(self) -> None:
        """SIGKILLs the process and reaps it; the pipe and the progress array stay readable (frozen)."""
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL: the hang may be in C code that ignores everything else
        self.proc.join()

    def kill(self) -> None:
        """`stop`, then closes the pipe and the owner-alive pipe: the worker slot is done for good."""
        self.stop()
        self.conn.close()
        self._alive.close()


class Scorer:
    """A pool of `workers` processes (default `default_workers()`: one per CPU, at most DEFAULT_MAX_WORKERS)
    verifying responses with a hard deadline of
    `timeout_s` seconds per response; `if_semantics` ("head", "2024", "2024:f1,f2") picks the IF functions
    run with 2024 semantics. Use as a context manager or call `close()`. `plugins` are modules imported in
    this process and in every worker before any item: a test hook (tests/verifier_plugin.py adds
    verifiers that raise or kill their worker); production code passes none.

    Worker processes re-import the `__main__` module (forkserver/spawn), so a script that creates a
    Scorer must do so under `if __name__ == "__main__":`.

    Workers exit when the process that created the Scorer dies, even by SIGKILL (see worker.py), so a
    killed `verify`/`eval` leaves no verifier running.

    `stats[verifier][status]` counts the verdicts of all calls so far (status "ok", "timeout", "error").
    Raises ValueError for workers < 1, a timeout_s that is not a finite number > 0 or a bad if_semantics,
    RuntimeError when the workers do not start within `start_timeout_s` (default START_TIMEOUT_S) or
    one dies while starting; `score` raises RuntimeError when a replacement worker fails to start
    START_TRIES times in a row (each try dies or overruns `start_timeout_s`)."""

    def __init__(
        self,
        workers: int | None = None,
        timeout_s: float = 10.0,
        if_semantics: str = "head",
        plugins: Sequence[str] = (),
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        workers = default_workers() if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):  # inf would overflow the ns deadline
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.legacy = parse_legacy(if_semantics)
        self._plugins = tuple(plugins)
        for name in self._plugins:
            importlib.import_module(name)
        self.stats: dict[str, dict[str, int]] = {}
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._workers = [self._new_worker() for _ in range(workers)]
        self._start_failures = [0] * workers  # consecutive failed starts per slot
        self._closed = False
        deadline = time.monotonic() + self.start_timeout_s
        while not all(w.ready for w in self._workers):
            pending = [w for w in self._workers if not w.ready]
            left = deadline - time.monotonic()
            if left <= 0 or not wait([w.conn for w in pending], timeout=left):
                self.close()
                raise RuntimeError(f"{len(pending)} verifier workers did not start within {self.start_timeout_s:g} s")
            for w in pending:
                if w.conn.poll():
                    self._receive_ready(w)

    @property
    def pids(self) -> list[int]:
        """The process ids of the current workers (a killed worker's replacement has a new one)."""
        return [w.proc.pid for w in self._workers]

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers (asks, then kills those still running after 2 s). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(max(0.0, end - time.monotonic()))
            w.kill()

    def _receive_ready(self, w: _Worker) -> None:
        try:
            w.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"verifier worker {w.proc.pid} died while starting") from None
        w.ready = True

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self.legacy, self._plugins, self.start_timeout_s)

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = self._new_worker()

    def _start_failed(self, slot: int, cause: str) -> None:
        """Worker `slot` (not ready, holding no chunk) died or overran its start: starts another, or closes
        the Scorer and raises RuntimeError naming `cause` after START_TRIES failures in a row."""
        self._start_failures[slot] += 1
        if self._start_failures[slot] >= START_TRIES:
            self.close()  # the pool is short a worker for good
            raise RuntimeError(f"a verifier worker failed to start {START_TRIES} times in a row; last: {cause}")
        self._replace(slot)

    def score(self, items: Sequence[VerifyItem]) -> list[Verdict]:
        """The verdicts of `items`, in their order. Each item gets at most `timeout_s` seconds of its
        worker's time; a verifier's exception or a dead worker gives score 0 with status "error".
        Raises UnknownDataset (before verifying anything) for a dataset no verifier handles, TypeError
        for a response or ground truth that is not a string (None ground truths score 0)."""
        if self._closed:
            raise RuntimeError("Scorer is closed")
        payload = []
        for i, item in enumerate(items):
            if not isinstance(item.response, str) or not isinstance(item.ground_truth, (str, type(None))):
                raise TypeError(f"item {i}: response and ground_truth must be strings (ground_truth may be None)")
            payload.append((canonical_dataset(item.dataset), item.response, item.ground_truth))
        results: list[Verdict | None] = [None] * len(payload)
        size = max(1, min(MAX_CHUNK, math.ceil(len(payload) / (4 * len(self._workers)))))
        queue = deque(list(range(s, min(s + size, len(payload)))) for s in range(0, len(payload), size))
        try:
            while queue or any(w.job is not None for w in self._workers):
                for w in self._workers:
                    if w.ready and w.job is None and queue:
                        job = queue.popleft()
                        w.send(job, [payload[i] for i in job])
                self._wait(payload, results, queue)
        except BaseException:  # Ctrl-C: no stale chunk may reach the next call
            if not self._closed:  # (a worker that cannot start closed the Scorer)
                for slot, w in enumerate(self._workers):
                    if w.job is not None:
                        self._replace(slot)
            raise
        for v in results:
            counts = self.stats.setdefault(v.verifier, dict.fromkeys(STATUSES, 0))
            counts[v.status] += 1
        return results  # type: ignore[return-value]

    def _wait(self, payload, results, queue) -> None:
        """Waits for one event (results, a started or dead worker, or the nearest deadline) and handles it."""
        timeout_ns = int(self.timeout_s * 1e9)
        now = time.monotonic_ns()
        busy = [w for w in self._workers if w.job is not None]
        nearest = min((w.current()[1] + timeout_ns for w in busy), default=now + timeout_ns)
        starts = [int(w.start_deadline * 1e9) for w in self._workers if not w.ready]
        nearest = min([nearest, *starts])
        watched = [w.conn for w in self._workers if w.job is not None or not w.ready]
        watched += [w.proc.sentinel for w in self._workers]
        wait(watched, timeout=max(0.0, (nearest - now) / 1e9) + 0.001)
        for slot, w in enumerate(self._workers):
            if w.conn.poll():
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is not None and not w.ready:
                    w.ready = True
                    self._start_failures[slot] = 0
                    continue
                if msg is not None:
                    _record(w.job, msg, payload, results)
                    w.job = None
                    continue
            if not w.ready:  # it holds no chunk yet: a failed start costs no item
                if not w.proc.is_alive():
                    self._start_failed(slot, f"worker {w.proc.pid} died while starting (exit {w.proc.exitcode})")
                elif time.monotonic() > w.start_deadline:
                    self._start_failed(slot, f"worker {w.proc.pid} did not start within {self.start_timeout_s:g} s")
                continue
            if not w.proc.is_alive():
                self._lost(slot, payload, results, queue, "error", "verifier worker died")
                continue
            if w.job is not None:
                checked = w.current()
                if time.monotonic_ns() - checked[1] > timeout_ns and not w.conn.poll():
                    message = f"over the {self.timeout_s:g} s deadline"
                    self._lost(slot, payload, results, queue, "timeout", message, checked)

    def _lost(self, slot: int, payload, results, queue, status: str, message: str, checked=None) -> None:
        """Worker `slot` is dead or overran: its current item gets `status`, the rest of its chunk is queued
        again (the items it finished are lost with it), and a new worker takes the slot. For an overrun,
        `checked` is the (index, start) the deadline check saw: the worker may have moved on before the
        kill, and the item it moved on to is not the one that overran."""
        w = self._workers[slot]
        job = w.job
        w.stop()  # first: from here on its progress and its pipe cannot change
        if job is not None and w.conn.poll():  # the whole chunk's reply made it out before the kill
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):  # cut off mid-message
                msg = None
            if msg is not None:
                _record(job, msg, payload, results)
                self._replace(slot)
                return
        # A dead worker's frozen progress names its item. After an overrun, the frozen progress may have
        # moved past `checked` (the item finished between the check and the kill): the item checked still
        # overran, and the one after it is innocent, so `checked` is blamed and the rest is queued again.
        index, start = w.current() if checked is None else checked
        elapsed = (time.monotonic_ns() - start) / 1e9
        self._replace(slot)
        if job is None:
            return
        if index >= 0:
            culprit = job[index]
            results[culprit] = Verdict(0.0, payload[culprit][0], status, None, elapsed, message)
            rest = job[:index] + job[index + 1 :]
            if rest:
                queue.appendleft(rest)
        elif len(job) == 1:  # lost outside any item, alone: nothing left to narrow down
            results[job[0]] = Verdict(0.0, payload[job[0]][0], status, None, elapsed, message)
        else:  # lost between items: run them one by one to find the culprit
            queue.extendleft([i] for i in reversed(job))


def _record(job: list[int], msg: tuple, payload, results) -> None:
    """Stores a worker's reply `msg` (chunk_id, [(score, status, details, elapsed_s, message)]) for `job`."""
    for i, (score, status, details, elapsed, message) in zip(job, msg[1], strict=True):
        results[i] = Verdict(score, payload[i][0], status, details, elapsed, message)
