"""`tulu-jax generate`: completions for a JSONL file of prompts, through any rollout backend.

Each input row has `messages` (a chat whose last turn is not the assistant's) or `prompt` (a string,
taken as one user turn); the chat is rendered with the assistant header appended, in the Tülu template of
open-instruct's `dataset_processor.py` (`chat_template="tulu"`) or the model's own (`"model"`, the
template stored with its tokenizer, so a stock instruct model is prompted in the format it was trained
on). Each output row is the input row plus `prompt_token_ids` and `completions`: text, token ids,
per-token log-probs (`logps`), finish reason and weight version of every sample. Rows are written as
their chunk finishes, so a killed run restarted with the same command repairs a torn last line, skips the
rows already written and produces the same file as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from tqdm import tqdm

from tulu_jax.data.chat import DataError, check_chat_template, prompt_token_ids, validate_messages
from tulu_jax.data.sources import iter_valid_rows
from tulu_jax.rollout.types import Completion, RolloutBackend, SamplingParams

_PLACEHOLDER_REPLY = {"role": "assistant", "content": "-"}


def prompt_messages(row: Any, where: str) -> list[dict[str, str]]:
    """The chat to complete (list of {"role", "content"}), from a `messages` or a `prompt` row. Raises
    DataError naming `where` (file and line) and the field."""
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
        "logps": list(c.logps),
        "finish_reason": c.finish_reason,
        "weight_version": c.weight_version,
    }


def chunk_seed(base: int, index: int) -> int:
    """The sampling seed of chunk `index` of a run seeded `base`: a hash of both, in [0, 2**31), so chunks
    draw different streams and a resumed run redraws a chunk exactly as the uninterrupted run did."""
    digest = hashlib.sha256(f"generate\0{base}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def resume_output(out_path: str) -> tuple[int, bool]:
    """(rows already complete in `out_path`, whether a torn last row was cut away). A run killed mid-write
    leaves a last line without its newline: it is truncated off the file so the row is generated again.
    Raises DataError naming the file and line when a complete line is not an output row of ours (a JSON
    object with `prompt_token_ids` and `completions`)."""
    with open(out_path, "rb") as f:
        data = f.read()
    *complete, tail = data.split(b"\n")
    for n, line in enumerate(complete, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        # Our rows are the prompt row plus these two fields: anything else is some other file (say, the
        # prompts themselves), which a resume must never append to.
        ok = isinstance(row, dict) and "prompt_token_ids" in row and "completions" in row
        if not ok:
            raise DataError(
                f"{out_path} line {n}: not a row written by tulu-jax generate; pass --overwrite or another --out",
                "bad_output",
            )
    if tail:
        with open(out_path, "rb+") as f:
            f.truncate(len(data) - len(tail))
    return len(complete), bool(tail)


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
    chat_template: str = "tulu",
) -> dict:
    """Completes every prompt of `prompts_path` (JSONL) into `out_path`, `chunk_size` prompts per backend
    call, each chunk flushed as it finishes. Chunk k samples with `chunk_seed(params.seed, k)` (None stays
    None: the backend's own stream, not reproducible), and chunks sit at fixed row offsets, so a run that
    resumes an existing `out_path` (not `overwrite`) regenerates the chunk it was killed in and writes the
    same rows an uninterrupted run would have. Prompts are rendered with `chat_template` ("tulu" or
    "model", see `tulu_jax.data.chat.prompt_token_ids`). Returns counters (prompts, already_done, generated,
    new_tokens, repaired_torn_row, rows_skipped, out). Raises DataError for bad prompt rows (unless
    on_bad_row="skip") or an `out_path` that is not ours or holds more rows than there are prompts, and
    InputError for a "model" tokenizer without a chat template."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_chat_template(tokenizer, chat_template, "chat_template")
    counts: dict[str, Any] = {}
    done, torn = resume_output(out_path) if os.path.exists(out_path) and not overwrite else (0, False)
    rows = list(iter_prompts(prompts_path, on_bad_row, counts))
    if done > len(rows):
        raise DataError(f"{out_path} has {done} rows but {prompts_path} only {len(rows)} prompts", "bad_output")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    new_tokens = 0
    with open(out_path, "a" if done else "w") as out, tqdm(total=len(rows), initial=done, unit="prompt") as bar:
        for index, start in enumerate(range(0, len(rows), chunk_size)):
            chunk = rows[start : start + chunk_size]
            if start + len(chunk) <= done:
                continue
            ids = [prompt_token_ids(m, tokenizer, chat_template) for _, m in chunk]
            seed = None if params.seed is None else chunk_seed(params.seed, index)
            completions = backend.generate(ids, dataclasses.replace(params, seed=seed))
            lines = []
            for i, (row, _) in enumerate(chunk):
                if start + i < done:  # written before the kill; the chunk was redrawn only for its seed
                    continue
                samples = completions[i * params.n : (i + 1) * params.n]
                new_tokens += sum(len(c.token_ids) for c in samples)
                record = {
                    **row,
                    "prompt_token_ids": list(ids[i]),
                    "completions": [_completion_json(c, tokenizer) for c in samples],
                }
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            out.write("".join(lines))
            out.flush()
            bar.update(len(lines))
    return {
        "prompts": len(rows),
        "already_done": done,
        "generated": len(rows) - done,
        "new_tokens": new_tokens,
        "repaired_torn_row": torn,
        "rows_skipped": counts.get("rows_skipped", {}),
        "out": out_path,
    }


def make_backend(
    backend: str,
    model: str,
    *,
    servers: str | None = None,
    dtype: str = "float32",
    mesh_shape: tuple[int, int, int] | None = None,
    tokenizer=None,
):
    """(RolloutBackend, tokenizer) for `--backend local|vllm` on the Hugging Face folder `model`.

    local: a `LocalSampler` computing in `dtype` on `make_mesh(*mesh_shape)` (default: one device).
    vllm: a `VLLMClient` on the comma-separated `servers` URLs, given the folder's config so it can push
    weights; every server is first probed (`tulu_jax.inputs.check_servers`). `tokenizer` defaults to the
    folder's. Raises InputError (a ValueError naming the flag) for flags that do not go together
    (`check_backend_flags`), a URL that is not http(s) or a server that does not answer; ValueError for an
    unknown backend or a mesh that does not fit the devices."""
    from tulu_jax.data.tokenizer import load_tokenizer, pad_token_id
    from tulu_jax.inputs import check_backend_flags, check_servers
    from tulu_jax.models import hf

    if backend not in ("local", "vllm"):
        raise ValueError(f"unknown backend {backend!r}; expected local or vllm")
    check_backend_flags(backend, servers, mesh_shape)
    tokenizer = load_tokenizer(model) if tokenizer is None else tokenizer
    if backend == "local":
        from tulu_jax.sampling.sampler import LocalSampler
        from tulu_jax.sharding import make_mesh

        mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
        return LocalSampler.from_hf(model, mesh, dtype=dtype), tokenizer
    from tulu_jax.rollout.vllm_client import VLLMClient

    urls = check_servers(servers)
    client = VLLMClient(
        urls, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id(tokenizer), cfg=hf.load_hf_config(model)
    )
    return client, tokenizer
