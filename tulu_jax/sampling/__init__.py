"""The in-process sampler: sampling math (`ops`), prefill and decode (`generate`), and `LocalSampler`."""

from tulu_jax.sampling.generate import decode, prefill, prompt_positions
from tulu_jax.sampling.ops import chosen_logprobs, filter_logits, processed_logits, sample_tokens
from tulu_jax.sampling.sampler import LocalSampler, prompt_bucket, time_decode

__all__ = [
    "LocalSampler",
    "chosen_logprobs",
    "decode",
    "filter_logits",
    "prefill",
    "processed_logits",
    "prompt_bucket",
    "prompt_positions",
    "sample_tokens",
    "time_decode",
]
