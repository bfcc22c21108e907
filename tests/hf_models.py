"""Tiny random Hugging Face models (PyTorch, float32) of each supported family, saved with a tokenizer, and the
float32 / bfloat16 error bounds the comparisons against them use."""

from __future__ import annotations

import numpy as np
import torch
import transformers as T

from tulu_jax.data import load_tokenizer

COMMON = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)

FAMILIES = {
    # Llama 3.1 frequency scaling with a short original context, so the scaled band is exercised.
    "llama": (
        T.LlamaConfig,
        T.LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            tie_word_embeddings=False,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(rope_theta=10000.0, tie_word_embeddings=True)),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(rope_theta=10000.0, tie_word_embeddings=False)),
}


EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: float32's relative rounding step
U_BF16 = 2.0**-8  # bfloat16's unit roundoff: 8 significant bits


def model_reductions(seq_len: int, c: dict = COMMON) -> int:
    """Sum of the reduction lengths one value goes through in the decoder `c` (a config.json dict; default the
    tiny one): per layer the projections (D),
    the MLP down projection (F), the attention scores (H) and the attention-weighted sum (T), then the LM head
    (D). Rounding in a length-n float32 sum changes it by at most ~n*eps relative to its terms' scale."""
    d, f = c["hidden_size"], c["intermediate_size"]
    h = c.get("head_dim") or d // c["num_attention_heads"]
    return c["num_hidden_layers"] * (d + f + h + seq_len) + d


def f32_atol(scale: float, reductions: int) -> float:
    """Bound on |a - b| for two float32 evaluations of the same values of magnitude `scale` that differ only
    in summation order (another library, CPU kernel or blocking): eps * (summed reduction lengths) * scale,
    the worst-case error of sequential summation (Higham, Accuracy and Stability, §4.2)."""
    return EPS32 * reductions * scale


def make_hf_model(family: str, out_dir: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random transformers *ForCausalLM of `family` (config `COMMON` + the family's extras +
    `overrides`), saved with the bundled tokenizer at `out_dir`; returns the float32 model in eval mode."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    with torch.no_grad():  # move norms and biases off their init values so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    load_tokenizer(None).save_pretrained(out_dir)
    return model
