"""Tiny random Hugging Face models (PyTorch, float32) of each supported family, saved with a tokenizer."""

from __future__ import annotations

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


def make_hf_model(family: str, out_dir: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    with torch.no_grad():  # move norms and biases off their init values so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    load_tokenizer(None).save_pretrained(out_dir)
    return model
