"""Flags the model-calling data commands share (`personas`, `preferences`), with one spelling, default and
check each, and the helpers behind them."""

from __future__ import annotations

import argparse
import hashlib

from tulu_jax.inputs import InputError


def add_on_bad_row_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--on-bad-row error|skip; `what` says which rows it concerns and what makes one bad."""
    p.add_argument(
        "--on-bad-row",
        choices=("error", "skip"),
        default="error",
        help=f"{what}: stop with a one-line error naming file, line and field (error, the default), or count it "
        "in the summary and go on (skip)",
    )


def add_request_args(p: argparse.ArgumentParser, *, retries_help: str) -> None:
    """--concurrency, --retries, --request-timeout, --retry-deadline, --seed, --overwrite, --quiet."""
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    p.add_argument("--retries", type=int, default=2, help=f"{retries_help} (default 2)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per HTTP request (default 600)")
    p.add_argument(
        "--retry-deadline",
        type=float,
        default=300.0,
        help="seconds a request keeps being retried while its servers are down or answer 5xx/429; then its row "
        "is left undone, no new rows are started, and the command exits 1 (rerun to finish) (default 300)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice and request seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="start --out and its side files afresh")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_request_args(args: argparse.Namespace) -> None:
    """InputError naming the flag for a value out of range."""
    if args.concurrency < 1:
        raise InputError(f"--concurrency {args.concurrency}: must be >= 1")
    if args.retries < 0:
        raise InputError(f"--retries {args.retries}: must be >= 0")
    if not args.request_timeout > 0:
        raise InputError(f"--request-timeout {args.request_timeout}: must be > 0 seconds")
    if not args.retry_deadline > 0:
        raise InputError(f"--retry-deadline {args.retry_deadline}: must be > 0 seconds")
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: must be >= 0")


def parse_urls(text: str, flag: str) -> list[str]:
    """Comma-separated server URLs -> the list; InputError naming `flag` when one is not http(s)://..."""
    urls = [u.strip() for u in (text or "").split(",") if u.strip()]
    if not urls:
        raise InputError(f"{flag} {text!r}: give at least one server URL (http://host:port)")
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise InputError(f"{flag} {u}: not an http(s):// URL")
    return urls


def request_seed(seed: int, *parts: object) -> int:
    """A 31-bit sampling seed for one request, fixed by `seed` and `parts` (a row key, a model, an attempt),
    so a resumed run asks exactly what the first run would have."""
    digest = hashlib.sha256("\0".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
