"""`tulu-jax score`: per-token log-probabilities of a text under a checkpoint (sanity and parity check)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tulu_jax.data import load_tokenizer
from tulu_jax.losses import token_logps
from tulu_jax.models import hf
from tulu_jax.models.loading import build_model, load_params
from tulu_jax.sharding import make_mesh


def score_text(model_dir: str, text: str, *, dtype: str = "float32", add_special_tokens: bool = True) -> dict:
    """Scores `text` under the Hugging Face folder `model_dir`, computing in `dtype`, on one device.

    -> {"model", "token_ids": list of int, "tokens": list of str, "logprobs": [None, log p(token_t |
    tokens_<t) for t >= 1] (natural log, float32 precision; the first token has no context), "sum_logprob"}.
    The key names are the output format of `tulu-jax score`. Raises FileNotFoundError when the folder has
    no config.json or weights, ValueError when the text tokenizes to nothing."""
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    if len(ids) < 1:
        raise ValueError("the text tokenizes to no tokens")
    cfg = hf.load_hf_config(model_dir)
    model = build_model(cfg, dtype=dtype)
    params = load_params(model_dir, model, make_mesh(devices=jax.devices()[:1]))
    ids_1xT = jnp.asarray([ids], jnp.int32)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids_1xT)
    logp = np.asarray(token_logps(logits[:, :-1], ids_1xT[:, 1:]))[0]
    return {
        "model": model_dir,
        "token_ids": list(map(int, ids)),
        "tokens": tokenizer.convert_ids_to_tokens(ids),
        "logprobs": [None] + [float(x) for x in logp],
        "sum_logprob": float(logp.sum()),
    }
