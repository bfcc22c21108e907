"""Many model calls in flight at once, for the data commands: a bounded thread pool that hands back each
result as it finishes, with a progress bar showing requests/s."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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
) -> Iterator[tuple[T, Any, BaseException | None]]:
    """Runs `call(item)` for every item on up to `max_in_flight` threads and yields (item, result, None), or
    (item, None, exception) when the call raised, in completion order. Items are drawn lazily, so a long
    input is never held whole. A tqdm bar on stderr (`desc`, `total`) shows progress and the rate; `stats`,
    when given, receives `requests`, `failed`, `seconds` and `requests_per_s` at the end. Stopping the
    iteration early (an exception in the caller, Ctrl-C) cancels the calls not yet started."""
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    it = iter(items)
    start, done, failed = time.perf_counter(), 0, 0
    pool = ThreadPoolExecutor(max_in_flight)
    running: dict[Future, T] = {}
    bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, disable=None)
    try:
        exhausted = False
        while True:
            while not exhausted and len(running) < max_in_flight:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                running[pool.submit(call, item)] = item
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                item = running.pop(f)
                error = f.exception()
                done += 1
                failed += error is not None
                bar.update(1)
                yield item, (None if error is not None else f.result()), error
    finally:
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
        seconds = time.perf_counter() - start
        if stats is not None:
            stats.update(requests=done, failed=failed, seconds=seconds, requests_per_s=done / max(seconds, 1e-9))
