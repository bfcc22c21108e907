"""The rollout interface: what RLVR, preference-data generation and evaluation ask of a generator.

Two backends implement it: `vllm` (an external vLLM server over HTTP, weights pushed as safetensors) and
`local` (the in-process JAX sampler). Callers only see token ids in, token ids and log-probs out: one
`Completion` per sample, or the same samples as padded arrays (`RolloutBatch`) ready for a jitted trainer,
the shape the RLVR loop of Tülu 3 §6 (open-instruct `ppo_vllm_thread_ray_gtrl.py`) consumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

# Finish reasons as integers in `RolloutBatch.finish_reasons`.
FINISH_STOP = 0  # ended on EOS or one of `stop_token_ids` (the stop token is the last token kept)
FINISH_LENGTH = 1  # ran into `max_tokens`
FINISH_CODES: dict[str, int] = {"stop": FINISH_STOP, "length": FINISH_LENGTH}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample. Raises ValueError for max_tokens < 1, n < 1, temperature < 0, top_p outside (0, 1]
    or top_k < 0."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    n: int = 1  # samples per prompt
    stop_token_ids: tuple[int, ...] = ()  # besides EOS, which always stops
    seed: int | None = None  # None: the backend's own stream (see each backend)

    def __post_init__(self):
        if self.max_tokens < 1 or self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: {self}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: argmax decoding."""
        return self.temperature == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completion:
    """One sample. `logps[i]` is the log-probability (natural log, float) of `token_ids[i]` under the
    *sampling* distribution (temperature, top-k and top-p applied; greedy reports temperature-1 values),
    so PPO ratios start from the same numbers the trainer recomputes."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logps: tuple[float, ...]
    finish_reason: Literal["stop", "length"]
    weight_version: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutBatch:
    """N samples as padded NumPy arrays, row i = the i-th `Completion` (prompt-major order).

    prompt_token_ids  [N, P] int32, *left*-padded with the backend's pad_token_id (prompt ends at column P-1)
    prompt_lengths    [N] int32, real prompt tokens per row
    token_ids         [N, T] int32, completion tokens, *right*-padded with pad_token_id
    logps             [N, T] float32, sampling log-probs of `token_ids`, 0.0 past each row's length
    lengths           [N] int32, completion tokens per row (the stop token included)
    finish_reasons    [N] int32, FINISH_STOP (0) or FINISH_LENGTH (1)
    prompt_index, sample_index  [N] int32
    weight_versions   per row, the weight version that produced it
    """

    prompt_token_ids: np.ndarray
    prompt_lengths: np.ndarray
    token_ids: np.ndarray
    logps: np.ndarray
    lengths: np.ndarray
    finish_reasons: np.ndarray
    prompt_index: np.ndarray
    sample_index: np.ndarray
    weight_versions: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.lengths)


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_token_id: int) -> np.ndarray:
    """[len(rows), width] int32, each row right-aligned after pad_token_id. Raises ValueError if a row
    is longer than `width`."""
    out = np.full((len(rows), width), pad_token_id, np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the width {width}")
        if len(row):
            out[i, width - len(row) :] = row
    return out


def batch_completions(
    completions: Sequence[Completion], pad_token_id: int, *, width: int | None = None
) -> RolloutBatch:
    """The `RolloutBatch` of `completions`. `width` (default: the longest completion, at least 1) fixes T,
    e.g. to `SamplingParams.max_tokens` so every batch has one shape; ValueError if a completion is longer.
    P is the longest prompt."""
    lengths = np.array([len(c.token_ids) for c in completions], np.int32)
    t = max(int(lengths.max(initial=0)), 1) if width is None else width
    if lengths.size and lengths.max() > t:
        raise ValueError(f"a completion has {lengths.max()} tokens, more than the width {t}")
    token_ids = np.full((len(completions), t), pad_token_id, np.int32)
    logps = np.zeros((len(completions), t), np.float32)
    for i, c in enumerate(completions):
        token_ids[i, : len(c.token_ids)] = c.token_ids
        logps[i, : len(c.logps)] = c.logps
    prompt_lengths = np.array([len(c.prompt_token_ids) for c in completions], np.int32)
    return RolloutBatch(
        prompt_token_ids=left_pad(
            [c.prompt_token_ids for c in completions], int(prompt_lengths.max(initial=0)), pad_token_id
        ),
        prompt_lengths=prompt_lengths,
        token_ids=token_ids,
        logps=logps,
        lengths=lengths,
        finish_reasons=np.array([FINISH_CODES[c.finish_reason] for c in completions], np.int32),
        prompt_index=np.array([c.prompt_index for c in completions], np.int32),
        sample_index=np.array([c.sample_index for c in completions], np.int32),
        weight_versions=tuple(c.weight_version for c in completions),
    )


def check_score_inputs(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> None:
    """ValueError unless there is one completion per prompt and every prompt has a token."""
    if len(prompts) != len(completions):
        raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("score: every prompt needs at least one token")


@runtime_checkable
class RolloutBackend(Protocol):
    """What a generator offers (`LocalSampler`, `VLLMClient`): sampling, the same as arrays, scoring, and
    weight pushes from the trainer. Token ids are ints; log-probs are natural logs."""

    eos_token_id: int
    pad_token_id: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """`n` completions per prompt, returned prompt-major: index = prompt_index * n + sample_index."""
        ...

    def generate_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """`generate` as a `RolloutBatch` whose completion width T is `params.max_tokens`."""
        ...

    def score(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        completion_token_ids: Sequence[Sequence[int]],
        temperature: float = 1.0,
    ) -> np.ndarray:
        """log softmax(logits / temperature) of each completion token given its prompt and the tokens before
        it, under the current weights (no top-k / top-p): float32 [N, T], T the longest completion (at least
        1), 0.0 past each row's end."""
        ...

    def push_weights(self, params: Any, version: str | None) -> None:
        """Make every later `generate` use these parameters (a pytree in our layout) and tag them `version`."""
        ...
