"""`VLLMClient`: the `RolloutBackend` that drives one or more vLLM servers over HTTP.

Generation: one `/v1/completions` request per prompt (token ids in, token ids and processed log-probs out),
spread over the servers by a thread pool. A request that fails with a connection error, a timeout or a 5xx
is retried on the next server with exponential back-off (capped at `max_backoff_s`) until `retry_deadline_s`
after its first failure, long enough for a restarted server to reload a large model; its result replaces
(never adds to) the prompt's slot, so every prompt comes back exactly once and in order.

Scoring: the same endpoint with the completion appended to the prompt and `prompt_logprobs: 0`, which makes
vLLM return the log-prob of every prompt token under the served weights. vLLM computes those from the raw
logits (no temperature: sampling processors skip prompt tokens), so only temperature 1 is available.

Weights: `push_weights` = `write_push_folder` (collective over the trainer's processes: the policy goes out
through `weight_sync.publish_weights`, today as Hugging Face safetensors in `weights_dtype`, bfloat16 by
default, into a fresh folder under `weights_dir`, which every server must be able to read: /dev/shm by
default, a shared filesystem when servers run elsewhere) + `load_folder` (process 0 only), which per server
pauses it (in-flight requests finish, the prefix cache is dropped), reloads from the folder, sets and checks
the version tag, then resumes. A reload that fails can leave vLLM's model half-loaded while /health still
says 200, so a failed server is reloaded from the last good folder while still paused, and is never resumed
broken. A server that restarts comes back on its startup weights: the client notices (a failed request, or
the version check at the start of each `generate`) and reloads the current folder before using it again.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import jax
import numpy as np

from tulu_jax import multihost
from tulu_jax.models import hf
from tulu_jax.models.config import DecoderConfig
from tulu_jax.rollout.http import Retryable as _Retryable
from tulu_jax.rollout.http import RolloutServerError, call_with_retries
from tulu_jax.rollout.http import request_json as _http
from tulu_jax.rollout.types import (
    Completion,
    RolloutBatch,
    SamplingParams,
    batch_completions,
    check_score_inputs,
)
from tulu_jax.rollout.weight_sync import (
    check_folder,
    expected_tensors,
    publish_weights,
    push_bytes,
    scratch_weights_dir,
)


class _Server:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.version: str | None = None  # the tag we last set on it; None: still on its startup weights
        self.stale = False  # lost contact since: check its weights before the next request
        self.lock = threading.Lock()  # one weight reload at a time


class _Gate:
    """Many `generate` calls at once, or one push alone: every completion's version tag is then exact."""

    def __init__(self):
        self._cond, self._readers, self._writer = threading.Condition(), 0, False

    @contextlib.contextmanager
    def reading(self):
        """Held by each `generate` / `score`: waits while a push runs."""
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        """Held by a push: waits for running readers, keeps new ones out until it ends."""
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._writer = True
            self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class VLLMClient:
    """Implements `RolloutBackend` against vLLM servers started with `--logprobs-mode processed_logprobs`
    (`tulu_jax.rollout.server` does). `cfg` (our model config) is needed to push weights; `push_weights`
    raises ValueError without it. Pushes go out in `weights_dtype` ('bfloat16', the serving dtype on
    accelerators and half the bytes of float32; 'float32' when a float32 server must run exactly the
    trainer's weights; 'float16') into folders under `weights_dir` (default: `weight_sync.scratch_weights_dir`,
    /dev/shm when it has room), of which the newest `keep_folders` are kept.

    Times are seconds: `timeout_s` per HTTP request, `retry_deadline_s` how long a failing request keeps
    being retried after its first failure (back-off from `backoff_s`, doubling, capped at `max_backoff_s`),
    `push_timeout_s` per step of a weight reload."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        eos_token_id: int,
        pad_token_id: int,
        cfg: DecoderConfig | None = None,
        weights_dir: str | None = None,
        weights_dtype: str = "bfloat16",
        timeout_s: float = 600.0,
        retry_deadline_s: float = 300.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 4.0,
        max_concurrency: int = 64,
        push_timeout_s: float = 600.0,
        keep_folders: int = 2,
    ):
        if not urls:
            raise ValueError("VLLMClient needs at least one server URL")
        self.eos_token_id, self.pad_token_id, self.cfg = int(eos_token_id), int(pad_token_id), cfg
        self._servers = [_Server(u) for u in urls]
        self.weights_dir, self.weights_dtype = weights_dir, weights_dtype
        self.timeout_s, self.retry_deadline_s = timeout_s, retry_deadline_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_concurrency, self.push_timeout_s, self.keep_folders = max_concurrency, push_timeout_s, keep_folders
        self._gate = _Gate()
        self._folder: str | None = None  # the folder of `weight_version`, what a restarted server reloads
        self._folders: list[str] = []  # folders we wrote, oldest first (pruned to keep_folders)
        self._owns_dir = False  # whether weights_dir is a scratch folder this client made
        self._folders_lock = threading.Lock()  # written by write_push_folder, pruned by load_folder's thread
        self._pushes = 0
        self.weight_version: str | None = None
        self.last_push: dict[str, float] = {}
        self.last_generate: dict[str, float] = {}

    @property
    def urls(self) -> list[str]:
        """The servers' base URLs, without a trailing slash."""
        return [s.url for s in self._servers]

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """`params.n` completions per prompt (lists of int token ids), prompt-major; each stops at EOS or a
        stop token (kept) or after `params.max_tokens`. With `params.seed` the prompts get distinct seeds
        derived from it; without, vLLM draws its own. Raises ValueError on an empty prompt,
        RolloutServerError when a server refuses a request or none answers before the retry deadline."""
        prompts = [tuple(int(t) for t in p) for p in prompts]
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        # A seed shared by many requests would give every prompt the same random stream: derive one per
        # prompt instead (vLLM gives the n samples of a request seeds s, s+1, ...; 48-bit draws keep those
        # ranges apart).
        rng = random.Random(params.seed)
        seeds = [rng.getrandbits(48) if params.seed is not None else None for _ in prompts]
        start = time.perf_counter()
        results, retries = self._map(
            prompts,
            lambda i, p: self._request(p, params, seeds[i]),
            lambda i, p, answer, version: self._parse(i, p, params, answer, version),
        )
        out = [c for row in results for c in row]
        elapsed = time.perf_counter() - start
        new_tokens = sum(len(c.token_ids) for c in out)
        self.last_generate = {
            "seconds": elapsed,
            "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / max(elapsed, 1e-9),
            "retries": retries,
        }
        return out

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """`generate` as a `RolloutBatch` (see `batch_completions`) of completion width `params.max_tokens`."""
        return batch_completions(self.generate(prompts, params), self.pad_token_id, width=params.max_tokens)

    def score(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        completion_token_ids: Sequence[Sequence[int]],
        temperature: float = 1.0,
    ) -> np.ndarray:
        """log p(token | prompt, earlier completion tokens) of every completion token under the served
        weights, from vLLM's `prompt_logprobs` on prompt + completion: float32 [N, T], T = max(1, longest
        completion), 0.0 past each row's end. Raises NotImplementedError for temperature != 1 (vLLM scores
        prompt tokens from the raw logits), ValueError for mismatched lengths or an empty prompt,
        RolloutServerError as `generate`."""
        if temperature != 1.0:
            raise NotImplementedError(
                f"VLLMClient.score: temperature {temperature} is not available: vLLM computes prompt_logprobs "
                "from the raw logits (temperature 1); score with LocalSampler.score or the trainer's forward pass"
            )
        check_score_inputs(prompt_token_ids, completion_token_ids)
        seqs = [tuple(int(t) for t in (*p, *c)) for p, c in zip(prompt_token_ids, completion_token_ids)]
        spans = [(len(p), len(c)) for p, c in zip(prompt_token_ids, completion_token_ids)]
        body = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "return_tokens_as_token_ids": True}
        rows, _ = self._map(
            seqs,
            lambda i, seq: {**body, "prompt": list(seq)},
            lambda i, seq, answer, version: self._parse_prompt_logps(i, seq, spans[i], answer),
        )
        out = np.zeros((len(seqs), max([1, *(n for _, n in spans)])), np.float32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def _map(self, items: list[tuple[int, ...]], make_body, parse) -> tuple[list, int]:
        """One request per item over the thread pool, under the read gate after a version check ->
        ([parse(i, item, answer, version) per item, in order], retries taken)."""
        if not items:
            return [], 0
        with self._gate.reading():
            self._check_versions()
            results: list = [None] * len(items)
            with ThreadPoolExecutor(min(self.max_concurrency, len(items))) as pool:
                futures = {
                    pool.submit(self._call, i, make_body(i, item), lambda a, v, i=i, item=item: parse(i, item, a, v)): i
                    for i, item in enumerate(items)
                }
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    pool.shutdown(cancel_futures=True)
                    raise failed[0].exception()
                retries = 0
                for f, i in futures.items():
                    results[i], attempts = f.result()  # each item's slot is filled once, by its own task
                    retries += attempts - 1
        return results, retries

    def _request(self, prompt: tuple[int, ...], sp: SamplingParams, seed: int | None) -> dict:
        body = {
            "prompt": list(prompt),
            "max_tokens": sp.max_tokens,
            "n": 1 if sp.greedy else sp.n,  # vLLM refuses n > 1 when greedy; the copies are identical anyway
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "logprobs": 0,  # the sampled token's log-prob only
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            # Our EOS, not the one in the server's generation config: ignore_eos turns the latter off and
            # leaves stop_token_ids in force.
            "ignore_eos": True,
            "stop_token_ids": sorted({self.eos_token_id, *sp.stop_token_ids}),
        }
        if sp.top_k > 0:
            body["top_k"] = sp.top_k
        if seed is not None:
            body["seed"] = seed
        return body

    def _call(self, i: int, body: dict, parse):
        """POSTs request `i` -> (parse(answer, weight version), attempts). Retries rotate over the servers
        from request i's own until `retry_deadline_s` after the first failure."""

        def attempt(k: int):
            server = self._servers[k]
            try:
                if server.stale:
                    self._resync(server)
                version = server.version
                answer = _http(server.url + "/v1/completions", body, timeout=self.timeout_s)
                return parse(answer, version)
            except _Retryable:
                server.stale = True
                raise

        return call_with_retries(
            attempt,
            start=i,
            num_servers=len(self._servers),
            retry_deadline_s=self.retry_deadline_s,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
            what=f"request {i}",
        )

    def _parse(self, i: int, prompt: tuple[int, ...], sp: SamplingParams, answer: dict, version) -> list[Completion]:
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        out = []
        for k, c in enumerate(choices):
            if c["finish_reason"] not in ("stop", "length"):  # aborted or errored inside the engine
                raise _Retryable(f"prompt {i} finished with {c['finish_reason']!r}")
            if tuple(c["prompt_token_ids"]) != prompt:
                raise RolloutServerError(f"prompt {i}: the server echoed different prompt tokens")
            tokens, logps = tuple(c["token_ids"]), tuple(c["logprobs"]["token_logprobs"])
            if len(tokens) != len(logps):
                raise RolloutServerError(f"prompt {i}: {len(tokens)} tokens but {len(logps)} log-probs")
            completion = Completion(
                prompt_index=i,
                sample_index=k,
                prompt_token_ids=prompt,
                token_ids=tokens,
                logps=logps,
                finish_reason=c["finish_reason"],
                weight_version=version,
            )
            out.append(completion)
        if sp.greedy:  # one greedy request stands for all n samples
            out = [Completion(**{**vars(out[0]), "sample_index": k}) for k in range(sp.n)]
        if len(out) != sp.n:
            raise RolloutServerError(f"prompt {i}: asked for {sp.n} samples, got {len(out)}")
        return out

    @staticmethod
    def _parse_prompt_logps(i: int, seq: tuple[int, ...], span: tuple[int, int], answer: dict) -> list[float]:
        """The log-probs of seq[start : start + n] from a `prompt_logprobs` answer (entry j scores seq[j])."""
        start, n = span
        (choice,) = answer["choices"]
        entries = choice.get("prompt_logprobs")
        if entries is None or len(entries) != len(seq):
            raise RolloutServerError(f"score row {i}: no prompt_logprobs for its {len(seq)} tokens in the answer")
        out = []
        for j in range(start, start + n):
            entry = entries[j] or {}
            found = entry.get(str(seq[j]))
            if found is None:
                raise RolloutServerError(f"score row {i}: prompt_logprobs lacks token {seq[j]} at position {j}")
            out.append(float(found["logprob"]))
        return out

    # ------------------------------------------------------------------ weights

    def push_weights(self, params, version: str | None = None) -> dict[str, float]:
        """`write_push_folder` then `load_folder`: writes `params` (our layout, the model of `self.cfg`) in
        `weights_dtype` and loads them on every server, tagged `version` (default "push-<count>"). Waits for
        running `generate` calls before touching a server; returns (and keeps in `last_push`) seconds per
        phase: write_s, load_s, total_s.

        Multi-process: every process calls it; only process 0 talks to the servers, and every process
        returns once the new version is loaded, with process 0's timings (a server error is raised on every
        process). Raises ValueError without `cfg`, RolloutServerError when a server refuses the folder."""
        version = str(version) if version is not None else f"push-{self._pushes + 1}"
        start = time.perf_counter()
        folder = self.write_push_folder(params, version)
        written = time.perf_counter()
        failure = None
        try:
            self.load_folder(folder, version)
        except Exception as e:  # shared before raising: the other processes must not wait for it forever
            failure = e
        end = time.perf_counter()
        times = {"write_s": written - start, "load_s": end - written, "total_s": end - start}
        error = None if failure is None else f"{type(failure).__name__}: {failure}"[:8000]
        # Process 0's outcome on every process; the others wait here until it has loaded.
        shared = multihost.broadcast_object({"times": times, "error": error})
        if failure is not None:
            raise failure
        if shared["error"] is not None:
            raise RolloutServerError(f"weight push {version!r} failed on process 0: {shared['error']}")
        self.last_push = shared["times"]
        return self.last_push

    def write_push_folder(self, params, version: str | None = None) -> str:
        """Publishes `params` (our layout, the model of `self.cfg`) as a fresh folder under `weights_dir`
        in `weights_dtype` (`weight_sync.publish_weights`) -> its absolute path; `version` (default
        "push-<count>") only names the folder. Running `generate` calls go on meanwhile: nothing is loaded
        yet (`load_folder` does that).

        Collective: with several processes every one must call it, in the same order; only process 0
        writes, and every process returns once the folder is complete. The first call picks `weights_dir`
        when none was given (`scratch_weights_dir`: /dev/shm when it has room for `keep_folders` + 1
        pushes). Raises ValueError without `cfg`."""
        cfg = self.cfg
        if cfg is None:
            raise ValueError("push_weights needs the model config: construct VLLMClient(..., cfg=DecoderConfig)")
        self._pushes += 1
        version = str(version) if version is not None else f"push-{self._pushes}"
        if self.weights_dir is None:
            room = (self.keep_folders + 1) * push_bytes(cfg, self.weights_dtype)  # kept + the one being written
            chosen = scratch_weights_dir(room) if jax.process_index() == 0 else ""
            self.weights_dir = multihost.broadcast_object(chosen)
            self._owns_dir = True  # ours to delete on close
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", version)
        folder = os.path.abspath(os.path.join(self.weights_dir, f"{self._pushes:05d}-{name}"))
        publish_weights(params, cfg, folder, dtype=self.weights_dtype)
        multihost.barrier(f"tulu_jax_push_{self._pushes}")
        with self._folders_lock:
            self._folders.append(folder)
        return folder

    def close(self) -> None:
        """Deletes the folders this client's pushes wrote (and its scratch `weights_dir`, e.g. under /dev/shm,
        which is RAM), from process 0. The servers keep serving what they loaded; later pushes write anew."""
        if jax.process_index() != 0:
            return
        with self._folders_lock:
            for folder in self._folders:
                shutil.rmtree(folder, ignore_errors=True)
            self._folders.clear()
        if self._owns_dir and self.weights_dir is not None:
            shutil.rmtree(self.weights_dir, ignore_errors=True)
            self.weights_dir, self._owns_dir = None, False

    def load_folder(self, folder: str, version: str) -> None:
        """Loads an already written Hugging Face folder on every server, tagged `version`, waiting for
        running `generate` calls first. The folder is checked against the model config (the client's `cfg`,
        else the folder's config.json) before any server is touched; RolloutServerError if it does not
        match or a server refuses it (see `_load`).

        Only process 0 talks to the servers: on the others this returns at once (recording `version` as
        the current one), so it may run in any thread there. Safe to call from another thread than
        `write_push_folder`'s."""
        folder, version = os.path.abspath(folder), str(version)
        if jax.process_index() != 0:
            self._folder, self.weight_version = folder, version
            return
        with self._gate.writing():
            self._load_all(folder, version, self.cfg)

    def _load_all(self, folder: str, version: str, cfg: DecoderConfig | None) -> None:
        cfg = cfg or self.cfg
        if cfg is None and os.path.exists(os.path.join(folder, "config.json")):
            cfg = hf.load_hf_config(folder)
        # vLLM skips a missing tensor without a word (the old values stay), so check names and shapes here.
        problems = check_folder(folder, expected_tensors(cfg)) if cfg is not None else ["no config to check it by"]
        if problems:
            raise RolloutServerError(
                f"weight push {version!r} refused before touching any server: {folder}: " + "; ".join(problems[:5])
            )
        with ThreadPoolExecutor(len(self._servers)) as pool:
            results = pool.map(lambda s: self._try_load(s, folder, version), self._servers)
            errors = [err for err in results if err is not None]
        if len(errors) < len(self._servers):  # at least one server runs it: it is now the current folder
            self._folder, self.weight_version = folder, version
            self._prune()
        if errors:
            raise RolloutServerError(
                f"weight push {version!r} ({folder}) failed on {len(errors)} server(s):\n" + "\n".join(errors)
            )

    def _try_load(self, server: _Server, folder: str, version: str) -> str | None:
        with server.lock:
            try:
                self._load(server, folder, version)
                server.stale = False
            except (RolloutServerError, _Retryable) as e:
                return str(e)
        return None

    def _load(self, server: _Server, folder: str, version: str) -> None:
        """pause -> reload -> tag -> check -> resume on one server. A failed reload is undone from the last
        good folder while paused; a server that cannot be restored is left paused (never serving a broken
        model) and the error says so."""
        url, t = server.url, self.push_timeout_s
        _http(url + "/pause?mode=wait", {}, timeout=t)  # lets in-flight requests finish, clears the prefix cache
        try:
            self._reload(url, folder, version, t)
        except (RolloutServerError, _Retryable) as e:
            fallback = self._folder or self._served_root(url)
            try:
                self._reload(url, fallback, server.version or "default", t)
            except (RolloutServerError, _Retryable) as e2:
                raise RolloutServerError(
                    f"{url}: reload from {folder} failed ({e}); restoring {fallback} failed too ({e2}): "
                    f"the server stays paused"
                ) from None
            _http(url + "/resume", {}, timeout=t)
            raise RolloutServerError(
                f"{url}: reload from {folder} refused ({e}); restored {fallback} and resumed"
            ) from None
        server.version = version
        _http(url + "/resume", {}, timeout=t)

    @staticmethod
    def _reload(url: str, folder: str, version: str, timeout: float) -> None:
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": folder}}  # kwargs travel as strings
        _http(url + "/collective_rpc", rpc, timeout=timeout)
        _http(url + "/update_weight_version", {"new_version": version}, timeout=timeout)
        got = _http(url + "/weight_info", timeout=timeout)["weight_version"]
        if got != version:
            raise RolloutServerError(f"{url}: weight_info reports {got!r} after setting {version!r}")

    def _served_root(self, url: str) -> str:
        """The folder the server started from: the fallback before any push succeeded."""
        return _http(url + "/v1/models", timeout=self.timeout_s)["data"][0]["root"]

    def _check_versions(self) -> None:
        """Marks servers whose weights are not the ones we set (restarted since) for a reload before use."""
        for server in self._servers:
            if server.version is None or server.stale:
                continue
            try:
                if _http(server.url + "/weight_info", timeout=self.timeout_s)["weight_version"] != server.version:
                    server.stale = True
            except (_Retryable, RolloutServerError):
                server.stale = True

    def _resync(self, server: _Server) -> None:
        """Brings a server that lost contact back to the current weights (raises _Retryable while it is down)."""
        with server.lock:
            if not server.stale:
                return  # another request got there first
            if self._folder is not None:
                got = _http(server.url + "/weight_info", timeout=self.timeout_s)["weight_version"]
                if got != self.weight_version:
                    try:
                        self._load(server, self._folder, self.weight_version)
                    except RolloutServerError as e:
                        raise _Retryable(str(e)) from None
            server.stale = False

    def _prune(self) -> None:
        """Deletes our folders older than the current one, keeping the newest `keep_folders` - 1 of those
        (and every folder written after it, which may still be waiting for its `load_folder`)."""
        with self._folders_lock:
            if self._folder not in self._folders:
                return
            older = self._folders[: self._folders.index(self._folder)]
            for folder in older[: max(0, len(older) - (self.keep_folders - 1))]:
                shutil.rmtree(folder, ignore_errors=True)
                self._folders.remove(folder)
