"""`LocalSampler`: the in-process JAX rollout backend (prefill + KV-cache decode, sharded like training).

The stateful shell around `generate.prefill` / `generate.decode`: it repeats prompts `n` times, left-pads
them to a power-of-two bucket, pads the batch to a multiple of the data-parallel size, runs the two jitted
functions (compiled once per batch, bucket, max_tokens and number of stop ids) and cuts the rows back into
`Completion`s or a `RolloutBatch`. Sampling knobs are traced arguments, so changing them never recompiles.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tulu_jax import sharding as shd
from tulu_jax.losses import token_logps
from tulu_jax.models.decoder import Decoder, KVCache
from tulu_jax.models.loading import param_layout
from tulu_jax.multihost import to_host
from tulu_jax.rollout.types import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    RolloutBatch,
    SamplingParams,
    check_score_inputs,
    left_pad,
)
from tulu_jax.sampling import generate as gen


def prompt_bucket(length: int, minimum: int = 16) -> int:
    """The padded prompt length: the next power of two, so few distinct lengths ever compile."""
    return max(minimum, 1 << max(length - 1, 0).bit_length())


def derived_seed(base: int, version: str | None, call: int) -> int:
    """The seed of an unseeded `generate` call: a hash of (sampler seed, weight version, calls since that
    version was pushed), in [0, 2**31). Two runs that push the same versions and make the same calls draw
    the same samples; consecutive calls, and the same call under another version, draw different ones."""
    digest = hashlib.sha256(f"{base}\0{version}\0{call}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class LocalSampler:
    """Implements `RolloutBackend` in this process on `mesh`: rows shard over data+fsdp, parameters and KV
    heads like training (`param_layout`). The sampler holds its own copy of the weights in the model's
    compute dtype (`model.dtype`, e.g. bfloat16 while the trainer keeps float32 masters), so a trainer may
    donate its parameters to the next step right after `push_weights`.

    `seed` feeds `derived_seed` for calls whose `SamplingParams.seed` is None."""

    def __init__(
        self,
        model: Decoder,
        params,
        mesh: Mesh,
        *,
        eos_token_id: int,
        pad_token_id: int,
        max_batch: int | None = None,
        min_prompt_bucket: int = 16,
        seed: int = 0,
    ):
        self.model, self.mesh = model, mesh
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)
        self.max_batch, self.min_prompt_bucket, self.seed = max_batch, min_prompt_bucket, int(seed)
        _, self._param_shardings = param_layout(model, mesh)
        self._rows_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        self._cache_shardings = shd.logical_sharding(KVCache.logical_axes(), mesh)
        self._jitted: dict[int, tuple] = {}
        # A fresh buffer per leaf in the compute dtype: copy=True, so an unchanged dtype still copies.
        self._copy = jax.jit(
            lambda p: jax.tree.map(lambda x: jnp.array(x, dtype=model.dtype, copy=True), p),
            in_shardings=(self._param_shardings,),
            out_shardings=self._param_shardings,
        )
        self._scorer = shd.jit_on_mesh(
            lambda p, ids, seg, temperature: self._score_fn(p, ids, seg, temperature),
            mesh,
            in_shardings=(
                self._param_shardings,
                shd.batch_sharding(mesh),
                shd.batch_sharding(mesh),
                shd.replicated(mesh),
            ),
            out_shardings=shd.batch_sharding(mesh),
        )
        self.params, self.weight_version, self._calls = None, None, 0
        self.last_stats: dict[str, float] = {}
        self.push_weights(params, None)

    @classmethod
    def from_hf(
        cls,
        path: str,
        mesh: Mesh | None = None,
        dtype: str = "float32",
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> LocalSampler:
        """A sampler on the Hugging Face folder `path`, computing in `dtype` ("float32", "bfloat16", "auto");
        `mesh` defaults to the first device alone. EOS and pad default to the config's, then the folder's
        tokenizer's. Raises FileNotFoundError when `path` has no config.json or weights."""
        from tulu_jax.models import hf
        from tulu_jax.models.loading import build_model, load_params

        mesh = shd.make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
        cfg = hf.load_hf_config(path)
        model = build_model(cfg, dtype=dtype)
        eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
        pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
        if eos is None or pad is None:
            from tulu_jax.data.tokenizer import load_tokenizer
            from tulu_jax.data.tokenizer import pad_token_id as tokenizer_pad_token_id

            tok = load_tokenizer(path)
            eos = tok.eos_token_id if eos is None else eos
            pad = tokenizer_pad_token_id(tok) if pad is None else pad
        return cls(model, load_params(path, model, mesh), mesh, eos_token_id=eos, pad_token_id=pad, **kwargs)

    def snapshot(self, params):
        """A copy of `params` (our layout, any placement and float dtype) on this sampler's mesh in the compute
        dtype, sharing no buffer with them: the caller may donate or delete `params` right after (a trainer
        takes it before its next step and pushes it later, e.g. from a rollout thread)."""
        placed = jax.device_put(params, self._param_shardings)  # may alias the caller's buffers...
        return self._copy(placed)  # ...this never does

    def push_weights(self, params, version: str | None, *, copy: bool = True) -> None:
        """Makes later samples use `params` and tags them `version`; resets the call counter of
        `derived_seed`. With `copy` (default) the parameters are copied first (`snapshot`), so the caller's
        arrays are never aliased; `copy=False` takes a `snapshot` result as it is."""
        self.params = self.snapshot(params) if copy else params
        self.weight_version, self._calls = version, 0

    def _compiled(self, max_tokens: int):
        if max_tokens not in self._jitted:
            model, mesh, pad = self.model, self.mesh, self.pad_token_id
            rows, repl = shd.batch_sharding(mesh), shd.replicated(mesh)
            prefill = shd.jit_on_mesh(
                lambda p, ids, mask: gen.prefill(model, p, ids, mask, max_tokens),
                mesh,
                in_shardings=(self._param_shardings, rows, rows),
                out_shardings=(rows, self._cache_shardings),
            )
            outs = {"tokens": rows, "logps": rows, "lengths": rows, "stopped": rows, "steps": repl}
            decode = shd.jit_on_mesh(
                lambda p, logits, cache, lens, key, temp, k, top_p, stop: gen.decode(
                    model, p, logits, cache, lens, key, temp, k, top_p, stop, pad, max_tokens
                ),
                mesh,
                in_shardings=(self._param_shardings, rows, self._cache_shardings, rows) + (repl,) * 5,
                out_shardings=(outs, self._cache_shardings),
                donate_argnums=(2,),  # the cache is updated in place
            )
            self._jitted[max_tokens] = (prefill, decode)
        return self._jitted[max_tokens]

    def _sample_batch(self, rows: list[Sequence[int]], sp: SamplingParams, key, stop_ids: Sequence[int]):
        """One padded batch through prefill and decode -> (numpy outputs for `rows`, timings)."""
        lens = np.array([len(r) for r in rows])
        if lens.min() < 1:
            raise ValueError("every prompt needs at least one token")
        p = prompt_bucket(int(lens.max()), self.min_prompt_bucket)
        b = -(-len(rows) // self._rows_multiple) * self._rows_multiple
        ids, mask = np.zeros((b, p), np.int32), np.zeros((b, p), np.int32)
        lens = np.concatenate([lens, np.full(b - len(rows), lens[0])])
        for i in range(b):  # batch filler rows repeat the first prompt and are dropped below
            row = rows[i] if i < len(rows) else rows[0]
            ids[i, p - len(row) :], mask[i, p - len(row) :] = row, 1
        prefill, decode = self._compiled(sp.max_tokens)
        start = time.perf_counter()
        logits, cache = jax.block_until_ready(prefill(self.params, ids, mask))
        mid = time.perf_counter()
        out, _ = decode(
            self.params,
            logits,
            cache,
            lens.astype(np.int32),
            key,
            np.float32(sp.temperature),
            np.int32(sp.top_k),
            np.float32(sp.top_p),
            np.asarray(sorted(set(stop_ids)), np.int32),
        )
        out = to_host(out)  # gathered from every process's devices in a multi-process job
        end = time.perf_counter()
        out = {name: (v[: len(rows)] if name != "steps" else int(v)) for name, v in out.items()}
        new_tokens = int(out["lengths"].sum())
        timing = {"prefill_s": mid - start, "decode_s": end - mid, "steps": out["steps"], "new_tokens": new_tokens}
        return out, timing

    def _sample(self, rows, sp: SamplingParams, stop_ids, seed: int):
        """All rows in batches of at most `max_batch`; records `last_stats`."""
        size = self.max_batch or len(rows)
        key = jax.random.key(seed)
        outs, stats = [], {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "new_tokens": 0}
        for n, lo in enumerate(range(0, len(rows), size)):
            out, timing = self._sample_batch(rows[lo : lo + size], sp, jax.random.fold_in(key, n), stop_ids)
            outs.append(out)
            stats = {k: stats[k] + timing[k] for k in stats}
        stats["decode_tokens_per_s"] = stats["new_tokens"] / max(stats["decode_s"], 1e-9)
        self.last_stats = stats
        return {k: np.concatenate([o[k] for o in outs]) for k in ("tokens", "logps", "lengths", "stopped")}

    def _run(self, prompts: Sequence[Sequence[int]], params: SamplingParams):
        """(rows: each prompt `n` times as int tuples, numpy outputs of `_sample` for them)."""
        rows = [tuple(int(t) for t in prompt) for prompt in prompts for _ in range(params.n)]
        if params.seed is not None:
            seed = params.seed
        else:
            seed = derived_seed(self.seed, self.weight_version, self._calls)
            self._calls += 1
        if not rows:
            return rows, None
        return rows, self._sample(rows, params, (self.eos_token_id, *params.stop_token_ids), seed)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """`params.n` completions per prompt (lists of int token ids, each at least one token), prompt-major;
        each row stops at EOS or a stop token (kept) or after `params.max_tokens`. Without `params.seed` the
        seed is `derived_seed(self.seed, weight_version, call counter)`. Raises ValueError on an empty prompt."""
        rows, out = self._run(prompts, params)
        completions = []
        for i, row in enumerate(rows):
            n = int(out["lengths"][i])
            completions.append(
                Completion(
                    prompt_index=i // params.n,
                    sample_index=i % params.n,
                    prompt_token_ids=row,
                    token_ids=tuple(int(t) for t in out["tokens"][i, :n]),
                    logps=tuple(float(x) for x in out["logps"][i, :n]),
                    finish_reason="stop" if out["stopped"][i] else "length",
                    weight_version=self.weight_version,
                )
            )
        return completions

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """`generate` as padded arrays straight from the device outputs (no per-token Python objects): the
        same samples and draws as `generate` with the same seed; completion width T = `params.max_tokens`."""
        rows, out = self._run(prompts, params)
        n = len(rows)
        if out is None:
            out = {
                "tokens": np.zeros((0, params.max_tokens), np.int32),
                "logps": np.zeros((0, params.max_tokens)),
                "lengths": np.zeros(0, np.int32),
                "stopped": np.zeros(0, bool),
            }
        prompt_lengths = np.array([len(r) for r in rows], np.int32)
        return RolloutBatch(
            prompt_token_ids=left_pad(rows, int(prompt_lengths.max(initial=0)), self.pad_token_id),
            prompt_lengths=prompt_lengths,
            token_ids=out["tokens"].astype(np.int32),
            logps=out["logps"].astype(np.float32),
            lengths=out["lengths"].astype(np.int32),
            finish_reasons=np.where(out["stopped"], FINISH_STOP, FINISH_LENGTH).astype(np.int32),
            prompt_index=np.arange(n, dtype=np.int32) // params.n,
            sample_index=np.arange(n, dtype=np.int32) % params.n,
            weight_versions=(self.weight_version,) * n,
        )

    def _score_fn(self, params, ids_BxL, seg_BxL, temperature):
        """log p(ids[:, j+1] | ids[:, :j+1]) -> float32 [B, L-1] for right-padded rows (segment 1 = real)."""
        positions_BxL = jnp.cumsum(seg_BxL, axis=1) - seg_BxL
        logits = self.model.apply({"params": params}, ids_BxL, positions_BxL, seg_BxL)
        return token_logps(logits[:, :-1] / temperature, ids_BxL[:, 1:])

    def score(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        completion_token_ids: Sequence[Sequence[int]],
        temperature: float = 1.0,
    ) -> np.ndarray:
        """log softmax(logits / temperature)[token] of every completion token given its prompt and the
        completion tokens before it, from one forward pass of the current weights (no top-k / top-p):
        float32 [N, T], T = max(1, longest completion), 0.0 past each row's end. With the sampling
        temperature and no top-k / top-p these are the `logps` `generate` reported (up to float error).
        Raises ValueError for mismatched lengths, an empty prompt or temperature <= 0."""
        check_score_inputs(prompt_token_ids, completion_token_ids)
        if not temperature > 0:
            raise ValueError(f"score: temperature must be > 0, got {temperature}")
        t = max([1, *(len(c) for c in completion_token_ids)])
        out = np.zeros((len(prompt_token_ids), t), np.float32)
        size = self.max_batch or max(len(prompt_token_ids), 1)
        for lo in range(0, len(prompt_token_ids), size):
            prompts, completions = prompt_token_ids[lo : lo + size], completion_token_ids[lo : lo + size]
            seqs = [[*map(int, p), *map(int, c)] for p, c in zip(prompts, completions)]
            width = prompt_bucket(max(map(len, seqs)) + 1, self.min_prompt_bucket)  # >= 1 pad: L-1 >= every row
            b = -(-len(seqs) // self._rows_multiple) * self._rows_multiple
            ids, seg = np.zeros((b, width), np.int32), np.zeros((b, width), np.int32)
            for i in range(b):  # batch filler rows repeat the first sequence and are dropped below
                seq = seqs[i] if i < len(seqs) else seqs[0]
                ids[i, : len(seq)], seg[i, : len(seq)] = seq, 1
            logp = to_host(self._scorer(self.params, ids, seg, np.float32(temperature)))
            for i, (p, c) in enumerate(zip(prompts, completions)):
                out[lo + i, : len(c)] = logp[i, len(p) - 1 : len(p) - 1 + len(c)]
        return out
