"""Synthetic preference pairs (Tülu 3 §5.2; open-instruct `scripts/synth_pref/`): the model pool config, which
models answer each prompt (the annotation mix), and how judged completions become one (chosen, rejected) pair.
Pure: no I/O besides reading the pool YAML.

Per prompt, off-policy: completions from `off_policy_models` distinct models of the pool (all when fewer);
on-policy: one completion from the model being trained (`on_policy: true`) plus one from another model. Every
completion is rated 1-5 on the four aspects of `tulu_jax.curation.judge` (UltraFeedback, Cui et al. 2023);
the pair takes the best mean rating as chosen and, unlike the reference (which allows ties and averages a
failed rating in as -1), a completion with a strictly lower mean as rejected, among rated completions only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tulu_jax.configlib import ConfigError, load_config
from tulu_jax.data.chat import DataError


@dataclass(frozen=True, kw_only=True)
class PoolSampling:
    """Sampling of a pool model's completions. The reference samples at temperature 1, top-p 1."""

    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (>= 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass, in (0, 1]"})
    max_tokens: int = field(default=2048, metadata={"help": "new tokens per completion (>= 1)"})

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True, kw_only=True)
class PoolModel:
    """One model of the pool: a `name` (recorded in the output as chosen_model/rejected_model), the
    OpenAI-compatible server(s) that serve it (`urls`, e.g. `tulu-jax vllm` or a hosted API), the served
    model id sent with each request (`model`; None: the one model the first server lists), the environment
    variable holding its API key, its sampling, and whether it is the model being trained (`on_policy`)."""

    name: str = field(metadata={"help": "unique name of this model in the pool"})
    urls: tuple[str, ...] = field(metadata={"help": "server base URL(s), e.g. http://host:8000 (a list or a,b)"})
    model: str | None = field(default=None, metadata={"help": "served model id (None: the server's only model)"})
    api_key_env: str | None = field(default=None, metadata={"help": "environment variable holding the API key"})
    on_policy: bool = field(default=False, metadata={"help": "the policy being trained (at most one model)"})
    sampling: PoolSampling = field(default_factory=PoolSampling, metadata={"help": "sampling settings"})

    def __post_init__(self):
        if not self.name.strip():
            raise ValueError("name must be a non-empty string")
        if not self.urls or any(not u.startswith(("http://", "https://")) for u in self.urls):
            raise ValueError(f"urls must be one or more http(s):// URLs, got {list(self.urls)}")


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """The model pool of `tulu-jax data preferences` (configs/data/pool.yaml): `models`, at most one of them
    `on_policy`, and at least two others (an off-policy prompt needs two completions to compare)."""

    models: tuple[PoolModel, ...] = field(metadata={"help": "the models that answer the prompts"})
    off_policy_models: int = field(default=4, metadata={"help": "models drawn per off-policy prompt (>= 2)"})

    def __post_init__(self):
        if self.off_policy_models < 2:
            n = self.off_policy_models
            raise ConfigError(f"off_policy_models: must be >= 2 (a pair needs two completions), got {n}")
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ConfigError(f"models[{i}].name: {m.name!r} is also the name of models[{seen[m.name]}]")
            seen[m.name] = i
        on = [i for i, m in enumerate(self.models) if m.on_policy]
        if len(on) > 1:
            raise ConfigError(f"models[{on[1]}].on_policy: only one model may be on-policy (models[{on[0]}] is too)")
        if len(self.models) - len(on) < 2:
            n = len(self.models) - len(on)
            raise ConfigError(f"models: needs at least two models besides the on-policy one, got {n}")

    @property
    def on_policy_model(self) -> str | None:
        """The name of the on-policy model, None when the pool has none."""
        return next((m.name for m in self.models if m.on_policy), None)

    @property
    def off_policy_names(self) -> list[str]:
        """The names of the models that are not on-policy, in config order."""
        return [m.name for m in self.models if not m.on_policy]

    def by_name(self, name: str) -> PoolModel:
        """The model called `name` (KeyError if none)."""
        return next(m for m in self.models if m.name == name)


def load_pool(path: str) -> PoolConfig:
    """Reads a pool YAML. Raises ConfigError as one line naming `path` and the key (`models[1].urls: ...`),
    FileNotFoundError when `path` does not exist."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--pool {path}: no such file")
    try:
        return load_config(PoolConfig, path)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None


# ---------------------------------------------------------------------------------------------- the mix


PROMPT_FIELDS = ("messages", "chosen", "prompt")
_ROLES = ("system", "user", "assistant")


def prompt_messages(row: Mapping, where: str) -> list[dict[str, str]]:
    """The conversation a prompt row asks the pool to continue: its `messages` (SFT and RLVR rows), else
    `chosen` (preference rows), up to and including the last user turn, a trailing assistant turn dropped
    (that is the reply being replaced), system and earlier turns kept; else a string `prompt` as one user
    turn. Each message is reduced to {"role", "content"}. Raises DataError naming `where` and the field for
    a missing or malformed field, an empty content, an unknown role, or a conversation whose last turn is
    not the user's once a trailing assistant turn is dropped."""
    for name in PROMPT_FIELDS:
        value = row.get(name)
        if value is None:
            continue
        if name == "prompt":
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field 'prompt' must be a non-empty string", "bad_prompt")
            return [{"role": "user", "content": value}]
        if not isinstance(value, list) or not value:
            raise DataError(f"{where}: field {name!r} must be a non-empty list of messages", "bad_messages")
        turns = []
        for k, m in enumerate(value):
            if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
                raise DataError(
                    f"{where}: {name}[{k}] must be an object with a role ({', '.join(_ROLES)}) and a string content",
                    "bad_messages",
                )
            if not m["content"].strip():
                raise DataError(f"{where}: {name}[{k}] has an empty content", "bad_messages")
            turns.append({"role": m["role"], "content": m["content"]})
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]  # the reply the pool's completions replace
        if not turns or turns[-1]["role"] != "user":
            last = turns[-1]["role"] if turns else "nothing"
            raise DataError(
                f"{where}: field {name!r}: the turn before the reply is {last}, expected the user's request",
                "last_turn_not_user",
            )
        return turns
    raise DataError(f"{where}: no prompt field (expected one of {', '.join(PROMPT_FIELDS)})", "no_prompt")


def prompt_rng(seed: int, prompt_id: str, purpose: str) -> np.random.Generator:
    """A generator determined by (seed, prompt id, purpose) alone, so every choice made for a prompt is the
    same in a resumed run, whatever order the prompts finish in."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def annotation_mix(pool: PoolConfig, prompt_id: str, *, on_policy_share: float, seed: int) -> tuple[str, list[str]]:
    """(policy, model names) for one prompt: ("on", [on-policy model and one other, in random order]) for a
    share `on_policy_share` of the prompts, else ("off", `pool.off_policy_models` distinct models drawn from
    those not on-policy, or all of them when fewer). Deterministic in (seed, prompt_id). Raises ValueError
    for a share outside [0, 1], or above 0 when the pool has no on-policy model."""
    if not 0 <= on_policy_share <= 1:
        raise ValueError(f"on_policy_share must be in [0, 1], got {on_policy_share}")
    on_model = pool.on_policy_model
    if on_model is None and on_policy_share > 0:
        raise ValueError("on_policy_share > 0 needs a pool model with on_policy: true")
    rng = prompt_rng(seed, prompt_id, "mix")
    others = pool.off_policy_names
    if rng.random() < on_policy_share:
        pair = [on_model, others[int(rng.integers(len(others)))]]
        return "on", [pair[i] for i in rng.permutation(2)]
    k = min(pool.off_policy_models, len(others))
    return "off", [others[i] for i in rng.choice(len(others), size=k, replace=False)]


# ---------------------------------------------------------------------------------------------- binarize


@dataclass(frozen=True)
class Judged:
    """One judged completion: the `model` that wrote it, its `text`, and its rating per aspect (None where the
    judge gave no parseable rating). `rated` when every aspect has one; `mean` is then their mean."""

    model: str
    text: str
    ratings: Mapping[str, int | None]

    @property
    def rated(self) -> bool:
        """Whether every aspect got a 1-5 rating (only rated completions take part in the pair)."""
        return bool(self.ratings) and all(r is not None for r in self.ratings.values())

    @property
    def mean(self) -> float | None:
        """Mean of the four aspect ratings (exact: integers over 4), None when not `rated`."""
        return float(np.mean(list(self.ratings.values()))) if self.rated else None


@dataclass(frozen=True)
class Binarized:
    """The outcome of `binarize`: indices of the `chosen` and `rejected` completions, or None for both and
    the `reason` there is no pair ("too_few_rated" or "no_strictly_lower")."""

    chosen: int | None
    rejected: int | None
    reason: str | None = None


def binarize(completions: Sequence[Judged], rng: np.random.Generator) -> Binarized:
    """Picks a preference pair among the rated completions: chosen has the highest mean rating (drawn with
    `rng` among ties at the top), rejected is drawn with `rng` among those with a strictly lower mean.
    Unrated completions take no part. Fewer than two rated -> reason "too_few_rated"; all rated means equal
    -> "no_strictly_lower" (the reference would pair two equal completions; a tie teaches DPO nothing)."""
    rated = [i for i, c in enumerate(completions) if c.rated]
    if len(rated) < 2:
        return Binarized(None, None, "too_few_rated")
    means = {i: completions[i].mean for i in rated}
    top = max(means.values())
    best = [i for i in rated if means[i] == top]  # means of 1-5 integers over 4 aspects are exact in float
    lower = [i for i in rated if means[i] < top]
    if not lower:
        return Binarized(None, None, "no_strictly_lower")
    return Binarized(best[int(rng.integers(len(best)))], lower[int(rng.integers(len(lower)))])


def pair_row(
    row: dict,
    conversation: Sequence[Mapping[str, str]],
    completions: Sequence[Judged],
    result: Binarized,
    *,
    policy: str,
) -> dict:
    """The output row: the input `row`'s fields plus `chosen`/`rejected` (the prompt `conversation`, as
    `prompt_messages` gives it, then the completion as the assistant's reply: the Tülu format
    `tulu_jax.data.preference.parse_preference_row` reads, earlier turns shared), `chosen_rating`/
    `rejected_rating` (mean ratings), `chosen_model`/`rejected_model`, `ratings` (per completion: model,
    ratings per aspect, mean), `policy` ("on"/"off") and `source` when the row has none."""
    chosen, rejected = completions[result.chosen], completions[result.rejected]
    turns = [dict(m) for m in conversation]
    out = dict(row)
    out.update(
        chosen=turns + [{"role": "assistant", "content": chosen.text}],
        rejected=[dict(m) for m in turns] + [{"role": "assistant", "content": rejected.text}],
        chosen_rating=chosen.mean,
        rejected_rating=rejected.mean,
        chosen_model=chosen.model,
        rejected_model=rejected.model,
        ratings=[{"model": c.model, "ratings": dict(c.ratings), "mean": c.mean} for c in completions],
        policy=policy,
    )
    out.setdefault("source", "tulu-jax data preferences")
    return out


__all__ = [
    "Binarized",
    "Judged",
    "PoolConfig",
    "PoolModel",
    "PoolSampling",
    "annotation_mix",
    "binarize",
    "load_pool",
    "pair_row",
    "prompt_messages",
    "prompt_rng",
]
