"""Pure loss functions (SFT now; DPO and RLVR losses join here)."""

from tulu_jax.losses.sft import (
    REDUCTIONS,
    cross_entropy_sums,
    reduce_sft,
    sft_loss,
    shift_for_next_token,
    token_logprobs,
)

__all__ = [
    "REDUCTIONS",
    "cross_entropy_sums",
    "reduce_sft",
    "sft_loss",
    "shift_for_next_token",
    "token_logprobs",
]
