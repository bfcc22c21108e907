"""Reusable pieces of the training-throughput benchmark (`scripts/bench_train.py`).

Three kinds of measurement, each returning per-repetition wall times so that callers can interleave
them (the benchmark alternates JAX, PyTorch and matmul-peak samples in rounds, so load from other
processes on a shared machine hits all of them alike):

* `JaxSFTBench`: our jitted SFT step (`tulu_jax.train.sft_step.jit_sft_step`) on one device.
* `TorchSFTBench`: the same architecture and batch in transformers + PyTorch: forward, masked
  sum-reduced cross entropy, backward, global-norm clip and `torch.optim.AdamW`, i.e. what our step does.
* `jax_matmul` / `torch_matmul`: a square matrix multiply, the machine's practical matmul peak.

Nothing here sets XLA flags: they must be in the environment before `jax` is first imported, which is
the caller's job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from tulu_jax.models.config import DecoderConfig, to_hf_config


def make_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """An SFT batch of int32 [B, T] arrays: one document per row filling all T positions, with the loss on
    the second half of each row (a prompt/response split). Every row has the full causal attention pattern,
    so both frameworks do the same work."""
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((batch, seq_len), np.int32)
    loss_mask[:, seq_len // 2 :] = 1
    return {
        "input_ids": rng.integers(0, vocab_size, (batch, seq_len)).astype(np.int32),
        "loss_mask": loss_mask,
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
    }


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Wall time of each of `n` calls; `fn` must block until its work is done."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- matrix-multiply peak


def jax_matmul(n: int, dtype: str, compiler_options: dict | None = None) -> Callable[[], object]:
    """A blocking closure computing one [n, n] @ [n, n] product in JAX (2*n^3 FLOPs), compiled and warm.
    `compiler_options` (XLA DebugOptions fields, e.g. {"xla_cpu_use_onednn": True}) apply to this
    compilation only."""
    import jax
    import jax.numpy as jnp

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32), dt)
    b = jnp.asarray(rng.standard_normal((n, n), np.float32), dt)
    f = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=compiler_options)
    f(a, b).block_until_ready()
    return lambda: f(a, b).block_until_ready()


def torch_matmul(n: int, dtype: str) -> Callable[[], object]:
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    out = torch.empty(n, n, dtype=dt)
    torch.matmul(a, b, out=out)
    return lambda: torch.matmul(a, b, out=out)


# ----------------------------------------------------------------------------- our JAX step


class JaxSFTBench:
    """Our SFT train step (AdamW + global-norm clip, Tülu 3 sum reduction) on a 1-device mesh."""

    def __init__(
        self,
        cfg: DecoderConfig,
        batch: dict[str, np.ndarray],
        dtype: str = "float32",
        remat: bool = False,
        seed: int = 0,
        scan_unroll: int = 1,
        attention_block: int = 0,
    ):
        import jax

        from tulu_jax.models.loading import build_model, init_params
        from tulu_jax.sharding import make_mesh
        from tulu_jax.train.optimizer import OptimConfig, make_optimizer
        from tulu_jax.train.sft_step import jit_sft_step
        from tulu_jax.train.state import create_state, state_layout

        self.jax = jax
        mesh = make_mesh(devices=jax.devices()[:1])
        model = build_model(
            cfg,
            dtype=dtype,
            param_dtype="float32",
            remat=remat,
            scan_unroll=scan_unroll,
            attention_block=attention_block,
        )
        # A tiny learning rate keeps the weights (and hence the work) the same over many timed steps.
        tx, schedule = make_optimizer(OptimConfig(lr=1e-6, warmup_ratio=0.0), 1_000_000)
        _, shardings = state_layout(model, tx, mesh)
        self.state = create_state(init_params(model, mesh, jax.random.key(seed)), tx, seed, shardings)
        self.step = jit_sft_step(model, tx, schedule, mesh, shardings, reduction="sum", accum_steps=1)
        self.batch = {k: jax.device_put(v, jax.devices()[0]) for k, v in batch.items()}
        self.metrics = None
        self.compiled = None

    def compile(self, compiler_options: dict | None = None) -> float:
        """Compiles the step ahead of the first call, with per-compilation XLA options (DebugOptions field
        names) on top of XLA_FLAGS; returns the compile time in seconds."""
        t0 = time.perf_counter()
        self.compiled = self.step.lower(self.state, self.batch).compile(compiler_options=compiler_options)
        return time.perf_counter() - t0

    def __call__(self):
        self.state, self.metrics = (self.compiled or self.step)(self.state, self.batch)
        self.jax.block_until_ready((self.state, self.metrics))

    def loss(self) -> float:
        return float(self.metrics["loss"])


# ----------------------------------------------------------------------------- transformers + PyTorch


def hf_llama_config(cfg: DecoderConfig):
    """The transformers `LlamaConfig` of a llama-family DecoderConfig (same shapes, same RoPE)."""
    from transformers import LlamaConfig

    if cfg.family != "llama":
        raise ValueError(f"the PyTorch reference is built for the llama family only (got {cfg.family!r})")
    hf = to_hf_config(cfg)
    hf.pop("architectures", None)
    hf.pop("model_type", None)
    hf.pop("torch_dtype", None)
    hf["use_cache"] = False
    return LlamaConfig(**hf)


@dataclasses.dataclass
class TorchOptions:
    attn_implementation: str = "sdpa"  # "sdpa" or "eager"
    fused_adamw: bool | None = None  # None: PyTorch's default (for-loop on the CPU); True: fused kernel
    compile: bool = False  # torch.compile the model


class TorchSFTBench:
    """The same SFT step in transformers + PyTorch. `dtype="bfloat16"` is mixed precision like ours:
    float32 parameters and optimizer, bf16 compute under `torch.autocast`, float32 cross entropy."""

    def __init__(
        self,
        cfg: DecoderConfig,
        batch: dict[str, np.ndarray],
        dtype: str = "float32",
        options: TorchOptions | None = None,
        seed: int = 0,
    ):
        import torch
        import torch.nn.functional as F
        from transformers import LlamaForCausalLM

        opts = options or TorchOptions()
        self.torch, self.F = torch, F
        torch.manual_seed(seed)
        hf_cfg = hf_llama_config(cfg)
        hf_cfg._attn_implementation = opts.attn_implementation
        self.model = LlamaForCausalLM(hf_cfg).to(torch.float32)
        self.model.train()
        kwargs = {"fused": True} if opts.fused_adamw else {}
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kwargs
        )
        self.forward = torch.compile(self.model) if opts.compile else self.model
        self.autocast = dtype == "bfloat16"
        self.vocab = cfg.vocab_size
        ids = torch.from_numpy(batch["input_ids"]).long()
        seg = torch.from_numpy(batch["segment_ids"])
        mask = torch.from_numpy(batch["loss_mask"])
        self.ids = ids
        self.positions = torch.from_numpy(batch["positions"]).long()
        # Same next-token targets and weights as tulu_jax.losses.shift_for_next_token; sum reduction over
        # the number of documents (Tülu 3's `--reduce_loss sum`).
        same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
        w = ((mask[:, 1:] != 0) & same_doc).float()
        self.targets = F.pad(ids[:, 1:], (0, 1))
        self.weights = F.pad(w, (0, 1))
        self.num_seqs = float(((self.positions == 0) & (seg > 0)).sum().clamp(min=1))
        self.last_loss = None

    def __call__(self):
        torch, F = self.torch, self.F
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.forward(input_ids=self.ids, position_ids=self.positions, use_cache=False).logits
        nll = F.cross_entropy(logits.float().reshape(-1, self.vocab), self.targets.reshape(-1), reduction="none")
        loss = (nll * self.weights.reshape(-1)).sum() / self.num_seqs
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()

    def loss(self) -> float:
        return float(self.last_loss)
