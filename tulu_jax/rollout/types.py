"""The rollout interface: what RLVR, preference-data generation and evaluation ask of a generator.

Two backends implement it: `vllm` (an external vLLM server over HTTP, weights pushed as safetensors) and
`local` (the in-process JAX sampler). Callers only see token ids in, token ids and log-probs out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    n: int = 1  # samples per prompt
    stop_token_ids: tuple[int, ...] = ()  # besides EOS, which always stops
    seed: int | None = None  # None: a fresh stream per call

    def __post_init__(self):
        if self.max_tokens < 1 or self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completion:
    """One sample. `logprobs[i]` is the log-prob of `token_ids[i]` under the *sampling* distribution
    (temperature applied; greedy reports temperature-1 log-probs), so PPO ratios use the same numbers."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: Literal["stop", "length"]
    weight_version: str | None = None


@runtime_checkable
class RolloutBackend(Protocol):
    eos_token_id: int
    pad_token_id: int

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """`n` completions per prompt, returned prompt-major: index = prompt_index * n + sample_index."""
        ...

    def push_weights(self, params: Any, version: str) -> None:
        """Make every later `generate` use these parameters (a pytree in our layout) and tag them `version`."""
        ...
