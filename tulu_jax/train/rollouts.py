"""Where an RLVR learner gets its episodes: prompt batches drawn from the prompt pipeline, sampled by a rollout
backend (the local JAX sampler or vLLM servers), scored by the verifiers, with weight pushes from the learner.

`RolloutSource(async_steps=0)` does everything in the learner's thread, in order: push, then generate the
next batch with the newest weights. With `async_steps=k >= 1` one background thread runs the backend, and
batch t+k is generated while the learner trains on batch t (the overlap of Tülu 3's asynchronous RLVR,
open-instruct `ppo_vllm_thread_ray_gtrl.py`, there with k = 1). Pushes and generations go through that one
thread in submission order, so a push never lands in the middle of a generation and no sample is staler
than k weight versions. Scoring runs in a second thread (the verifiers' process pool), so it overlaps the
learner's forward passes in both modes.

Weights cross threads as snapshots taken in the learner's thread before its next (donating) step: on-device
copies in the compute dtype for the local sampler, host arrays for vLLM.

In a multi-process job every process draws the same prompt batches, but rollouts are made where the backend
is: by every process together for the local sampler (an SPMD program over the global mesh; then nothing may
run in a background thread, so `async_steps` must be 0), by process 0 alone for vLLM servers. Process 0 scores
them, and its Rollout (samples and verdicts) is broadcast, so every process trains on the same episodes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from tulu_jax.data.prompts import Prompt, PromptPipeline
from tulu_jax.multihost import process_zero_result
from tulu_jax.rewards.scorer import Scorer, VerifyItem
from tulu_jax.rewards.verdict import Verdict
from tulu_jax.rollout.types import RolloutBatch, SamplingParams


def batch_seed(base: int, index: int) -> int:
    """The sampling seed of prompt batch `index` (1-based draw number) of a run seeded `base`: a hash, in
    [0, 2**31), so a resumed run samples batch i exactly as an uninterrupted one did."""
    digest = hashlib.sha256(f"rollout\0{base}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class Rollout:
    """One sampled prompt batch. `index`: its draw number (1-based); `prompts`: the batch's prompts (each
    sampled n times, prompt-major rows); `batch`: the samples; `texts`: each response decoded (special tokens
    skipped); `data_state`: the prompt iterator's state right after this batch was drawn (what a checkpoint
    taken after training on it must hold); `timings`: seconds (generate_s, push_s of pushes queued just
    before it) and `new_tokens`; `verdicts`: a Future of (one Verdict per row, seconds the scoring took)."""

    index: int
    prompts: list[Prompt]
    batch: RolloutBatch
    texts: list[str]
    data_state: dict[str, Any]
    timings: dict[str, float]
    verdicts: Future


class RolloutSource:
    """Draws prompt batches from `data_iter` (a `PromptPipeline` iterator, already rewound on resume), samples
    `sampling.n` responses per prompt with `backend`, and scores them with `scorer` (verify_reward per
    verified response; None on the processes other than 0, which never score). `snapshot(params)` makes the
    copy a push hands to the backend. Close it when done.

    Guarantees (local sampler or vLLM): with `async_steps` k and `rollout.push_every` 1, every batch was sampled
    from weights at most k versions older than the learner's; with push_every p > 1, at most k + p - 1."""

    def __init__(
        self,
        *,
        backend,
        pipeline: PromptPipeline,
        data_iter,
        tokenizer,
        scorer: Scorer | None,
        sampling: SamplingParams,
        seed: int,
        async_steps: int,
        snapshot: Callable[[Any], Any],
        start_draws: int = 0,
    ):
        self.backend, self.pipeline, self.data_iter, self.tokenizer = backend, pipeline, data_iter, tokenizer
        self.scorer, self.sampling, self.seed, self.async_steps = scorer, sampling, seed, async_steps
        self._snapshot = snapshot
        self.owns_snapshots = hasattr(backend, "snapshot")  # LocalSampler.push_weights(copy=False) takes them as is
        self._draws = start_draws  # prompt batches drawn so far (checkpointed as the iterator's state)
        self._pending: collections.deque[Future] = collections.deque()  # requested batches, oldest first
        self._pushes: list[Future] = []  # queued pushes, checked for errors before each batch is handed out
        self._push_s = 0.0
        self._score_lock = threading.Lock()  # the Scorer's pool is used by one thread at a time
        # Multi-process: which processes run the backend (all for an SPMD sampler, else process 0) and score.
        self._shared = jax.process_count() > 1
        self._leader = jax.process_index() == 0
        self._samples = self._leader or self.owns_snapshots
        if self._shared and self.owns_snapshots and async_steps > 0:
            raise ValueError(
                "rollout.async_steps must be 0 for the local backend in a multi-process job (its sampler is one "
                "program over every process's devices and cannot run beside the learner); use vLLM servers"
            )
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="rollout") if async_steps > 0 else None
        self._scoring = ThreadPoolExecutor(1, thread_name_prefix="scoring")

    # --- the backend thread -------------------------------------------------------------------------------

    def _run(self, fn: Callable[[], Any]) -> Any:
        """`fn()` in the backend's thread, after everything queued before it; waits for its result."""
        return fn() if self._worker is None else self._worker.submit(fn).result()

    def _submit(self, fn: Callable[[], Any]) -> Future:
        if self._worker is not None:
            return self._worker.submit(fn)
        f: Future = Future()
        try:
            f.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised by result(), in the learner's thread
            f.set_exception(e)
        return f

    def publish(self, params, version: int) -> None:
        """Makes batches requested from now on use `params`, tagged `version` (the learner's step count).
        Snapshots now; the push itself runs in order with the generations."""
        start = time.perf_counter()
        if self._shared and not self.owns_snapshots:
            # vLLM from several processes: writing the folder gathers every process's shards (a collective, so
            # here in the learner's thread on every process); process 0 alone then has the servers load it.
            folder = self.backend.write_push_folder(params, str(version))
            self._push_s += time.perf_counter() - start

            def push():
                begin = time.perf_counter()
                self.backend.load_folder(folder, str(version))
                self._push_s += time.perf_counter() - begin
        else:
            snap = self._snapshot(params)

            def push():
                begin = time.perf_counter()
                if self.owns_snapshots:  # the local sampler: the snapshot is already its own copy
                    self.backend.push_weights(snap, str(version), copy=False)
                else:
                    self.backend.push_weights(snap, str(version))
                self._push_s += time.perf_counter() - begin

        if self._worker is None:
            process_zero_result(push)  # a failed load on process 0 stops every process, not just that one
        else:
            self._pushes.append(self._worker.submit(push))

    # --- drawing and sampling ----------------------------------------------------------------------------

    def _draw(self) -> tuple[int, list[Prompt], dict]:
        indices = next(self.data_iter)  # StopIteration at the end of the prompts
        self._draws += 1
        return self._draws, self.pipeline.take(indices), self.data_iter.get_state()

    def _generate(self, index: int, prompts: list[Prompt], data_state: dict) -> Rollout | None:
        if not self._samples:
            return None  # process 0 samples; `_share` hands its Rollout to this process
        sp = dataclasses.replace(self.sampling, seed=batch_seed(self.seed, index))
        start = time.perf_counter()
        batch = self.backend.generate_batch([p.token_ids for p in prompts], sp)
        generate_s = time.perf_counter() - start
        push_s, self._push_s = self._push_s, 0.0
        texts = [
            self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            for row, n in zip(batch.token_ids, batch.lengths)
        ]
        items = [
            VerifyItem(dataset=prompts[int(i)].dataset, response=text, ground_truth=prompts[int(i)].ground_truth)
            for i, text in zip(batch.prompt_index, texts)
        ]
        verdicts = self._scoring.submit(self._score, items) if self._leader else None
        timings = {"generate_s": generate_s, "push_s": push_s, "new_tokens": float(batch.lengths.sum())}
        return Rollout(index, prompts, batch, texts, data_state, timings, verdicts)

    def _score(self, items: list[VerifyItem]) -> tuple[list[Verdict], float]:
        with self._score_lock:
            start = time.perf_counter()
            verdicts = self.scorer.score(items)
            return verdicts, time.perf_counter() - start

    def _request(self) -> Future | None:
        try:
            drawn = self._draw()
        except StopIteration:
            return None
        return self._submit(lambda: self._generate(*drawn))

    def get(self) -> tuple[Rollout | None, float]:
        """(the next batch's Rollout, seconds the learner waited for it); (None, 0) when the prompts are used up.
        Keeps `async_steps` later batches in flight."""
        if not self._shared:
            self._check_pushes()
        while len(self._pending) <= self.async_steps:
            future = self._request()
            if future is None:
                break
            self._pending.append(future)
        if not self._pending:
            return None, 0.0
        start = time.perf_counter()
        future = self._pending.popleft()
        if not self._shared:
            return future.result(), time.perf_counter() - start

        def finish():
            self._check_pushes()  # process 0's background loads: their failure stops every process
            return self._settled(future.result())

        return self._share(process_zero_result(finish)), time.perf_counter() - start

    def _settled(self, rollout: Rollout | None):
        """Process 0: (the rollout without its Future, its verdicts), once scored; elsewhere None."""
        if not self._leader or rollout is None:
            return None
        return dataclasses.replace(rollout, verdicts=None), rollout.verdicts.result()

    @staticmethod
    def _share(settled) -> Rollout:
        """A Rollout again from what `_settled` made on process 0 (now on every process)."""
        rollout, verdicts = settled
        done: Future = Future()
        done.set_result(verdicts)
        return dataclasses.replace(rollout, verdicts=done)

    def _check_pushes(self) -> None:
        """Re-raises a failed background push here, in the learner's thread."""
        done = [f for f in self._pushes if f.done()]
        self._pushes = [f for f in self._pushes if not f.done()]
        for f in done:
            f.result()

    def extra(self) -> Rollout | None:
        """One more batch, drawn and sampled now with the newest pushed weights (dynamic sampling's refill);
        None when the prompts are used up."""
        try:
            drawn = self._draw()
        except StopIteration:
            return None
        if not self._shared:
            return self._run(lambda: self._generate(*drawn))
        return self._share(process_zero_result(lambda: self._settled(self._run(lambda: self._generate(*drawn)))))

    def run_in_backend(self, fn: Callable[[], Any]) -> Any:
        """`fn()` in order with the queued pushes and generations (e.g. a greedy evaluation). In a
        multi-process job it runs where rollouts are made (see the module doc) and process 0's result (picklable)
        is returned on every process."""
        if not self._shared:
            return self._run(fn)
        return process_zero_result(lambda: self._run(fn) if self._samples else None)

    def score(self, items: list[VerifyItem]) -> list[Verdict]:
        """Verdicts for `items` from the same verifier pool (waits for any scoring in flight)."""
        return self._score(items)[0]

    def close(self) -> None:
        """Drops the batches requested ahead that have not started, waits for the rest (queued pushes
        included: the generator ends up with the last weights published) and stops both threads."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        for pool in (self._worker, self._scoring):
            if pool is not None:
                pool.shutdown(wait=True)


@jax.jit
def device_copy(params):
    """A fresh on-device copy of `params` (a jitted computation never aliases its inputs without donation): the
    snapshot a vLLM push serialises later, from the rollout thread, after the learner donated the original."""
    return jax.tree.map(lambda x: x + 0, params)


def versions_of(batch: RolloutBatch) -> np.ndarray:
    """float32 [N]: the weight version (learner step) that produced each row; NaN where unknown."""
    return np.array([float(v) if v not in (None, "") else np.nan for v in batch.weight_versions], np.float32)
