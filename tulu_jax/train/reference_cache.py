"""Reference-model log-probs computed once and kept on disk, keyed by example id (as open-instruct's
`dpo_tune_cache.py` does before training: the policy at step 0 is the reference).

The cache holds, for every pair of a data set, the reference's *summed* log-probs of chosen and
rejected plus their labelled-token counts; each loss averages from those itself, so one cache serves
every loss type. The file name is a hash of the encoded data (pipeline fingerprint) and of the
reference model (its files, or preset and seed) and compute dtype, so a resumed run finds it and a
changed model or data set never reuses stale numbers. Writes are atomic (temp file + rename): a run
killed while writing leaves no half file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from tulu_jax.models.config import DecoderConfig
from tulu_jax.multihost import process_zero_decides

CACHE_VERSION = 1


def reference_model_id(path: str | None, dcfg: DecoderConfig, dtype: str, seed: int) -> dict:
    """What identifies the reference's numbers: its files (name, size, mtime) or preset + seed, and dtype."""
    ident: dict = {"config": repr(dcfg), "dtype": dtype}
    if path:
        root = Path(path)
        files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
        ident["path"] = str(root.resolve())
        ident["files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    else:
        ident["init_seed"] = seed
    return ident


def cache_key(data_fingerprint: str, model_id: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "data": data_fingerprint, "model": model_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def compute_pair_logps(
    logps_fn: Callable, params, pipeline, *, global_batch: int, to_device: Callable, desc: str
) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass over every pair in index order: (summed log-probs [N, 2], counts [N, 2]) float32."""
    n = len(pipeline)
    logps, counts = np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
    bar = tqdm(total=n, desc=desc, unit="pair", disable=jax.process_index() != 0, dynamic_ncols=True)
    pending = None

    def collect(pending):
        batch, out = pending
        lp, ct = jax.device_get(out)
        real = batch["valid"].astype(bool)
        idx = batch["index"][real]
        logps[idx], counts[idx] = lp[real], ct[real]
        bar.update(int(real.sum()))

    for batch in pipeline.ordered_batches(global_batch):
        out = logps_fn(params, to_device(batch))
        if pending is not None:  # read batch i-1 while batch i runs
            collect(pending)
        pending = (batch, out)
    if pending is not None:
        collect(pending)
    bar.close()
    return logps, counts


def load_or_compute(cache_dir: str, key: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]], log=print):
    """The cached (logps, counts) for `key`, computing and storing them first when absent.

    Process 0 decides whether the cache exists and every process follows (computing runs collectives, so
    hosts must never split between reading and computing)."""
    path = os.path.join(cache_dir, f"{key}.npz")
    if process_zero_decides(os.path.exists(path)):
        with np.load(path) as f:
            log(f"reference log-probs: reusing {path}")
            return f["logps"], f["counts"]
    logps, counts = compute()
    if jax.process_index() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, logps=logps, counts=counts)
        os.replace(tmp, path)
        log(f"reference log-probs: wrote {path}")
    return logps, counts
