"""Reward model: the decoder's final hidden states through a scalar `score` head, as open-instruct's
`reward_modeling.py` trains it (an AutoModelForSequenceClassification with one label; Tülu 3 uses such a model
to compare PPO with RLVR, Lambert et al. 2024, §6).

The head is applied at every position, so the same module serves as PPO's value model (per-token values,
open-instruct `ppo_vllm_thread_ray_gtrl.py`); a reward model reads the score where transformers'
*ForSequenceClassification does (`last_token_scores`). The parameter tree is
`{"model": <Decoder params, no lm_head>, "score": [D, 1]}`, which maps name for name onto Hugging Face's
*ForSequenceClassification (`model.*` and `score.weight`, no bias, no lm_head).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tulu_jax.models import hf
from tulu_jax.models.config import DecoderConfig
from tulu_jax.models.decoder import Decoder, _param
from tulu_jax.models.hf import export_reward_hf, reward_pad_token_id
from tulu_jax.models.loading import abstract_dtype, build_model, init_param_subtree, init_params, param_layout

__all__ = [
    "RewardModel",
    "build_reward_model",
    "export_reward_hf",
    "init_reward_params",
    "last_token_scores",
    "load_reward_params",
    "reward_pad_token_id",
    "reward_param_layout",
    "score_init",
]


def score_init(hidden_size: int):
    """Normal with std 1/sqrt(H+1), as open-instruct initialises the reward head."""
    return nn.initializers.normal(stddev=1.0 / math.sqrt(hidden_size + 1))


class RewardModel(nn.Module):
    """`apply({"params": p}, input_ids, positions, segment_ids)` -> float32 scores [B, T], one per token."""

    cfg: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_unroll: int = 1
    attention_block: int = 0

    @nn.compact
    def __call__(self, input_ids_BxT, positions_BxT=None, segment_ids_BxT=None):
        decoder = Decoder(
            self.cfg,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            scan_unroll=self.scan_unroll,
            attention_block=self.attention_block,
            name="model",
        )
        # output="hidden" never touches the LM head, so an untied model's lm_head is not created here.
        x_BxTxD = decoder(input_ids_BxT, positions_BxT, segment_ids_BxT, output="hidden")
        d = self.cfg.hidden_size
        w_Dx1 = _param(self, "score", (d, 1), ("embed", None), self.param_dtype, score_init(d))
        scores_BxTx1 = jnp.einsum("btd,do->bto", x_BxTxD, w_Dx1.astype(self.dtype), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(scores_BxTx1[..., 0], ("batch", "length"))


def last_token_scores(scores_BxT, input_ids_BxT, segment_ids_BxT, pad_token_id: int):
    """Float32 [B]: each row's score at its last position whose token is not `pad_token_id` (and is not
    padding, segment_ids > 0); a row with no such position reads position 0.

    This is transformers' rule for *ForSequenceClassification (the last index where input_ids !=
    config.pad_token_id), so with the `pad_token_id` the export writes (`reward_pad_token_id`) the exported
    model scores a right-padded batch exactly as training did. When the pad token is also the EOS token (as
    for SmolLM2), the score is read at the token before a trailing EOS. scores_BxT: float [B, T];
    input_ids_BxT, segment_ids_BxT: int [B, T]; rows hold one sequence each."""
    t = scores_BxT.shape[1]
    real_BxT = (input_ids_BxT != pad_token_id) & (segment_ids_BxT > 0)
    last_B = jnp.max(jnp.where(real_BxT, jnp.arange(t), 0), axis=1)
    return jnp.take_along_axis(scores_BxT, last_B[:, None], axis=1)[:, 0].astype(jnp.float32)


def build_reward_model(
    cfg: DecoderConfig,
    *,
    dtype="float32",
    param_dtype="float32",
    remat=False,
    scan_unroll: int = 1,
    attention_block: int = 0,
) -> RewardModel:
    """A RewardModel for `cfg` with dtypes given by name ('float32', 'bfloat16', 'float16', or 'auto':
    bfloat16 on accelerators, float32 on the CPU); see `loading.build_model` for the other arguments."""
    return build_model(
        cfg,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        scan_unroll=scan_unroll,
        attention_block=attention_block,
        module=RewardModel,
    )


def reward_param_layout(model: RewardModel, mesh: Mesh):
    """(abstract params, their NamedShardings) of the reward model, nothing allocated."""
    return param_layout(model, mesh)


def init_reward_params(model: RewardModel, mesh: Mesh, rng):
    """Random reward-model parameters, each created directly on its shards."""
    return init_params(model, mesh, rng)


def load_reward_params(model_dir: str, model: RewardModel, mesh: Mesh, rng=None):
    """Parameters from a Hugging Face folder, placed directly on their shards.

    A *ForSequenceClassification folder (it has `score.weight`) loads whole. A causal-LM folder (an SFT
    export) gives the decoder, its lm_head is deliberately skipped (any other unused tensor is an error, see
    `hf.load_hf_params`), and the score head is initialised fresh from `rng`
    (the same head `init_reward_params(model, mesh, rng)` would give)."""
    abstract, shardings = reward_param_layout(model, mesh)
    dtype = abstract_dtype(abstract)
    if hf.checkpoint_has(model_dir, hf.SCORE_NAME):
        rules = hf.reward_param_rules(model.cfg)
        return hf.load_hf_params(model_dir, model.cfg, abstract, shardings, dtype=dtype, rules=rules)
    rules = hf.decoder_body_rules(model.cfg)
    decoder = hf.load_hf_params(
        model_dir, model.cfg, abstract["model"], shardings["model"], dtype=dtype, rules=rules, ignore={hf.LM_HEAD}
    )
    rng = jax.random.key(0) if rng is None else rng
    return {"model": decoder, "score": init_param_subtree(model, mesh, rng, "score")}
