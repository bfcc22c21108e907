#!/usr/bin/env python
"""Verifier throughput: verifications per second of the Scorer pool, per verifier, on this machine.

    python scripts/bench_verify.py [--workers N] [--gsm8k 20000] [--math 2000] [--ifeval 20000] [--reps 3]
                                   [--timeout-s 10] [--json OUT]

Items are real-looking responses (GSM8K chains of thought ending in `#### n` or "The answer is n"; MATH
solutions with a boxed answer, half of them passing by string normalisation and half needing math-verify's
symbolic comparison; IF responses checked by two argument-free IF functions when
`tulu_jax.rewards.ifeval` exists), each with a random number so no cache answers them. The figure is
items / wall seconds of one `Scorer.score` call on all items of a verifier, best of --reps calls, after
the pool has started (start-up is reported apart).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time

from machine import cpu_model  # scripts/machine.py, next to this script (sys.path[0])


def parse_args(argv=None):
    """The command line above -> argparse.Namespace."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per CPU, at most 8)")
    p.add_argument("--gsm8k", type=int, default=20000, help="GSM8K items per call")
    p.add_argument("--math", type=int, default=2000, help="MATH items per call")
    p.add_argument("--ifeval", type=int, default=20000, help="IF items per call (if the IF verifier exists)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=10.0)
    p.add_argument("--json", dest="out", help="also write the rows here")
    return p.parse_args(argv)


def make_items(verifier: str, n: int, rng: random.Random):
    """`n` VerifyItems for `verifier`, about half of which pass."""
    from tulu_jax.rewards import VerifyItem

    prompt = "<|user|>\nA word problem.\n<|assistant|>\n"
    items = []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        truth = a * b if i % 2 else a * b + 1
        if verifier == "gsm8k":
            body = f"Each box holds {a} pens and there are {b} boxes, so {a} * {b} = <<{a}*{b}={a * b}>>{a * b}.\n"
            body += f"#### {a * b:,}" if i % 4 < 2 else f"The answer is {a * b}."
            items.append(VerifyItem("gsm8k", prompt + body, str(truth)))
        elif verifier == "math":
            # odd i: the answer is a fraction written differently from the ground truth (symbolic path)
            answer = f"\\frac{{{2 * a}}}{{{2 * b}}}" if i % 2 else f"{a}"
            truth_tex = f"\\frac{{{a}}}{{{b}}}" if i % 2 else f"{a + (i % 4 == 2)}"
            body = f"Simplifying step by step, we get $x = \\boxed{{{answer}}}$."
            items.append(VerifyItem("math", prompt + body, truth_tex))
        else:
            text = "all lower case words here" if i % 2 else "Some Words Here"
            func = "validate_lowercase" if i % 4 < 2 else "validate_uppercase"
            items.append(VerifyItem("ifeval", prompt + f"{text} {a}", json.dumps({"func_name": func})))
    return items


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from tulu_jax.rewards import Scorer

    counts = {"gsm8k": args.gsm8k, "math": args.math}
    if importlib.util.find_spec("tulu_jax.rewards.ifeval") is not None:
        counts["ifeval"] = args.ifeval
    rng = random.Random(0)
    workloads = {name: make_items(name, n, rng) for name, n in counts.items() if n > 0}
    start = time.perf_counter()
    rows = []
    with Scorer(workers=args.workers, timeout_s=args.timeout_s) as scorer:
        startup = time.perf_counter() - start
        workers = len(scorer.pids)
        for name, items in workloads.items():
            best = float("inf")
            for _ in range(args.reps):
                t = time.perf_counter()
                verdicts = scorer.score(items)
                best = min(best, time.perf_counter() - t)
            rows.append(
                {
                    "verifier": name,
                    "items": len(items),
                    "seconds": round(best, 3),
                    "per_s": round(len(items) / best, 1),
                    "per_s_per_worker": round(len(items) / best / workers, 1),
                    "passed": int(sum(v.score for v in verdicts)),
                    "not_ok": sum(v.status != "ok" for v in verdicts),
                }
            )
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); workers: {workers}; pool start-up {startup:.1f} s")
    print(
        f"{'verifier':<10} {'items':>7} {'seconds':>8} {'verif/s':>10} {'per worker':>11} {'passed':>7} {'not ok':>7}"
    )
    for r in rows:
        print(
            f"{r['verifier']:<10} {r['items']:>7} {r['seconds']:>8.3f} {r['per_s']:>10.1f} "
            f"{r['per_s_per_worker']:>11.1f} {r['passed']:>7} {r['not_ok']:>7}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu_model(), "workers": workers, "startup_s": startup, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":  # the Scorer's workers re-import __main__: nothing may run on import
    main()
