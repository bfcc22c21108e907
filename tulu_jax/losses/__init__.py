"""Pure loss functions: SFT next-token loss, preference losses (DPO family) and the reward-model loss."""

from tulu_jax.losses.logps import DEFAULT_LOGITS_CHUNK, chunked_token_logps, head_logits
from tulu_jax.losses.preference import (
    DEFAULT_BETA,
    PREFERENCE_LOSSES,
    PreferenceOutput,
    bradley_terry,
    dpo,
    dpo_norm,
    ipo,
    labelled_sums,
    preference_loss,
    sequence_logps,
    simpo,
    wpo,
)
from tulu_jax.losses.sft import (
    REDUCTIONS,
    cross_entropy_sums,
    reduce_sft,
    sft_loss,
    shift_for_next_token,
    token_logps,
)

__all__ = [
    "DEFAULT_LOGITS_CHUNK",
    "DEFAULT_BETA",
    "PREFERENCE_LOSSES",
    "REDUCTIONS",
    "PreferenceOutput",
    "bradley_terry",
    "chunked_token_logps",
    "cross_entropy_sums",
    "dpo",
    "dpo_norm",
    "head_logits",
    "ipo",
    "labelled_sums",
    "preference_loss",
    "reduce_sft",
    "sequence_logps",
    "sft_loss",
    "shift_for_next_token",
    "simpo",
    "token_logps",
    "wpo",
]
