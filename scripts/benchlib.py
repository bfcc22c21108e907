"""Reusable pieces of the training-throughput benchmarks (`scripts/bench_train.py`, `scripts/bench_gpu.py`).

Three kinds of measurement, each returning per-repetition wall times so that callers can interleave
them (the benchmark alternates JAX, PyTorch and matmul-peak samples in rounds, so load from other
processes on a shared machine hits all of them alike):

* `JaxSFTBench`: our jitted SFT step (`tulu_jax.train.sft_step.jit_sft_step`) on one device.
* `TorchSFTBench`: the same architecture and batch in transformers + PyTorch: forward, masked
  sum-reduced cross entropy, backward, global-norm clip and `torch.optim.AdamW`, i.e. what our step does.
* `JaxDPOBench`: our jitted DPO step (`tulu_jax.train.dpo_step.jit_dpo_step`, Tülu 3's dpo_norm with
  β = 5) on one device, with the reference log-probs cached in the batch or (`live=True`) from a frozen
  reference forward.
* `TorchDPOBench`: the same DPO step in transformers + PyTorch, started from *our* initial weights
  (`hf_state_dict`), so that the two steps' first losses and gradient norms can be compared (`first`).
* `JaxRLVRBench`: one PPO step of RLVR in its two stages (local-sampler generation, then the forward passes
  and updates of `tulu_jax.train.rlvr_step`), timed per phase.
* `jax_matmul` / `torch_matmul`: a square matrix multiply, the machine's practical matmul peak.

Nothing here sets XLA flags: they must be in the environment before `jax` is first imported, which is
the caller's job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from tulu_jax.config import ModelConfig
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


def make_pair_batch(
    vocab_size: int, pairs: int, seq_len: int, seed: int = 0, ref_noise: float = 0.05
) -> dict[str, np.ndarray]:
    """A DPO batch of `pairs` pairs: int32 [P, 2, T] arrays (side 0 chosen, 1 rejected), each side one
    document filling all T positions, with a prompt shared by both sides (the first half) and a response of
    their own (the second half, which carries the loss). `ref_logps` float32 [P, 2] stands in for the cached
    reference log-probs: per labelled token -log(V) (a random model's log-prob) plus N(0, ref_noise), so the
    first loss differs from log 2 and depends on the policy's log-probs."""
    rng = np.random.default_rng(seed)
    half = seq_len // 2
    ids = rng.integers(0, vocab_size, (pairs, 2, seq_len)).astype(np.int32)
    ids[:, 1, :half] = ids[:, 0, :half]  # one prompt per pair
    loss_mask = np.zeros((pairs, 2, seq_len), np.int32)
    loss_mask[..., half:] = 1
    labelled = loss_mask[..., 1:].sum(-1)  # targets: the next token, where it is labelled (no padding here)
    per_token = -np.log(vocab_size) + ref_noise * rng.standard_normal((pairs, 2))
    return {
        "input_ids": ids,
        "loss_mask": loss_mask,
        "segment_ids": np.ones((pairs, 2, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (pairs, 2, seq_len)).copy(),
        "ref_logps": (labelled * per_token).astype(np.float32),
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


class _JaxStepBench:
    """Model, optimizer and fresh train state on a 1-device mesh, shared by the SFT and DPO benches."""

    def _setup(self, cfg, dtype, remat, seed, scan_unroll, attention_block):
        import jax

        from tulu_jax.models.loading import build_model, init_params
        from tulu_jax.sharding import make_mesh
        from tulu_jax.train.optimizer import OptimConfig, make_optimizer
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
        self.metrics = None
        self.compiled = None
        self.extra_args = ()
        return model, tx, schedule, mesh, shardings

    def _put(self, batch):
        return {k: self.jax.device_put(v, self.jax.devices()[0]) for k, v in batch.items()}

    def compile(self, compiler_options: dict | None = None) -> float:
        """Compiles the step ahead of the first call, with per-compilation XLA options (DebugOptions field
        names) on top of XLA_FLAGS; returns the compile time in seconds."""
        t0 = time.perf_counter()
        lowered = self.step.lower(self.state, self.batch, *self.extra_args)
        self.compiled = lowered.compile(compiler_options=compiler_options)
        return time.perf_counter() - t0

    def __call__(self):
        self.state, self.metrics = (self.compiled or self.step)(self.state, self.batch, *self.extra_args)
        self.jax.block_until_ready((self.state, self.metrics))

    def loss(self) -> float:
        return float(self.metrics["loss"])


class JaxSFTBench(_JaxStepBench):
    """Our SFT train step (AdamW + global-norm clip, Tülu 3 sum reduction) on a 1-device mesh; next-token
    log-probs `logits_chunk` positions at a time (0: all at once), as `model.logits_chunk` sets it."""

    def __init__(
        self,
        cfg: DecoderConfig,
        batch: dict[str, np.ndarray],
        dtype: str = "float32",
        remat: bool = False,
        seed: int = 0,
        scan_unroll: int = 1,
        attention_block: int = 0,
        logits_chunk: int = ModelConfig().logits_chunk,
    ):
        from tulu_jax.train.sft_step import jit_sft_step

        model, tx, schedule, mesh, shardings = self._setup(cfg, dtype, remat, seed, scan_unroll, attention_block)
        self.step = jit_sft_step(
            model, tx, schedule, mesh, shardings, reduction="sum", accum_steps=1, logits_chunk=logits_chunk
        )
        self.batch = self._put(batch)


class JaxDPOBench(_JaxStepBench):
    """Our DPO train step (dpo_norm, β = 5 unless `loss_cfg`, a `dpo_step.LossParams`, says otherwise; AdamW +
    global-norm clip; log-probs `logits_chunk` positions at a time) on a
    1-device mesh, over a `make_pair_batch` batch. Cached reference (default): the reference log-probs come
    with the batch, as in Tülu 3's 70B run; `live=True`: a frozen copy of the initial weights runs the
    reference forward inside the step. `first` holds the first step's loss and (pre-clip) gradient norm."""

    def __init__(
        self,
        cfg: DecoderConfig,
        batch: dict[str, np.ndarray],
        dtype: str = "float32",
        remat: bool = False,
        seed: int = 0,
        scan_unroll: int = 1,
        attention_block: int = 0,
        live: bool = False,
        loss_cfg=None,
        logits_chunk: int = ModelConfig().logits_chunk,
    ):
        from tulu_jax.train.dpo_step import LossParams, jit_dpo_step, step_keys

        model, tx, schedule, mesh, shardings = self._setup(cfg, dtype, remat, seed, scan_unroll, attention_block)
        self.loss_cfg = loss_cfg or LossParams(loss="dpo_norm", beta=5.0)
        self.step = jit_dpo_step(
            model, tx, schedule, mesh, shardings, cfg=self.loss_cfg, accum_steps=1, live=live, logits_chunk=logits_chunk
        )
        self.batch = self._put({k: batch[k] for k in step_keys(live)})
        if live:  # the policy's state is donated every step, so the reference gets its own copy
            self.extra_args = (self.jax.tree.map(lambda x: x.copy(), self.state.params),)
        self.first = None

    def __call__(self):
        super().__call__()
        if self.first is None:
            self.first = {"loss": float(self.metrics["loss"]), "grad_norm": float(self.metrics["grad_norm"])}


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


class _TorchStepBench:
    """transformers' LlamaForCausalLM of a DecoderConfig and its AdamW, shared by the SFT and DPO benches."""

    def _setup(self, cfg: DecoderConfig, dtype: str, options: TorchOptions | None, seed: int, state_dict=None):
        import torch
        import torch.nn.functional as F
        from transformers import LlamaForCausalLM

        opts = options or TorchOptions()
        self.torch, self.F = torch, F
        torch.manual_seed(seed)
        hf_cfg = hf_llama_config(cfg)
        hf_cfg._attn_implementation = opts.attn_implementation
        self.model = LlamaForCausalLM(hf_cfg).to(torch.float32)
        if state_dict is not None:
            missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
            tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
            if unexpected or not set(missing) <= tied:
                raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
        self.model.train()
        kwargs = {"fused": True} if opts.fused_adamw else {}
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **kwargs
        )
        self.forward = torch.compile(self.model) if opts.compile else self.model
        self.autocast = dtype == "bfloat16"
        self.vocab = cfg.vocab_size

    def loss(self) -> float:
        return float(self.last_loss)


class TorchSFTBench(_TorchStepBench):
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

        self._setup(cfg, dtype, options, seed)
        F = self.F
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


def hf_state_dict(cfg: DecoderConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Our random initial parameters (`init_params` with `jax.random.key(seed)`, float32, as `JaxSFTBench` /
    `JaxDPOBench` create them) under their Hugging Face names, as host float32 arrays."""
    import jax

    from tulu_jax.models.hf import param_rules
    from tulu_jax.models.loading import build_model, init_params
    from tulu_jax.sharding import make_mesh

    model = build_model(cfg, dtype="float32", param_dtype="float32")
    params = init_params(model, make_mesh(devices=jax.devices()[:1]), jax.random.key(seed))
    rules = param_rules(cfg)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        rule = rules[tuple(p.key for p in path)]
        host = np.asarray(jax.device_get(leaf), np.float32)
        if "{i}" in rule.hf_name:  # stacked on our leading layer axis: one HF tensor per layer
            for i in range(cfg.num_layers):
                out[rule.hf_name.format(i=i)] = np.ascontiguousarray(rule.to_hf(host[i], cfg))
        else:
            out[rule.hf_name] = np.ascontiguousarray(rule.to_hf(host, cfg))
    return out


class TorchDPOBench(_TorchStepBench):
    """The same DPO step in transformers + PyTorch, written out: one forward of the [2P, T] batch (all chosen
    rows, then all rejected rows), float32 log-softmax gathered at the labelled next tokens, per-side sums and
    counts, the length-normalized DPO loss -log σ(β (Δchosen - Δrejected)) with Δ = (policy - reference) /
    count, mean over pairs, backward, `clip_grad_norm_(1.0)` and `torch.optim.AdamW`. The weights are ours
    (`hf_state_dict(cfg, seed)`), so `first` (the first step's loss and pre-clip gradient norm) must match
    `JaxDPOBench.first`. `live=True` runs a frozen copy of the initial model for the reference log-probs
    (under `torch.no_grad`) instead of taking them from the batch."""

    def __init__(
        self,
        cfg: DecoderConfig,
        batch: dict[str, np.ndarray],
        dtype: str = "float32",
        options: TorchOptions | None = None,
        seed: int = 0,
        live: bool = False,
        beta: float = 5.0,
    ):
        import copy

        import torch

        state = {k: torch.tensor(v) for k, v in hf_state_dict(cfg, seed).items()}
        self._setup(cfg, dtype, options, seed, state)
        pairs, _, seq_len = batch["input_ids"].shape
        self.pairs, self.beta = pairs, beta

        def rows(x):  # [P, 2, T] -> [2P, T]: chosen rows, then rejected rows
            return torch.from_numpy(np.concatenate([x[:, 0], x[:, 1]])).long()

        self.ids, self.positions = rows(batch["input_ids"]), rows(batch["positions"])
        seg, mask = rows(batch["segment_ids"]), rows(batch["loss_mask"])
        same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
        w = ((mask[:, 1:] != 0) & same_doc).float()
        self.targets = torch.nn.functional.pad(self.ids[:, 1:], (0, 1))
        self.weights = torch.nn.functional.pad(w, (0, 1))
        self.counts = self.weights.sum(-1).clamp(min=1.0).view(2, pairs)
        self.ref_logps = torch.from_numpy(np.ascontiguousarray(batch["ref_logps"].T)).float()  # [2, P]
        self.ref_model = None
        if live:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.first = None
        self.last_loss = None

    def _side_logps(self, model):
        """Summed float32 log-probs of the labelled tokens, [2, P] (row 0 chosen, row 1 rejected)."""
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = model(input_ids=self.ids, position_ids=self.positions, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, self.targets.unsqueeze(-1)).squeeze(-1)
        return (logp * self.weights).sum(-1).view(2, self.pairs)

    def __call__(self):
        torch, F = self.torch, self.F
        policy = self._side_logps(self.forward)
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self._side_logps(self.ref_model)
        else:
            ref = self.ref_logps
        ratio = (policy - ref) / self.counts  # per-token log-ratio of each side, [2, P]
        loss = -F.logsigmoid(self.beta * (ratio[0] - ratio[1])).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()
        if self.first is None:
            self.first = {"loss": float(self.last_loss), "grad_norm": float(grad_norm)}


# ----------------------------------------------------------------------------- a two-stage RLVR step


class JaxRLVRBench:
    """One PPO step of Tülu 3's RLVR (§6; open-instruct `ppo_vllm_thread_ray_gtrl.py`) on a 1-device mesh, in
    the two stages the trainer (`tulu_jax.train.rlvr.train_step`) runs them, from the trainer's own jitted
    pieces (`tulu_jax.train.rlvr_step`), without its data pipeline, verifiers or checkpoints:

    1. generate: `LocalSampler.generate_batch` (its compute-dtype copy of the policy, KV-cache decode) on
       `prompts` random prompts of `prompt_len` tokens, `new_tokens` tokens each at temperature 1, stop
       tokens off (no id is -1), so every row does the same work on any model;
    2. train: `episode_arrays` -> forward passes (the policy's log-probs and entropy, the frozen reference's
       log-probs, the value model's values) -> `ppo_advantages` and the sampler/trainer gap -> `cfg.epochs` x
       `cfg.minibatches` optimizer steps of the value model then the policy (AdamW on float32 masters) ->
       the new policy pushed to the sampler (a compute-dtype copy).

    The verifier scores are stand-ins: `verify_reward` or 0 per episode at random (seeded), since the figure
    is the cost of a step, not what it learns. The value model is the policy's decoder plus a fresh score head
    (value.init=policy). `__call__` runs one step and returns its phase times in seconds (generate_s,
    forward_s, update_s, push_s, step_s) and `new_tokens`, the response tokens generated."""

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        prompts: int,
        prompt_len: int,
        new_tokens: int,
        dtype: str = "bfloat16",
        remat: bool = False,
        attention_block: int = 0,
        logits_chunk: int = ModelConfig().logits_chunk,
        ppo=None,
        accum: int = 1,
        seed: int = 0,
    ):
        import jax

        from tulu_jax.config import OptimConfig, PPOConfig
        from tulu_jax.models.loading import build_model, init_params
        from tulu_jax.models.reward import RewardModel, init_reward_params
        from tulu_jax.sampling.sampler import LocalSampler
        from tulu_jax.sharding import make_mesh
        from tulu_jax.train import rlvr_step as rs
        from tulu_jax.train.episodes import SEQUENCE_KEYS, prompt_width
        from tulu_jax.train.optimizer import make_optimizer
        from tulu_jax.train.state import create_state, state_layout

        self.jax, self.cfg, self.seed = jax, ppo or PPOConfig(), seed
        self.prompts, self.prompt_len, self.new_tokens = prompts, prompt_len, new_tokens
        self.mesh = mesh = make_mesh(devices=jax.devices()[:1])
        kw = dict(dtype=dtype, param_dtype="float32", remat=remat, attention_block=attention_block)
        model, value_model = build_model(cfg, **kw), build_model(cfg, module=RewardModel, **kw)
        # A tiny learning rate keeps the weights (and hence the work) about the same over the timed steps.
        tx, schedule = make_optimizer(OptimConfig(lr=1e-7, warmup_ratio=0.0), 1_000_000)
        _, shardings = state_layout(model, tx, mesh)
        _, value_shardings = state_layout(value_model, tx, mesh)
        params = init_params(model, mesh, jax.random.key(seed))
        value_params = init_reward_params(value_model, mesh, jax.random.key(seed + 1))
        self.value = create_state(value_params, tx, seed, value_shardings)
        sampler_model = build_model(cfg, dtype=dtype, attention_block=attention_block)
        self.sampler = LocalSampler(sampler_model, params, mesh, eos_token_id=-1, pad_token_id=0)
        self.ref_params = self.sampler.snapshot(params)  # the frozen reference, in the compute dtype as the trainer's
        self.policy = create_state(params, tx, seed, shardings)
        self.shapes = rs.Shapes(width=prompt_width(prompt_len), temperature=1.0, logits_chunk=logits_chunk)
        self.seq_keys = SEQUENCE_KEYS
        self.policy_keys = ("old_logps", "advantages", "policy_mask", "tis_weights", *SEQUENCE_KEYS)
        self.value_keys = ("old_values", "returns", "value_mask", *SEQUENCE_KEYS)
        common = dict(tx=tx, shapes=self.shapes, cfg=self.cfg, accum=accum)
        self.logps_entropy_fn = rs.jit_forward(
            rs.response_logps_and_entropy, model, mesh, shardings.params, self.shapes
        )
        self.logps_fn = rs.jit_forward(rs.response_logps, model, mesh, shardings.params, self.shapes)
        self.values_fn = rs.jit_forward(rs.response_values, value_model, mesh, value_shardings.params, self.shapes)
        self.advantages_fn = jax.jit(lambda *a: rs.ppo_advantages(*a, cfg=self.cfg))
        self.gap_fn = jax.jit(lambda lp, sp, ent, m: rs.rollout_policy_stats(lp, sp, ent, m, self.cfg.tis_cap))
        self.policy_step = rs.jit_update(
            rs.policy_update, mesh, shardings, self.policy_keys, model=model, schedule=schedule, kl_in_loss=False,
            **common,
        )  # fmt: skip
        self.value_step = rs.jit_update(
            rs.value_update, mesh, value_shardings, self.value_keys, value_model=value_model, **common
        )
        rng = np.random.default_rng(seed)
        self.prompt_ids = rng.integers(3, cfg.vocab_size, (prompts, prompt_len)).tolist()
        self.scores = (rng.integers(0, 2, prompts) * self.cfg.verify_reward).astype(np.float32)
        self.steps_done, self.metrics = 0, None

    def _generate(self):
        from tulu_jax.rollout.types import SamplingParams
        from tulu_jax.train.episodes import episode_arrays

        sp = SamplingParams(max_tokens=self.new_tokens, temperature=1.0, seed=self.seed + self.steps_done)
        batch = self.sampler.generate_batch(self.prompt_ids, sp)
        return episode_arrays(batch, width=self.shapes.width, pad_token_id=0)

    def _forward(self, episodes):
        """The trainer's forward half: log-probs, values, advantages -> the update's batch (on device)."""
        from tulu_jax.train.batches import to_device

        seq = to_device(episodes, self.mesh, self.seq_keys)
        rows = to_device({k: episodes[k] for k in ("lengths", "stopped", "sampler_logps")}, self.mesh,
                         ("lengths", "stopped", "sampler_logps"))  # fmt: skip
        scores = to_device({"scores": self.scores}, self.mesh, ("scores",))["scores"]
        logps, entropy = self.logps_entropy_fn(self.policy.params, seq)
        ref_logps = self.logps_fn(self.ref_params, seq)
        values = self.values_fn(self.value.params, seq)
        arrays, stats = self.advantages_fn(logps, ref_logps, values, scores, rows["lengths"], rows["stopped"])
        tis_weights, _ = self.gap_fn(logps, rows["sampler_logps"], entropy, arrays["policy_mask"])
        batch = {**seq, **arrays, "old_logps": logps, "tis_weights": tis_weights}
        return self.jax.block_until_ready(batch)

    def _update(self, batch):
        """cfg.epochs passes of cfg.minibatches shuffled minibatches, the value step first (as the trainer)."""
        from tulu_jax import sharding as shd

        n, jax = self.prompts, self.jax
        size = n // self.cfg.minibatches
        row_sharding = shd.batch_sharding(self.mesh)
        for epoch in range(self.cfg.epochs):
            perm = np.random.default_rng([self.seed, self.steps_done, epoch]).permutation(n)
            for lo in range(0, n, size):
                mb = jax.device_put({k: v[perm[lo : lo + size]] for k, v in batch.items()}, row_sharding)
                self.value, vm = self.value_step(self.value, {k: mb[k] for k in self.value_keys})
                self.policy, pm = self.policy_step(self.policy, {k: mb[k] for k in self.policy_keys})
        self.metrics = jax.device_get({**vm, **pm})
        jax.block_until_ready(self.policy.params)

    def __call__(self) -> dict[str, float]:
        times, start = {}, time.perf_counter()
        episodes = self._generate()
        times["generate_s"] = time.perf_counter() - start
        t = time.perf_counter()
        batch = self._forward(episodes)
        times["forward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self._update(batch)
        times["update_s"] = time.perf_counter() - t
        t = time.perf_counter()
        self.steps_done += 1
        self.sampler.push_weights(self.policy.params, str(self.steps_done))
        self.jax.block_until_ready(self.sampler.params)
        times["push_s"] = time.perf_counter() - t
        times["step_s"] = time.perf_counter() - start
        times["new_tokens"] = float(episodes["lengths"].sum())
        return times

    def loss(self) -> float:
        """The last update's policy loss plus c1 x value loss (the trainer's `loss`)."""
        return float(self.metrics["loss/policy_avg"] + self.cfg.value_coef * self.metrics["loss/value_avg"])
