"""Generation, scoring, resumable result files and the summary of `tulu-jax eval`.

Responses come from any rollout backend (greedy by default) in batches at fixed offsets, and are scored by
`score_responses`, the reward scorer of RLVR (Tülu 3 §6; open-instruct `ground_truth_utils.py`): the score
an evaluation reports is the reward the same response would earn in training.

Output folder (`--out DIR`):
  DIR/TASK.jsonl     one row per item, in item order, appended batch by batch (flushed): task, index,
                     prompt (the chat messages), response, ground_truth, score, verifier, status,
                     finish_reason ("stop": ended on EOS; "length": ran into max_tokens), response_tokens
                     (generated tokens, EOS included), prompt_sha (`prompt_fingerprint` of the prompt's
                     token ids: a changed chat template or tokenizer is refused, not mixed in), and for
                     `google_ifeval` items `instructions` (one strict pass/fail per instruction).
  DIR/settings.json  model, chat template, dtype, weights fingerprint and per-task max_tokens of the rows: a
                     restart with other settings is refused instead of mixing rows of two setups.
  DIR/summary.json   {"model", "tasks": {TASK: {"complete", "accuracy", "n", "mean_response_tokens",
                     "no_eos_share", "source", "max_tokens", ...}}}, IFEval-style tasks adding
                     prompt_level_strict and instruction_level_strict (accuracy = prompt_level_strict). A run
                     first marks each of its tasks {"complete": false}, and replaces the mark with the metrics
                     when the task is done, so the summary of a killed run says which tasks it lacks.
A killed run started again with the same --out repairs a torn last line, keeps the finished rows, regenerates
the batch it was killed in (the same prompts together, so greedy decoding repeats itself) and writes only
the missing rows: the files end as an uninterrupted run writes them. Items and greedy responses are
deterministic, so a run with a smaller --limit reuses the first rows of a larger one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tulu_jax.data.chat import DataError
from tulu_jax.evaluation.tasks import EvalItem, EvalTask
from tulu_jax.rollout.types import Completion, RolloutBackend, SamplingParams


def score_responses(items: Sequence[EvalItem], responses: Sequence[str], scorer) -> list:
    """The verdicts (`tulu_jax.rewards.scorer.Verdict`: score 1.0/0.0, verifier, status, details) of
    `responses[i]` to `items[i]`, from `scorer` (a `Scorer`, the RLVR reward's process pool). The only
    scoring path of the evaluation. Raises ValueError when the lengths differ."""
    from tulu_jax.rewards.scorer import VerifyItem

    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    return scorer.score([VerifyItem(it.dataset, r, it.ground_truth) for it, r in zip(items, responses)])


def prompt_fingerprint(prompt_ids: Sequence[int]) -> str:
    """A short hash of a rendered prompt's token ids: rows whose prompt now renders differently (another
    chat template, tokenizer or task data) are not resumed."""
    return hashlib.sha256(json.dumps([int(t) for t in prompt_ids]).encode()).hexdigest()[:16]


def result_row(
    task: str, item: EvalItem, prompt_ids: Sequence[int], completion: Completion, response: str, verdict
) -> dict[str, Any]:
    """One line of TASK.jsonl (see the module docstring)."""
    row = {
        "task": task,
        "index": item.index,
        "prompt": item.messages,
        "response": response,
        "ground_truth": item.ground_truth,
        "score": float(verdict.score),
        "verifier": verdict.verifier,
        "status": verdict.status,
        "finish_reason": completion.finish_reason,
        "response_tokens": len(completion.token_ids),
        "prompt_sha": prompt_fingerprint(prompt_ids),
    }
    if item.dataset == "google_ifeval":
        row["instructions"] = None if verdict.details is None else [bool(d) for d in verdict.details]
    return row


def resume_rows(path: str, task: EvalTask, prompt_ids: Sequence[Sequence[int]]) -> list[dict]:
    """The finished rows of `path` for the items of `task` (empty if absent; the first len(task.items) when
    the file holds more, e.g. from a run with a larger --limit). `prompt_ids[i]`: item i's prompt tokens. A
    last line without its newline (a kill mid-write) is cut off the file. Raises DataError naming the file
    and line when a line is not this task's row for the item at its position (another task or data file),
    or its prompt_sha differs from this run's rendering of the prompt (another chat template or tokenizer)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    *lines, tail = data.split(b"\n")
    rows = []
    for n, (line, item, ids) in enumerate(zip(lines, task.items, prompt_ids), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        same = (
            isinstance(row, dict)
            and row.get("task") == task.name
            and row.get("index") == item.index
            and row.get("prompt") == item.messages
            and row.get("ground_truth") == item.ground_truth
        )
        if not same:
            raise DataError(
                f"{path} line {n}: not the row of task {task.name} item {item.index} (other data or settings); "
                "use another --out or --overwrite",
                "bad_output",
            )
        if row.get("prompt_sha") != prompt_fingerprint(ids):
            raise DataError(
                f"{path} line {n}: the prompt of task {task.name} item {item.index} now renders to other tokens "
                "(the chat template or tokenizer changed); use another --out or --overwrite",
                "bad_output",
            )
        rows.append(row)
    if tail:
        with open(path, "rb+") as f:
            f.truncate(len(data) - len(tail))
    return rows


def evaluate_task(
    task: EvalTask,
    prompt_ids: Sequence[Sequence[int]],
    backend: RolloutBackend,
    tokenizer,
    scorer,
    *,
    max_tokens: int,
    batch_size: int = 64,
    out_path: str | None = None,
) -> list[dict]:
    """Greedy responses to every item of `task` (`prompt_ids[i]`: item i's prompt tokens), scored, as result
    rows in item order. Batch k holds items [k*batch_size, (k+1)*batch_size). With `out_path` the rows are
    appended batch by batch and a previous run's rows are kept (`resume_rows`); without it nothing is written."""
    if len(prompt_ids) != len(task.items):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(task.items)} items")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = resume_rows(out_path, task, prompt_ids) if out_path else []
    done = len(rows)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    out = open(out_path, "a" if done else "w", encoding="utf-8") if out_path else None
    try:
        with tqdm(total=len(task.items), initial=done, desc=task.name, unit="item") as bar:
            for start in range(0, len(task.items), batch_size):
                stop = min(start + batch_size, len(task.items))
                if stop <= done:
                    continue
                completions = backend.generate(list(prompt_ids[start:stop]), params)
                keep = range(max(start, done), stop)  # a batch cut by a kill is regenerated whole, written in part
                picked = [(task.items[i], prompt_ids[i], completions[i - start]) for i in keep]
                texts = [tokenizer.decode(list(c.token_ids), skip_special_tokens=True) for _, _, c in picked]
                verdicts = score_responses([it for it, _, _ in picked], texts, scorer)
                new = [result_row(task.name, it, ids, c, t, v) for (it, ids, c), t, v in zip(picked, texts, verdicts)]
                if out is not None:
                    out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                    out.flush()
                rows += new
                bar.update(len(new))
    finally:
        if out is not None:
            out.close()
    return rows


def summarize(task: EvalTask, rows: Sequence[dict], max_tokens: int) -> dict[str, Any]:
    """Task metrics from its result rows (one per item of `task`; ValueError otherwise): complete (true),
    accuracy (mean score), n, mean_response_tokens, no_eos_share (share of finish_reason "length"), source,
    max_tokens, verifier_timeouts and verifier_errors (responses scored 0 because the verifier ran out of
    time or failed); rows with `instructions` (google_ifeval) add prompt_level_strict (share of those
    prompts with every instruction followed) and instruction_level_strict (share of all their instructions
    followed; a row the verifier could not check counts all its instructions as failed)."""
    n = len(rows)
    if n == 0:
        raise ValueError(f"task {task.name}: no rows to summarize")
    if n != len(task.items):
        raise ValueError(f"task {task.name}: {n} rows for {len(task.items)} items")
    out: dict[str, Any] = {
        "complete": True,
        "accuracy": sum(r["score"] for r in rows) / n,
        "n": n,
        "mean_response_tokens": sum(r["response_tokens"] for r in rows) / n,
        "no_eos_share": sum(r["finish_reason"] == "length" for r in rows) / n,
        "source": task.source,
        "max_tokens": max_tokens,
        # responses the verifier could not judge (scored 0): a non-zero count means the score is a lower bound
        "verifier_timeouts": sum(r["status"] == "timeout" for r in rows),
        "verifier_errors": sum(r["status"] == "error" for r in rows),
    }
    ifeval_rows = [r for r in rows if "instructions" in r]  # google_ifeval rows; a user file may mix datasets
    if ifeval_rows:
        followed = total = prompts = 0
        for r in ifeval_rows:
            checks = r["instructions"]
            count = len(json.loads(r["ground_truth"])["instruction_id_list"])
            passed = sum(checks) if checks else 0
            followed, total, prompts = followed + passed, total + count, prompts + (passed == count)
        out["prompt_level_strict"] = prompts / len(ifeval_rows)
        out["instruction_level_strict"] = followed / total
    return out


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What makes two runs' rows comparable; stored in DIR/settings.json. The backend and its servers, and
    the batch size (padding changes float32 rounding, so greedy tokens can differ), decide the responses;
    the verifier deadline decides which slow responses score 0."""

    model: str
    chat_template: str
    dtype: str
    weights: str  # `weights_fingerprint` of the model folder: a model retrained at the same path differs
    backend: str = "local"
    servers: tuple[str, ...] = ()
    batch_size: int = 64
    timeout_s: float = 10.0

    def as_json(self, max_tokens: dict[str, int]) -> dict[str, Any]:
        """settings.json's content: these settings plus `max_tokens` (task -> new-token budget), sorted."""
        return {**dataclasses.asdict(self), "max_tokens": dict(sorted(max_tokens.items()))}


def weights_fingerprint(model_dir: str) -> str:
    """A short hash of the names, sizes and modification times of `model_dir`'s weight files (a folder
    without any, e.g. a tokenizer-only folder for vLLM, hashes the empty list). Cheap at any model size;
    a copy of the same weights elsewhere counts as different, which only costs a re-run."""
    entries = []
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".bin", ".safetensors.index.json")):
            st = os.stat(os.path.join(model_dir, name))
            entries.append((name, st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def clear_outputs(out_dir: str, tasks: Sequence[str] = ()) -> None:
    """Deletes what an earlier eval wrote in `out_dir` (settings.json, summary.json and the TASK.jsonl of
    every task it recorded) and the TASK.jsonl of each of `tasks` (this run's outputs), for `--overwrite`.
    Other files are left alone."""
    path = os.path.join(out_dir, "settings.json")
    recorded: list[str] = []
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                recorded = list(json.load(f).get("max_tokens", {}))
        except (ValueError, AttributeError):
            recorded = []
    for name in ["settings.json", "summary.json", *(f"{t}.jsonl" for t in dict.fromkeys([*recorded, *tasks]))]:
        target = os.path.join(out_dir, name)
        if os.path.exists(target):
            os.remove(target)


def _read_settings(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except ValueError:
        old = None
    if not isinstance(old, dict):
        raise DataError(f"{path}: not a settings file of tulu-jax eval; use another --out or --overwrite", "bad_output")
    return old


def check_settings(out_dir: str, settings: RunSettings, max_tokens: dict[str, int]) -> None:
    """Refuses (DataError naming the file and the setting) an `out_dir` whose settings.json says its rows were
    made with other settings or another max_tokens for one of this run's tasks. Writes nothing."""
    path = os.path.join(out_dir, "settings.json")
    old = _read_settings(path)
    if not old:
        return
    for key, value in json.loads(json.dumps(dataclasses.asdict(settings))).items():  # as settings.json has it
        if old.get(key) != value:
            raise DataError(
                f"{path}: rows here were made with {key}={old.get(key)!r}, this run has {value!r}; "
                "use another --out or --overwrite",
                "bad_output",
            )
    for task, budget in max_tokens.items():
        before = (old.get("max_tokens") or {}).get(task)
        if before is not None and before != budget:
            raise DataError(
                f"{path}: task {task} was run with max_tokens={before}, this run has {budget}; "
                "use another --out or --overwrite",
                "bad_output",
            )


def record_settings(out_dir: str, settings: RunSettings, max_tokens: dict[str, int]) -> None:
    """Writes `out_dir`/settings.json (after `check_settings` passed); tasks not in this run keep their
    max_tokens entries."""
    path = os.path.join(out_dir, "settings.json")
    merged = {**(_read_settings(path).get("max_tokens") or {}), **max_tokens}
    write_json(path, settings.as_json(merged))


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON, atomically (a temporary file renamed over `path`)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def write_summary(out_dir: str, model: str, summaries: dict[str, dict]) -> dict:
    """Merges `summaries` (task -> `summarize` output) into `out_dir`/summary.json (tasks of earlier runs
    into the same folder are kept) and returns the whole summary."""
    path = os.path.join(out_dir, "summary.json")
    tasks: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                tasks = dict(json.load(f).get("tasks", {}))
        except (ValueError, AttributeError):
            raise DataError(f"{path}: not a summary written by tulu-jax eval", "bad_output") from None
    summary = {"model": model, "tasks": {**tasks, **summaries}}
    write_json(path, summary)
    return summary


def format_table(summaries: dict[str, dict]) -> str:
    """One line per task: accuracy, n, mean response tokens, share without EOS, source; then one note per
    task whose verifier timed out or failed on some responses."""
    head = f"{'task':<12} {'accuracy':>8} {'n':>6} {'mean_tokens':>11} {'no_eos':>6}  source"
    lines, notes = [head], []
    for name, s in summaries.items():
        lines.append(
            f"{name:<12} {s['accuracy']:>8.4f} {s['n']:>6d} {s['mean_response_tokens']:>11.1f} "
            f"{s['no_eos_share']:>6.3f}  {s['source']}"
        )
        if s["verifier_timeouts"] or s["verifier_errors"]:
            notes.append(
                f"note: {name}: {s['verifier_timeouts']} verifier timeouts and {s['verifier_errors']} errors, "
                "scored 0 (see the rows' status)"
            )
    return "\n".join(lines + notes)
