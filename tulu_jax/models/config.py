"""Architecture description of the decoder family we support (Llama 3.x, Qwen2, OLMo 2).

`DecoderConfig` is independent of any file format; `from_hf_config` / `to_hf_config` translate to and
from a Hugging Face `config.json` so that an exported model loads in transformers and vLLM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "qwen2", "olmo2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    family: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    # Llama 3.1 frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None means plain RoPE.
    rope_scaling: dict[str, float] | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # OLMo 2: RMSNorm over the full q and k projections
    post_norm: bool = False  # OLMo 2: norms after attention/MLP instead of before
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        norms = 2 * d  # two RMSNorms per layer, before (Llama, Qwen2) or after (OLMo 2) the sublayers
        if self.qk_norm:
            norms += h * (self.num_heads + self.num_kv_heads)
        layer = attn + 3 * d * f + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included."""
        matmul_params = self.num_params - self.vocab_size * self.hidden_size * (0 if self.tie_embeddings else 1)
        attn = 2 * self.num_layers * seq_len * self.num_heads * self.head_dim  # QK^T and AV, causal half ignored
        return 6.0 * matmul_params + 6.0 * attn


_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "olmo2": "Olmo2ForCausalLM"}


def from_hf_config(hf: dict[str, Any]) -> DecoderConfig:
    """Builds a DecoderConfig from the dict of a Hugging Face `config.json`."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json model_type={family!r} is not supported; expected one of {FAMILIES}")
    heads = hf["num_attention_heads"]
    rope_scaling = hf.get("rope_scaling")
    rope_params = hf.get("rope_parameters")  # transformers 5 moves rope settings here
    rope_theta = hf.get("rope_theta")
    if isinstance(rope_params, dict):
        rope_theta = rope_params.get("rope_theta", rope_theta)
        if rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind == "default":
            rope_scaling = None
        elif kind != "llama3":
            raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
        else:
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            rope_scaling = {k: float(rope_scaling[k]) for k in keys}
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    return DecoderConfig(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family != "llama")),
        qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        qk_norm=family == "olmo2",
        post_norm=family == "olmo2",
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def to_hf_config(cfg: DecoderConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict that transformers and vLLM read for this architecture."""
    out: dict[str, Any] = {
        "architectures": [_HF_ARCH[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.qkv_bias if cfg.family != "qwen2" else True,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    if cfg.family == "llama":
        out["mlp_bias"] = False
    if cfg.family == "qwen2":
        out["use_sliding_window"] = False
    return out


def _arch(vocab, hidden, mlp, layers, heads, kv_heads, head_dim=64, rope_theta=10000.0, **extra) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers, num_heads=heads,
                num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=rope_theta, **extra)  # fmt: skip


_LLAMA31 = dict(  # Llama 3.1 8B/70B (vocab 128,264 after Tülu's <pad> and padding to a multiple of 8)
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192.0),
)

# Architectures built from scratch (random init): the embedded default, benchmark sizes, and full-size
# shapes for compile-only checks. Columns: vocab, hidden, MLP width, layers, heads, KV heads.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: ~3.7M parameters; head_dim 64 because vLLM's CPU attention needs it.
    "tiny": _arch(1024, 256, 768, 4, 4, 2, tie_embeddings=False, max_position_embeddings=2048),
    "bench-15m": _arch(32000, 256, 1024, 4, 4, 4),
    "bench-40m": _arch(32000, 512, 1536, 6, 8, 4),
    "bench-100m": _arch(32000, 768, 2048, 10, 12, 4),
    "bench-1b": _arch(128256, 2048, 8192, 16, 32, 8, rope_theta=500000.0, tie_embeddings=True),
    "llama3.1-8b": _arch(128264, 4096, 14336, 32, 32, 8, **_LLAMA31),
    "llama3.1-70b": _arch(128264, 8192, 28672, 80, 64, 8, **_LLAMA31),
}


def preset(name: str, **overrides) -> DecoderConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return DecoderConfig(**{**PRESETS[name], **overrides})
