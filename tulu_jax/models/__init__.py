"""The decoder (Llama 3.x, Qwen2, OLMo 2), its configs and Hugging Face interop."""

from tulu_jax.models.config import DecoderConfig, from_hf_config, preset, to_hf_config
from tulu_jax.models.decoder import Decoder
from tulu_jax.models.hf import export_hf, load_hf_config
from tulu_jax.models.loading import build_model, init_params, load_params, param_layout

__all__ = [
    "Decoder",
    "DecoderConfig",
    "build_model",
    "export_hf",
    "from_hf_config",
    "init_params",
    "load_hf_config",
    "load_params",
    "param_layout",
    "preset",
    "to_hf_config",
]
