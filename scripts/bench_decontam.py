#!/usr/bin/env python
"""Decontamination throughput and recall: `tulu-jax data decontaminate` on synthetic data, this machine.

    python scripts/bench_decontam.py [--rows 1000000] [--eval-instances 50000] [--eval-sets 12]
                                     [--planted 300] [--workers K] [--ngram 8] [--threshold 0.5]
                                     [--quick] [--keep DIR] [--seed 0] [--json OUT]

Synthesises a training JSONL of --rows chat rows (user prompts of 50-150 words drawn with Zipf frequencies
from a 50,000-word vocabulary with some accented words and punctuation, 4 `source`s) and --eval-sets
evaluation files with --eval-instances instances in all (15-120 words; the text under `question`,
`problem`, `prompt` or `messages` by set), and plants --planted contaminated training rows, each a random
instance's tokens inside a longer prompt, in equal numbers of four kinds (with k the copied tokens of an
instance of L tokens):
  full    the whole instance, half of them upper-cased          score 1.0        must be removed
  above   one run of k = floor(threshold * L) + 1 tokens         k / L > thr      must be removed
  split   two runs of >= n tokens each, k / L > thr in all       union coverage   must be removed
  below   one run of k = ceil(threshold * L) - 1 tokens, or      k / L <= thr     must be kept
          exactly threshold * L when that is whole (the strict ">")
The tokens next to each copied run differ from the instance's neighbours there, so the coverage is k / L.
Then runs `load_eval_sets` and `decontaminate` with a report (what the command runs, reading and writing
files) and checks the removed rows: found (kinds full/above/split removed, best match the planted
instance), `below removed` and `false hits` (removed rows that were not planted) must be 0.

Columns: rows, eval instances, workers, seconds (whole command: eval loading and index included), index s,
scan s (reading, scanning and writing the training rows), prompts/s (rows / scan s), found/planted
(kinds that must be removed), below removed, false hits, and the CPU seconds of this process (reading
JSON, writing rows, the index) and of the scan workers (tokenizing, matching). --quick: 20,000 rows,
2,000 instances, 40 planted. The figure depends on the load of the machine: the 1-minute load average is
printed with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from machine import cpu_model  # scripts/machine.py, next to this script (sys.path[0])

VOCAB = 50_000
ACCENTED = 300  # rare words (Zipf ranks past 10,000) that carry non-ASCII letters
SOURCES = ("web", "math", "code", "chat")
FIELDS = ("question", "problem", "prompt", "messages")
KINDS = ("full", "above", "split", "below")
PUNCT = (",", ".", "?", ";")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="training rows (default 1,000,000)")
    ap.add_argument("--eval-instances", type=int, default=50_000, help="evaluation instances in all (default 50,000)")
    ap.add_argument("--eval-sets", type=int, default=12, help="evaluation files (default 12)")
    ap.add_argument("--planted", type=int, default=300, help="contaminated training rows (default 300)")
    ap.add_argument("--workers", type=int, default=None, help="scanning processes (default: os.cpu_count())")
    ap.add_argument("--ngram", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="20,000 rows, 2,000 instances, 40 planted")
    ap.add_argument("--keep", metavar="DIR", default=None, help="write the data and outputs here and keep them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the row here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.eval_instances, args.planted = 20_000, 2_000, 40
    if args.rows < args.planted or args.eval_instances < args.eval_sets or min(args.planted, args.eval_sets) < 1:
        ap.error("need --rows >= --planted >= 1 and --eval-instances >= --eval-sets >= 1")
    return args


class Words:
    """The vocabulary: distinct lower-case words, Zipf(1) frequencies by rank, some rare ones accented."""

    def __init__(self, rng: np.random.Generator):
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words: set[str] = set()
        while len(words) < VOCAB:
            words.add("".join(rng.choice(letters, size=int(rng.integers(2, 11)))))
        self.words = sorted(words, key=lambda w: (len(w), w))  # short words common, as in text
        for r in rng.choice(np.arange(10_000, VOCAB), size=ACCENTED, replace=False):
            w = self.words[r]
            self.words[r] = w[:1] + "éüñçøå"[r % 6] + w[1:]
        p = 1.0 / np.arange(1, VOCAB + 1)
        self.cdf = np.cumsum(p / p.sum())

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """int64 [size] word ranks."""
        return np.minimum(np.searchsorted(self.cdf, rng.random(size)), VOCAB - 1)

    def tokens(self, rng: np.random.Generator, size: int) -> list[str]:
        """`size` tokens of text: words, about one in eight followed by a punctuation token."""
        out = []
        for r, p in zip(self.sample(rng, size).tolist(), rng.integers(0, 8 * len(PUNCT), size).tolist()):
            out.append(self.words[r])
            if p < len(PUNCT):
                out.append(PUNCT[p])
        return out[:size]


def render(tokens: list[str]) -> str:
    """Text whose tokens (words split from their punctuation) are exactly `tokens`."""
    parts = []
    for t in tokens:
        if t in PUNCT and parts:
            parts[-1] += t
        else:
            parts.append(t)
    return " ".join(parts)


def filler(words: Words, rng, size: int, first_not: str | None, last_not: str | None) -> list[str]:
    """`size` random tokens whose first is not `first_not` and last is not `last_not` (the instance's tokens
    next to a copied run), so that the run cannot extend into them."""
    while True:
        toks = words.tokens(rng, size)
        if toks[0] != first_not and toks[-1] != last_not:
            return toks


def plant(kind: str, inst: list[str], n: int, thr: float, words: Words, rng) -> tuple[list[str], float]:
    """A training prompt's tokens holding part of `inst` as `kind` says -> (tokens, the instance's score)."""
    size = len(inst)
    if kind == "full":
        runs = [(0, size)]
    elif kind in ("above", "below"):
        k = math.floor(thr * size) + 1 if kind == "above" else math.ceil(thr * size) - 1
        if kind == "below" and float(thr * size).is_integer():
            k = int(thr * size)  # exactly at the threshold: kept, the comparison is strict
        start = int(rng.integers(0, size - k + 1))
        runs = [(start, start + k)]
    else:  # split: two runs, each >= n tokens, a gap of >= 1 token, covering > thr of the instance
        k = math.floor(thr * size) + 1
        first = int(rng.integers(n, k - n + 1))
        gap = int(rng.integers(1, size - k + 1))
        runs = [(0, first), (first + gap, k + gap)]
    out: list[str] = []
    before = None  # the instance token that the filler after the previous run must not start with
    for lo, hi in runs:
        out += filler(words, rng, int(rng.integers(2, 30)), before, inst[lo - 1] if lo > 0 else None)
        out += inst[lo:hi]
        before = inst[hi] if hi < size else None
    out += filler(words, rng, int(rng.integers(2, 30)), before, None)
    return out, sum(hi - lo for lo, hi in runs) / size


def make_data(args, folder: str) -> tuple[list[str], str, dict[int, tuple[str, int, float]]]:
    """Writes the evaluation files and the training file into `folder` -> (eval paths, training path,
    planted row index -> (kind, global instance index, expected score))."""
    rng = np.random.default_rng(args.seed)
    words = Words(rng)
    eval_paths, instances = [], []
    per_set = np.full(args.eval_sets, args.eval_instances // args.eval_sets)
    per_set[: args.eval_instances % args.eval_sets] += 1
    for s, count in enumerate(per_set.tolist()):
        path = os.path.join(folder, f"eval_{s:02d}.jsonl")
        field = FIELDS[s % len(FIELDS)]
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(count):
                toks = words.tokens(rng, int(rng.integers(15, 121)))
                instances.append(toks)
                text = render(toks)
                value = [{"role": "user", "content": text}] if field == "messages" else text
                f.write(json.dumps({field: value}, ensure_ascii=False) + "\n")
        eval_paths.append(path)
    # plants need an instance long enough for a "split" (two runs of n and a gap)
    usable = [i for i, t in enumerate(instances) if len(t) * args.threshold >= 2 * args.ngram + 1]
    planted_rows = rng.choice(args.rows, size=args.planted, replace=False)
    planted = {}
    for j, r in enumerate(sorted(planted_rows.tolist())):
        kind = KINDS[j % len(KINDS)]
        planted[r] = (kind, int(rng.choice(usable)))
    train = os.path.join(folder, "train.jsonl")
    with open(train, "w", encoding="utf-8") as f:
        for i in range(args.rows):
            if i in planted:
                kind, inst = planted[i]
                toks, score = plant(kind, instances[inst], args.ngram, args.threshold, words, rng)
                planted[i] = (kind, inst, score)
                text = render(toks)
                if kind == "full" and i % 2:
                    text = text.upper()
            else:
                text = render(words.tokens(rng, int(rng.integers(50, 151))))
            row = {"id": i, "source": SOURCES[i % len(SOURCES)]}
            row["messages"] = [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return eval_paths, train, planted


def check(removed_path: str, planted: dict, threshold: float, offsets: list[int]) -> dict:
    """Counts of found / missed / wrongly removed rows from the removed file."""
    removed = {}
    with open(removed_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            set_index = int(os.path.basename(rec["eval_file"])[5:7])
            removed[rec["row"]["id"]] = offsets[set_index] + rec["eval_index"]
    must = {i: p for i, p in planted.items() if p[2] > threshold}
    found = sum(1 for i, p in must.items() if removed.get(i) == p[1])
    return {
        "found": found,
        "must_remove": len(must),
        "wrong_instance": sum(1 for i, p in must.items() if i in removed and removed[i] != p[1]),
        "below_removed": sum(1 for i, p in planted.items() if p[2] <= threshold and i in removed),
        "false_hits": sum(1 for i in removed if i not in planted),
    }


def _cpu_seconds() -> tuple[float, float]:
    """(user + system CPU seconds of this process, of its finished children: the scan workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tulu_jax.curation.decontaminate import decontaminate, load_eval_sets

    folder = args.keep or tempfile.mkdtemp(prefix="bench_decontam_")
    os.makedirs(folder, exist_ok=True)
    try:
        t = time.perf_counter()
        eval_paths, train, planted = make_data(args, folder)
        print(f"synthesised {args.rows} rows, {args.eval_instances} instances in {time.perf_counter() - t:.1f} s")
        load = os.getloadavg()[0]
        start, cpu = time.perf_counter(), _cpu_seconds()
        sets = load_eval_sets(eval_paths)
        summary = decontaminate(
            [train],
            sets,
            os.path.join(folder, "clean.jsonl"),
            n=args.ngram,
            threshold=args.threshold,
            workers=args.workers,
            report_path=os.path.join(folder, "clean.report.md"),
        )
        seconds = time.perf_counter() - start
        cpu_main, cpu_workers = (after - before for after, before in zip(_cpu_seconds(), cpu))
        offsets = np.concatenate(([0], np.cumsum([len(s.texts) for s in sets]))).tolist()
        counts = check(summary.removed_path, planted, args.threshold, offsets)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    row = {
        "case": f"{args.rows} rows x {args.eval_instances} instances",
        "rows": args.rows,
        "eval_instances": args.eval_instances,
        "workers": summary.workers,
        "seconds": round(seconds, 2),
        "index_s": round(seconds - summary.seconds, 2),
        "scan_s": round(summary.seconds, 2),
        "prompts_per_s": round(args.rows / summary.seconds, 1),
        **counts,
        "cpu_main_s": round(cpu_main, 1),
        "cpu_workers_s": round(cpu_workers, 1),
        "load_1min": round(max(load, os.getloadavg()[0]), 2),
    }
    units = {"seconds": "s", "prompts_per_s": "prompts/s", "load_1min": "", "cpu_main_s": "CPU s"}
    units["cpu_workers_s"] = "CPU s"
    units |= {k: "rows" for k in ("found", "must_remove", "wrong_instance", "below_removed", "false_hits")}
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); 1-minute load average up to {row['load_1min']}")
    head = ("rows", "eval inst", "workers", "seconds", "index s", "scan s", "prompts/s", "found/planted")
    head += ("wrong inst", "below removed", "false hits", "CPU s main", "CPU s workers")
    cells = (row["rows"], row["eval_instances"], row["workers"], f"{row['seconds']:.1f}", f"{row['index_s']:.1f}")
    cells += (f"{row['scan_s']:.1f}", f"{row['prompts_per_s']:.0f}", f"{row['found']}/{row['must_remove']}")
    cells += (row["wrong_instance"], row["below_removed"], row["false_hits"], row["cpu_main_s"], row["cpu_workers_s"])
    print("  ".join(f"{h:>{max(len(h), 9)}}" for h in head))
    print("  ".join(f"{str(c):>{max(len(h), 9)}}" for c, h in zip(cells, head)))
    if args.json:
        with open(args.json, "w") as f:
            doc = {"argv": sys.argv, "cpu": cpu_model(), "cores": os.cpu_count(), "rows": [{**row, "units": units}]}
            json.dump(doc, f, indent=1)
    failed = row["found"] != row["must_remove"] or row["below_removed"] or row["false_hits"]
    if failed:
        print("FAILED: a planted row was missed, or a row at or below the threshold was removed", file=sys.stderr)
        sys.exit(1)
    return row


if __name__ == "__main__":  # decontaminate's workers fork this process: nothing may run on import
    main()
