"""`tulu-jax generate`: completions for a JSONL file of prompts, through any rollout backend.

Each input row has `messages` (a chat whose last turn is not the assistant's; the Tülu template is
applied with the assistant header appended) or `prompt` (a string, taken as one user turn). Each output
row is the input row plus `prompt_token_ids` and `completions`: text, token ids, per-token log-probs,
finish reason and weight version of every sample. Rows are written as their chunk finishes, so a killed
run restarted with the same command skips the rows already in the output file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from tqdm import tqdm

from tulu_jax.data.chat import DataError, render_tulu, validate_messages
from tulu_jax.data.sources import iter_valid_rows
from tulu_jax.rollout.types import Completion, RolloutBackend, SamplingParams

_PLACEHOLDER_REPLY = {"role": "assistant", "content": "-"}


def prompt_messages(row: Any, where: str) -> list[dict[str, str]]:
    """The chat to complete, from a `messages` or a `prompt` row; errors name file, line and field."""
    if isinstance(row, Mapping) and "messages" not in row and "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise DataError(f"{where}: field 'prompt': expected a non-empty string", "bad_prompt")
        return [{"role": "user", "content": row["prompt"]}]
    messages = row.get("messages") if isinstance(row, Mapping) else None
    if not isinstance(messages, (list, tuple, np.ndarray)):
        validate_messages(row, where)  # raises the precise error: not an object, missing, not a list
    # validate_messages insists on an assistant turn; a prompt must not end with one, so check with a stand-in.
    checked = validate_messages({"messages": [*list(messages), _PLACEHOLDER_REPLY]}, where)[:-1]
    if not checked or checked[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: field 'messages': nothing to complete (empty, or ends with the assistant)", "bad_prompt"
        )
    return checked


def iter_prompts(path: str, on_bad_row: str, counts: dict[str, Any]) -> Iterator[tuple[dict, list[dict]]]:
    """(row, chat to complete) for every valid row of `path`; see `iter_valid_rows`."""
    return iter_valid_rows([path], on_bad_row, counts, lambda row, where: (row, prompt_messages(row, where)))


def _completion_json(c: Completion, tokenizer) -> dict:
    return {
        "text": tokenizer.decode(list(c.token_ids), skip_special_tokens=True),
        "token_ids": list(c.token_ids),
        "logprobs": list(c.logprobs),
        "finish_reason": c.finish_reason,
        "weight_version": c.weight_version,
    }


def generate_file(
    backend: RolloutBackend,
    tokenizer,
    prompts_path: str,
    out_path: str,
    params: SamplingParams,
    *,
    chunk_size: int = 64,
    on_bad_row: str = "error",
    overwrite: bool = False,
) -> dict:
    """Completes every prompt of `prompts_path` into `out_path`; returns counters."""
    counts: dict[str, Any] = {}
    done = 0
    if os.path.exists(out_path) and not overwrite:
        with open(out_path) as f:
            done = sum(1 for line in f if line.strip())
    rows = list(iter_prompts(prompts_path, on_bad_row, counts))
    todo = rows[done:]
    mode = "a" if done else "w"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    new_tokens = 0
    with open(out_path, mode) as out, tqdm(total=len(rows), initial=done, desc="generate", unit="prompt") as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            ids = [
                tokenizer(render_tulu(m, tokenizer.eos_token, add_generation_prompt=True), add_special_tokens=False)[
                    "input_ids"
                ]
                for _, m in chunk
            ]
            completions = backend.generate(ids, params)
            for i, (row, _) in enumerate(chunk):
                samples = completions[i * params.n : (i + 1) * params.n]
                new_tokens += sum(len(c.token_ids) for c in samples)
                record = {
                    **row,
                    "prompt_token_ids": list(ids[i]),
                    "completions": [_completion_json(c, tokenizer) for c in samples],
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
    return {
        "prompts": len(rows),
        "already_done": done,
        "generated": len(todo),
        "new_tokens": new_tokens,
        "rows_skipped": counts.get("rows_skipped", {}),
        "out": out_path,
    }


def make_backend(backend: str, model: str, *, servers: str | None = None, dtype: str = "float32"):
    """(RolloutBackend, tokenizer) for `--backend local|vllm`."""
    from tulu_jax.data.tokenizer import load_tokenizer, pad_id

    tokenizer = load_tokenizer(model)
    if backend == "local":
        from tulu_jax.sampling.sampler import LocalSampler

        return LocalSampler.from_hf(model, dtype=dtype), tokenizer
    if backend == "vllm":
        if not servers:
            raise ValueError("--backend vllm needs --servers URL[,URL...] (start one with `tulu-jax vllm --model DIR`)")
        from tulu_jax.rollout.vllm_client import VLLMClient

        urls = [u.strip() for u in servers.split(",") if u.strip()]
        return VLLMClient(urls, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer)), tokenizer
    raise ValueError(f"unknown backend {backend!r}; expected local or vllm")
