"""`LocalSampler`: the in-process JAX rollout backend (prefill + KV-cache decode, sharded like training).

The stateful shell around `generate.prefill` / `generate.decode`: it repeats prompts `n` times, left-pads
them to a power-of-two bucket, pads the batch to a multiple of the data-parallel size, runs the two jitted
functions (compiled once per batch, bucket, max_tokens and number of stop ids) and cuts the rows back into
`Completion`s. Sampling knobs are traced arguments, so changing them never recompiles.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from tulu_jax import sharding as shd
from tulu_jax.models.decoder import Decoder, KVCache
from tulu_jax.models.loading import param_layout
from tulu_jax.rollout.types import Completion, SamplingParams
from tulu_jax.sampling import generate as gen


def prompt_bucket(length: int, minimum: int = 16) -> int:
    """The padded prompt length: the next power of two, so few distinct lengths ever compile."""
    return max(minimum, 1 << max(length - 1, 0).bit_length())


class LocalSampler:
    """Implements `RolloutBackend` in this process. `params` are in our layout (any placement: they are
    moved to the training shardings on `mesh`); rows shard over data+fsdp, KV heads over tensor."""

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
    ):
        self.model, self.mesh = model, mesh
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)
        self.max_batch, self.min_prompt_bucket = max_batch, min_prompt_bucket
        _, self._param_shardings = param_layout(model, mesh)
        self._rows_multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        self._cache_shardings = shd.logical_sharding(KVCache.logical_axes(), mesh)
        self._jitted: dict[int, tuple] = {}
        self._seeds = np.random.default_rng()
        self.params, self.weight_version = None, None
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
        """A sampler on a Hugging Face folder; `mesh` defaults to the first device alone. EOS and pad
        default to the config's, then the folder's tokenizer's."""
        from tulu_jax.models import hf
        from tulu_jax.models.loading import build_model, load_params

        mesh = shd.make_mesh(devices=jax.devices()[:1]) if mesh is None else mesh
        cfg = hf.load_hf_config(path)
        model = build_model(cfg, dtype=dtype)
        eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
        pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
        if eos is None or pad is None:
            from tulu_jax.data.tokenizer import load_tokenizer, pad_id

            tok = load_tokenizer(path)
            eos = tok.eos_token_id if eos is None else eos
            pad = pad_id(tok) if pad is None else pad
        return cls(model, load_params(path, model, mesh), mesh, eos_token_id=eos, pad_token_id=pad, **kwargs)

    def push_weights(self, params, version: str | None) -> None:
        self.params = jax.device_put(params, self._param_shardings)
        self.weight_version = version

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
            outs = {"tokens": rows, "logprobs": rows, "lengths": rows, "stopped": rows, "steps": repl}
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
        out = jax.device_get(out)
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
        return {k: np.concatenate([o[k] for o in outs]) for k in ("tokens", "logprobs", "lengths", "stopped")}

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """`params.n` completions per prompt, prompt-major; each row stops at EOS or a stop token (kept)."""
        rows = [tuple(int(t) for t in prompt) for prompt in prompts for _ in range(params.n)]
        if not rows:
            return []
        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**31))
        out = self._sample(rows, params, (self.eos_token_id, *params.stop_token_ids), seed)
        completions = []
        for i, row in enumerate(rows):
            n = int(out["lengths"][i])
            completions.append(
                Completion(
                    prompt_index=i // params.n,
                    sample_index=i % params.n,
                    prompt_token_ids=row,
                    token_ids=tuple(int(t) for t in out["tokens"][i, :n]),
                    logprobs=tuple(float(x) for x in out["logprobs"][i, :n]),
                    finish_reason="stop" if out["stopped"][i] else "length",
                    weight_version=self.weight_version,
                )
            )
        return completions


def time_decode(
    sampler: LocalSampler, batch: int, prompt_len: int, new_tokens: int, *, temperature: float = 1.0, seed: int = 0
) -> dict[str, float]:
    """Times `batch` random prompts of `prompt_len` tokens decoding exactly `new_tokens` each (stop tokens
    off), after one untimed call that compiles. -> `last_stats` (prefill_s, decode_s, decode_tokens_per_s)."""
    rng = np.random.default_rng(seed)
    rows = [tuple(rng.integers(0, sampler.model.cfg.vocab_size, prompt_len).tolist()) for _ in range(batch)]
    sp = SamplingParams(max_tokens=new_tokens, temperature=temperature, seed=seed)
    for _ in range(2):
        sampler._sample(rows, sp, (), seed)
    return dict(sampler.last_stats, batch=batch, prompt_len=prompt_len)
