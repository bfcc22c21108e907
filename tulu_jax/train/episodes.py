"""Rollouts -> the fixed-shape host arrays an RLVR step trains on (open-instruct `ppo_vllm_thread_ray_gtrl.py`).

Dimension legend: N episodes (prompts x samples), P prompt width, T response width (`rollout.max_tokens`),
L = P + T.

Each row is the left-padded prompt followed by the right-padded response, so every response starts at column
P. `segment_ids` mark real tokens (1) and padding (0) and positions are the exclusive cumulative sum of that
mask, as the reference builds them, so left padding never shifts RoPE. P is fixed for a whole run (the prompt
set's longest prompt, rounded up), so the jitted forward and update steps compile once.
"""

from __future__ import annotations

import numpy as np

from tulu_jax.rollout.types import FINISH_STOP, RolloutBatch

# Keys of the token arrays every forward pass reads ([N, L] int32).
SEQUENCE_KEYS = ("input_ids", "segment_ids", "positions")


def prompt_width(longest_prompt: int, minimum: int = 16) -> int:
    """P: the next power of two at or above the longest prompt (at least `minimum`)."""
    return max(minimum, 1 << max(longest_prompt - 1, 0).bit_length())


def episode_arrays(batch: RolloutBatch, *, width: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """Host arrays of `batch`, prompts re-padded on the left to `width` (P):

    input_ids, segment_ids, positions  [N, P+T] int32 (the model's inputs; pad ids where segment_ids == 0)
    responses                          [N, T] int32, the sampled tokens (pad past each row's length)
    sampler_logps                      [N, T] float32, the generator's log-probs of them (0 past the length)
    lengths                            [N] int32, response tokens (the stop token included)
    stopped                            [N] bool, the response ended on EOS or a stop token

    ValueError when a prompt is longer than `width`."""
    n, t = batch.token_ids.shape
    p_in = batch.prompt_token_ids.shape[1]
    if p_in > width:
        raise ValueError(f"a prompt has {p_in} tokens, more than the prompt width {width}")
    prompts = np.full((n, width), pad_token_id, np.int32)
    prompts[:, width - p_in :] = batch.prompt_token_ids
    prompt_real = np.arange(width)[None, :] >= (width - batch.prompt_lengths)[:, None]
    response_real = np.arange(t)[None, :] < batch.lengths[:, None]
    segment_ids = np.concatenate([prompt_real, response_real], axis=1).astype(np.int32)
    return {
        "input_ids": np.concatenate([prompts, batch.token_ids.astype(np.int32)], axis=1),
        "segment_ids": segment_ids,
        "positions": (np.cumsum(segment_ids, axis=1) - segment_ids).astype(np.int32),
        "responses": batch.token_ids.astype(np.int32),
        "sampler_logps": batch.logps.astype(np.float32),
        "lengths": batch.lengths.astype(np.int32),
        "stopped": batch.finish_reasons == FINISH_STOP,
    }


def concat_episodes(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Episode arrays of several rollouts (same P and T) as one set of rows, in order."""
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def take_rows(episodes: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The episodes at `rows` (int indices), every key indexed along its first axis."""
    return {k: v[rows] for k, v in episodes.items()}
