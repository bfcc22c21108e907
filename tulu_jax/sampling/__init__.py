"""The in-process sampler: sampling math (`ops`), prefill and decode (`generate`), and `LocalSampler`."""

from tulu_jax.sampling.generate import decode, prefill, prompt_positions
from tulu_jax.sampling.ops import chosen_logps, filter_logits, processed_logits, sample_tokens
from tulu_jax.sampling.sampler import LocalSampler, derived_seed, prompt_bucket

__all__ = [
    "LocalSampler",
    "chosen_logps",
    "decode",
    "derived_seed",
    "filter_logits",
    "prefill",
    "processed_logits",
    "prompt_bucket",
    "prompt_positions",
    "sample_tokens",
]
