"""Many model calls in flight at once, for the data commands: a bounded pool of daemon threads that hands
back each result as it finishes, with a progress bar showing requests/s."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def run_requests(
    items: Iterable[T],
    call: Callable[[T], Any],
    *,
    max_in_flight: int = 32,
    desc: str = "requests",
    total: int | None = None,
    stats: dict[str, float] | None = None,
    stop_when: Callable[[BaseException], bool] | None = None,
    progress: bool = True,
) -> Iterator[tuple[T, Any, BaseException | None]]:
    """Runs `call(item)` for every item on up to `max_in_flight` threads and yields (item, result, None), or
    (item, None, exception) when the call raised, in completion order. Items are drawn lazily, so a long
    input is never held whole. Once an exception satisfies `stop_when` (say, a server that stayed down past
    its retry deadline), no new item is started: the calls in flight finish and are yielded, the rest are
    never drawn (`stats["stopped"]` is then True), so a dead server costs one deadline, not one per item.
    A tqdm bar on stderr (`desc`, `total`; off with `progress=False` or when stderr is not a terminal) shows
    progress and the rate; `stats`, when given, receives
    `requests`, `failed`, `seconds`, `requests_per_s` and `stopped` at the end. The threads are daemons:
    stopping the iteration early (an exception in the caller, Ctrl-C) leaves calls in flight behind
    without waiting for them, and the process can exit at once."""
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    it = iter(items)
    start, done, failed, stopped, running = time.perf_counter(), 0, 0, False, 0
    todo: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def work():
        while True:
            item = todo.get()
            if item is _STOP:
                return
            try:
                results.put((item, call(item), None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller with its item
                results.put((item, None, e))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max_in_flight)]
    for t in threads:
        t.start()
    bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, disable=None if progress else True)
    try:
        exhausted = False
        while True:
            while not exhausted and not stopped and running < max_in_flight:
                try:
                    todo.put(next(it))
                    running += 1
                except StopIteration:
                    exhausted = True
            if running == 0:
                break
            item, result, error = results.get()
            running -= 1
            done += 1
            failed += error is not None
            if error is not None and stop_when is not None and stop_when(error):
                stopped = True
            bar.update(1)
            yield item, result, error
    finally:
        bar.close()
        for _ in threads:
            todo.put(_STOP)
        seconds = time.perf_counter() - start
        if stats is not None:
            stats.update(
                requests=done, failed=failed, seconds=seconds, requests_per_s=done / max(seconds, 1e-9), stopped=stopped
            )


_STOP = object()
