"""Architecture description of the decoder family we support (Llama 3.x, Qwen2, OLMo 2).

`DecoderConfig` is independent of any file format; `from_hf_config` / `to_hf_config` translate to and
from a Hugging Face `config.json` so that an exported model loads in transformers and vLLM.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from tulu_jax.configlib import ConfigError

FAMILIES = ("llama", "qwen2", "olmo2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """The decoder's architecture (sizes, RoPE, norms, biases, tying, special token ids), as transformers'
    LlamaConfig / Qwen2Config / Olmo2Config describe it. Raises ConfigError for an unknown family or a
    query-head count that is not a multiple of the KV-head count."""

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
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2; Llama/OLMo 2 with attention_bias)
    o_bias: bool = False  # a bias on the output projection (Llama/OLMo 2 with attention_bias)
    qk_norm: bool = False  # OLMo 2: RMSNorm over the full q and k projections
    post_norm: bool = False  # OLMo 2: norms after attention/MLP instead of before
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once), the same as transformers' model.num_parameters()."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
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

# What transformers (5.x: LlamaConfig, Qwen2Config, Olmo2Config) assumes for a key that config.json leaves
# out. A missing key must mean the same model to us as to transformers; tests/test_hf_faults.py checks this
# table against the installed classes. num_key_value_heads None: as many as the query heads.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        num_key_value_heads=None,
        attention_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
    "qwen2": dict(
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=32768,
        num_key_value_heads=32,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        max_window_layers=28,
        sliding_window=4096,
    ),
    "olmo2": dict(
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        num_key_value_heads=None,
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=50279,
        pad_token_id=1,
    ),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _refuse(source: str, key: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {key}={value!r} is not supported ({why})")


def _rope(hf: dict[str, Any], source: str, default_theta: float) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, Llama 3.1 scaling or None) read as transformers 5 reads them: a non-empty `rope_scaling`
    (transformers 4's key) wins over `rope_parameters`; rope_theta and partial_rotary_factor come from that
    dict, else from the top level. RoPE variants other than plain and 'llama3', or a partial rotation, are
    refused."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key)
    if rope is not None and not isinstance(rope, dict):
        _refuse(source, key, rope, "expected a JSON object")
    rope = rope or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", default_theta)))
    if "partial_rotary_factor" in rope:
        _require(source, f"{key}.partial_rotary_factor", rope["partial_rotary_factor"], 1.0, "full-head RoPE only")
    else:
        _require(source, "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0), 1.0, "full-head RoPE only")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        _refuse(source, key + ".rope_type", kind, "only 'default' and 'llama3' RoPE are implemented")
    missing = [k for k in _LLAMA3_ROPE if k not in rope]
    if missing:
        raise ConfigError(f"{source}: {key} of rope_type 'llama3' lacks {', '.join(missing)}")
    return theta, {k: float(rope[k]) for k in _LLAMA3_ROPE}


def _require(source: str, key: str, value: Any, supported: Any, why: str) -> None:
    if value != supported:
        _refuse(source, key, value, why)


def _check_layers(hf: dict[str, Any], family: str, source: str, layers: int) -> None:
    """Refuses the settings transformers would honour but our decoder does not implement."""
    _require(source, "hidden_act", hf.get("hidden_act", "silu"), "silu", "the MLP is SwiGLU with 'silu'")
    _require(source, "attention_dropout", hf.get("attention_dropout", 0.0), 0.0, "no attention dropout")
    if family == "llama":  # Qwen2 and OLMo 2 have no MLP biases whatever the key says
        _require(source, "mlp_bias", hf.get("mlp_bias", False), False, "MLP biases are not implemented")
    if family == "qwen2":  # Qwen2Config: sliding layers are those >= max_window_layers when switched on
        kinds = hf.get("layer_types")
        if kinds is not None:
            sliding = [i for i, k in enumerate(kinds) if k != "full_attention"]
            if sliding:
                _refuse(source, f"layer_types[{sliding[0]}]", kinds[sliding[0]], "only full attention")
        elif hf.get("use_sliding_window", False):
            d = HF_DEFAULTS["qwen2"]
            window = hf.get("sliding_window", d["sliding_window"])
            if window is not None and hf.get("max_window_layers", d["max_window_layers"]) < layers:
                _refuse(source, "use_sliding_window", True, "sliding-window attention is not implemented")


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> DecoderConfig:
    """Builds a DecoderConfig from the dict of a Hugging Face `config.json` (`source` names the file in errors).

    Keys config.json leaves out take transformers' defaults for that model_type (`HF_DEFAULTS`). Raises
    ConfigError, naming `source` and the key, for a missing architecture key, an unknown model_type, or a
    setting transformers would apply that this decoder does not implement (activation, MLP bias, attention
    dropout, sliding windows, RoPE variants other than plain and Llama 3.1)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        _refuse(source, "model_type", family, f"expected one of {FAMILIES}")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
    d = HF_DEFAULTS[family]
    get = lambda key: hf.get(key, d.get(key))
    heads = hf["num_attention_heads"]
    _check_layers(hf, family, source, hf["num_hidden_layers"])
    rope_theta, rope_scaling = _rope(hf, source, d["rope_theta"])
    # Llama and OLMo 2: attention_bias puts biases on q, k, v and o. Qwen2 always biases q, k, v (never o)
    # and ignores the key.
    bias = bool(get("attention_bias")) if family != "qwen2" else None
    eos = get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    try:  # DecoderConfig checks the head counts
        return DecoderConfig(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(get("rms_norm_eps")),
            tie_embeddings=bool(get("tie_word_embeddings")),
            qkv_bias=True if bias is None else bias,
            o_bias=False if bias is None else bias,
            qk_norm=family == "olmo2",
            post_norm=family == "olmo2",
            max_position_embeddings=get("max_position_embeddings"),
            bos_token_id=get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=get("pad_token_id"),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_hf_config(cfg: DecoderConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` dict that transformers and vLLM read for this architecture.

    Raises ConfigError for bias layouts the family's config cannot express (transformers' Llama and OLMo 2
    bias q, k, v and o together or not at all; Qwen2 always biases q, k, v and never o)."""
    qwen2 = cfg.family == "qwen2"
    if (qwen2 and (not cfg.qkv_bias or cfg.o_bias)) or (not qwen2 and cfg.qkv_bias != cfg.o_bias):
        raise ConfigError(
            f"model family {cfg.family!r} cannot be exported with qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}"
        )
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
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    if not qwen2:
        out["attention_bias"] = cfg.o_bias
    if cfg.family == "llama":
        out["mlp_bias"] = False
    if qwen2:
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
    """A DecoderConfig from `PRESETS[name]` with `overrides` applied; ValueError for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return DecoderConfig(**{**PRESETS[name], **overrides})
