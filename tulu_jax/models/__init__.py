"""The decoder (Llama 3.x, Qwen2, OLMo 2), the reward/value model on top of it, configs and Hugging Face interop."""

from tulu_jax.models.config import DecoderConfig, from_hf_config, preset, to_hf_config
from tulu_jax.models.decoder import Decoder
from tulu_jax.models.hf import export_hf, export_reward_hf, load_hf_config
from tulu_jax.models.loading import build_model, init_params, load_params, param_layout
from tulu_jax.models.reward import (
    RewardModel,
    build_reward_model,
    init_reward_params,
    last_token_scores,
    load_reward_params,
    reward_pad_token_id,
    reward_param_layout,
)

__all__ = [
    "Decoder",
    "DecoderConfig",
    "RewardModel",
    "build_model",
    "build_reward_model",
    "export_hf",
    "export_reward_hf",
    "from_hf_config",
    "init_params",
    "init_reward_params",
    "last_token_scores",
    "load_hf_config",
    "load_params",
    "load_reward_params",
    "param_layout",
    "preset",
    "reward_pad_token_id",
    "reward_param_layout",
    "to_hf_config",
]
