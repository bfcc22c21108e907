"""One decoder for Llama 3.x, Qwen2 and OLMo 2, as a functional Flax (Linen) module.

Dimension legend used in names: B batch, T query time, S key time, D hidden, N query heads,
K key/value heads, G query heads per KV head (N = K*G), H head dim, F MLP width, V vocab, L layers.

Parameters are float32 (`param_dtype`) and cast to `dtype` for compute; logits come back in float32.
Layers are stacked on a leading `layers` axis and run with `nn.scan`, which keeps compile time flat in
depth (`scan_unroll` trades some of that back for speed); `remat=True` rematerialises each layer in the
backward pass. Packing: `segment_ids` stop
documents from attending to each other (0 = padding) and `positions` restart at each document.

Generation passes a `KVCache` (`cache=`): a multi-token call is the prefill of an empty cache, a one-token
call a decode step that attends to every valid slot; both return `(output, updated cache)`.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tulu_jax.models.config import DecoderConfig

_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape, names, dtype, init=_init):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def rope_inv_freq(cfg: DecoderConfig) -> jnp.ndarray:
    """Inverse RoPE frequencies [H/2], with Llama 3.1's wavelength-dependent scaling when configured."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    old_len = s["original_max_position_embeddings"]
    low_wavelen = old_len / s["low_freq_factor"]
    high_wavelen = old_len / s["high_freq_factor"]
    wavelen = 2 * jnp.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = jnp.where(wavelen > low_wavelen, inv / s["factor"], inv)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxTxNxH, positions_BxT, inv_freq):
    """Rotate-half RoPE (the Hugging Face convention: first and second halves of each head pair up)."""
    angles = positions_BxT[..., None].astype(jnp.float32) * inv_freq  # BxTx(H/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, computed in float32, returned as `dtype` (as
    transformers' LlamaRMSNorm). Parameter `scale` [D], initialised to ones."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), self.param_dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


@flax.struct.dataclass
class KVCache:
    """Keys (after RoPE) and values of every layer for B sequences, S slots each.

    A call writes its T tokens at slots [index, index + T) of every row alike, so a left-padded batch
    keeps its pads in the cache; `valid` marks the slots that hold real tokens and is the decode mask.
    """

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # int32 []: the next slot to write

    @classmethod
    def empty(cls, cfg: DecoderConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
        """A zeroed cache of `length` slots for `batch` rows, keys/values in `dtype`, no slot valid."""
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @staticmethod
    def logical_axes() -> KVCache:
        """Logical axis names of each field: rows shard like the batch, KV heads like the attention."""
        kv = PartitionSpec("layers", "batch", "length", "act_kv_heads", "head_dim")
        return KVCache(k=kv, v=kv, valid=PartitionSpec("batch", "length"), index=PartitionSpec())

    def constrain(self) -> KVCache:
        """The same cache with its fields pinned to `logical_axes()` inside a jit with logical axis rules."""
        axes = KVCache.logical_axes()
        return KVCache(
            k=nn.with_logical_constraint(self.k, axes.k),
            v=nn.with_logical_constraint(self.v, axes.v),
            valid=nn.with_logical_constraint(self.valid, axes.valid),
            index=self.index,
        )


def attention_mask(segment_ids_BxT):
    """Causal and same-document mask [B, 1, T, S]."""
    t = segment_ids_BxT.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_doc = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (causal[None] & same_doc)[:, None]


def dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS):
    """Grouped-query softmax attention: each of the K key/value heads serves G = N/K query heads. Scores and
    softmax in float32 (scaled by 1/sqrt(H), masked entries at float32's minimum), the weighted sum in v's
    dtype. -> [B, T, N, H]."""
    b, t, n, h = q_BxTxNxH.shape
    k_heads = k_BxSxKxH.shape[2]
    q = q_BxTxNxH.reshape(b, t, k_heads, n // k_heads, h)
    scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH, preferred_element_type=jnp.float32)
    scores_BxKxGxTxS = scores_BxKxGxTxS * (h**-0.5)
    scores_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, block: int):
    """Causal, document-masked attention. With `block` > 0, queries go in blocks of `block` that only see
    the keys up to their own block: the masked upper triangle is never computed (about half the scores,
    and the softmax work with them, at long lengths)."""
    t = q_BxTxNxH.shape[1]
    if block <= 0 or t <= block or t % block:
        return dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, attention_mask(segment_ids_BxT))
    outs = []
    for lo in range(0, t, block):
        hi = lo + block
        causal = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]
        same_doc = segment_ids_BxT[:, lo:hi, None] == segment_ids_BxT[:, None, :hi]
        outs.append(
            dot_product_attention(
                q_BxTxNxH[:, lo:hi], k_BxTxKxH[:, :hi], v_BxTxKxH[:, :hi], (causal[None] & same_doc)[:, None]
            )
        )
    return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
    """Self-attention of one layer: q/k/v projections (optional biases, OLMo 2's q/k RMSNorm), RoPE, causal
    document-masked attention (or a KV-cache step) and the output projection (optional bias), as
    transformers' LlamaAttention / Qwen2Attention / Olmo2Attention. Kernels are [D, heads, H] and [N, H, D]."""

    cfg: DecoderConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    block: int = 0

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache=None, layer=None):
        """-> (output [B, T, D], the cache with this layer's keys and values written, or None)."""
        cfg, dt = self.cfg, self.dtype
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def proj(name, heads, head_axis):
            w_DxNxH = _param(self, f"{name}_kernel", (d, heads, h), ("embed", head_axis, "head_dim"), self.param_dtype)
            y = jnp.einsum("btd,dnh->btnh", x_BxTxD, w_DxNxH.astype(dt))
            if cfg.qkv_bias:
                y = y + _param(
                    self, f"{name}_bias", (heads, h), (head_axis, "head_dim"), self.param_dtype, nn.initializers.zeros
                ).astype(dt)
            return y

        q_BxTxNxH = proj("q", n, "heads")
        k_BxTxKxH = proj("k", k, "kv_heads")
        v_BxTxKxH = proj("v", k, "kv_heads")
        if cfg.qk_norm:  # OLMo 2 normalises across all heads at once, before the head split
            b, t = x_BxTxD.shape[:2]
            q_BxTxNxH = RMSNorm(cfg.rms_norm_eps, dt, self.param_dtype, name="q_norm")(
                q_BxTxNxH.reshape(b, t, n * h)
            ).reshape(b, t, n, h)
            k_BxTxKxH = RMSNorm(cfg.rms_norm_eps, dt, self.param_dtype, name="k_norm")(
                k_BxTxKxH.reshape(b, t, k * h)
            ).reshape(b, t, k, h)
        inv_freq = rope_inv_freq(cfg)
        q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, inv_freq)
        k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq)
        q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("batch", "length", "act_heads", None))
        k_BxTxKxH = nn.with_logical_constraint(k_BxTxKxH, ("batch", "length", "act_kv_heads", None))
        v_BxTxKxH = nn.with_logical_constraint(v_BxTxKxH, ("batch", "length", "act_kv_heads", None))
        t = x_BxTxD.shape[1]
        if cache is not None:
            at = (layer, 0, cache.index, 0, 0)
            cache = cache.replace(
                k=jax.lax.dynamic_update_slice(cache.k, k_BxTxKxH[None].astype(cache.k.dtype), at),
                v=jax.lax.dynamic_update_slice(cache.v, v_BxTxKxH[None].astype(cache.v.dtype), at),
            )
        if cache is None or t > 1:  # training, or a prefill: the chunk only sees itself
            out_BxTxNxH = causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, self.block)
        else:  # one decode step sees every valid slot so far (its own included)
            k_BxSxKxH = jax.lax.dynamic_index_in_dim(cache.k, layer, keepdims=False).astype(dt)
            v_BxSxKxH = jax.lax.dynamic_index_in_dim(cache.v, layer, keepdims=False).astype(dt)
            out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, cache.valid[:, None, None, :])
        w_NxHxD = _param(self, "o_kernel", (n, h, d), ("heads", "head_dim", "embed"), self.param_dtype)
        out_BxTxD = jnp.einsum("btnh,nhd->btd", out_BxTxNxH, w_NxHxD.astype(dt))
        if cfg.o_bias:  # Llama / OLMo 2 with attention_bias: o_proj has a bias too
            out_BxTxD = out_BxTxD + _param(
                self, "o_bias", (d,), ("embed",), self.param_dtype, nn.initializers.zeros
            ).astype(dt)
        return out_BxTxD, cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(x @ gate) * (x @ up)), kernels [D, F], [D, F], [F, D], no biases."""

    cfg: DecoderConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BxTxD):
        d, f, dt = self.cfg.hidden_size, self.cfg.intermediate_size, self.dtype
        gate_DxF = _param(self, "gate_kernel", (d, f), ("embed", "mlp"), self.param_dtype)
        up_DxF = _param(self, "up_kernel", (d, f), ("embed", "mlp"), self.param_dtype)
        down_FxD = _param(self, "down_kernel", (f, d), ("mlp", "embed"), self.param_dtype)
        g_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, gate_DxF.astype(dt))
        u_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, up_DxF.astype(dt))
        a_BxTxF = nn.with_logical_constraint(jax.nn.silu(g_BxTxF) * u_BxTxF, ("batch", "length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", a_BxTxF, down_FxD.astype(dt))


class Block(nn.Module):
    """One decoder layer; a scan body, so it takes and returns the hidden state as a carry. With a KV cache
    the carry is (hidden, cache, layer index), so the stacked cache is updated in place layer by layer."""

    cfg: DecoderConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_block: int = 0

    @nn.compact
    def __call__(self, carry, positions_BxT, segment_ids_BxT):
        cfg, dt, pdt = self.cfg, self.dtype, self.param_dtype
        x_BxTxD, cache, layer = carry if isinstance(carry, tuple) else (carry, None, None)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dt, pdt, name=name)
        attn = Attention(cfg, dt, pdt, self.attention_block, name="self_attn")
        mlp = MLP(cfg, dt, pdt, name="mlp")
        if cfg.post_norm:  # OLMo 2
            a, cache = attn(x_BxTxD, positions_BxT, segment_ids_BxT, cache, layer)
            h = x_BxTxD + norm("post_attention_layernorm")(a)
            out = h + norm("post_feedforward_layernorm")(mlp(h))
        else:  # Llama, Qwen2
            a, cache = attn(norm("input_layernorm")(x_BxTxD), positions_BxT, segment_ids_BxT, cache, layer)
            h = x_BxTxD + a
            out = h + mlp(norm("post_attention_layernorm")(h))
        out = nn.with_logical_constraint(out, ("batch", "length", "act_embed"))
        if cache is None:
            return out, None
        return (out, cache, layer + 1), None


class Decoder(nn.Module):
    """`apply({"params": p}, input_ids, positions, segment_ids)` -> float32 logits [B, T, V].

    With `output="hidden"` it returns the final-normed hidden states [B, T, D] instead (value and
    reward heads read those); `output="last_logits"` only the last position's logits [B, 1, V].
    With `cache=KVCache(...)` it returns `(output, cache)`: T > 1 tokens prefill an empty cache, one
    token is a decode step at slot `cache.index`. `segment_ids` then only mark pads (0) versus tokens.
    """

    cfg: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_unroll: int = 1  # layers per scan iteration; num_layers unrolls fully (faster on CPU, slower compile)
    attention_block: int = 0  # > 0: causal attention in query blocks that skip the masked triangle

    @nn.compact
    def __call__(self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None, output: str = "logits", cache=None):
        cfg, dt = self.cfg, self.dtype
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(input_ids_BxT)
        embed_VxD = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("embed_vocab", "embed"), self.param_dtype)
        x_BxTxD = jnp.take(embed_VxD, input_ids_BxT, axis=0).astype(dt)
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "act_embed"))

        block = Block
        if self.remat:
            block = nn.remat(Block, prevent_cse=False, policy=jax.checkpoint_policies.nothing_saveable)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
            unroll=min(self.scan_unroll, cfg.num_layers),
        )
        stack = layers(cfg, dt, self.param_dtype, self.attention_block, name="layers")
        if cache is None:
            x_BxTxD, _ = stack(x_BxTxD, positions_BxT, segment_ids_BxT)
        else:
            # The new slots' validity first: a decode step attends to its own slot.
            t = input_ids_BxT.shape[1]
            valid = jax.lax.dynamic_update_slice(cache.valid, segment_ids_BxT != 0, (0, cache.index))
            cache = cache.replace(valid=valid).constrain()
            (x_BxTxD, cache, _), _ = stack((x_BxTxD, cache, jnp.zeros((), jnp.int32)), positions_BxT, segment_ids_BxT)
            cache = cache.replace(index=cache.index + t).constrain()
        if output not in ("logits", "hidden", "last_logits"):
            raise ValueError(f"output={output!r}; expected 'logits', 'hidden' or 'last_logits'")
        if output == "last_logits":  # generation only needs the next token's distribution
            x_BxTxD = x_BxTxD[:, -1:]
        x_BxTxD = RMSNorm(cfg.rms_norm_eps, dt, self.param_dtype, name="final_norm")(x_BxTxD)
        if output == "hidden":
            return x_BxTxD if cache is None else (x_BxTxD, cache)
        if cfg.tie_embeddings:
            head_DxV = embed_VxD.T
        else:
            head_DxV = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), self.param_dtype)
        logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, head_DxV.astype(dt), preferred_element_type=jnp.float32)
        logits_BxTxV = nn.with_logical_constraint(logits_BxTxV, ("batch", "length", "act_vocab"))
        return logits_BxTxV if cache is None else (logits_BxTxV, cache)
