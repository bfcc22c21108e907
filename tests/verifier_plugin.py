"""Test-only verifiers for the Scorer's `plugins` hook: one raises, one kills its own worker process, one sleeps.
(A verifier that really hangs needs no plugin: sympy expanding `(x+y+z)^{999}` does.)"""

import os

from tulu_jax.rewards.registry import VERIFIERS


def _raise(answer: str, ground_truth: str, legacy: frozenset[str]) -> bool:
    raise RuntimeError(f"test verifier raised on {answer!r}")


def _crash(answer: str, ground_truth: str, legacy: frozenset[str]) -> bool:
    os._exit(3)  # as a segfault or the OOM killer would: no exception, no reply


VERIFIERS.setdefault("test_raise", _raise)
VERIFIERS.setdefault("test_crash", _crash)


def _modules(answer: str, ground_truth: str, legacy: frozenset[str]) -> tuple[bool, ...]:
    import sys

    return tuple(name in sys.modules for name in answer.split(","))  # which of these modules are loaded


VERIFIERS.setdefault("test_modules", _modules)


def _sleep(answer: str, ground_truth: str, legacy: frozenset[str]) -> bool:
    import time

    time.sleep(float(answer))  # a slow verifier that finishes: seconds given as the response
    return True


VERIFIERS.setdefault("test_sleep", _sleep)
