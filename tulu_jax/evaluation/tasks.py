"""Evaluation tasks: readers of the benchmark files, each row turned into a chat prompt and the ground truth
the RLVR verifier of Tülu 3 (§6; open-instruct `ground_truth_utils.py`) scores it against.

File layouts (`--data-dir DIR`; without it the built-in tasks read small bundled samples, hand-written for
this package and NOT benchmark items, so their scores say nothing about a model's benchmark accuracy):

  gsm8k   DIR/gsm8k/test.jsonl or DIR/gsm8k/test.parquet: rows {"question": str, "answer": str} with the
          answer ending "#### N" (GSM8K's own format). Ground truth: N, commas removed. 8-shot CoT prompt.
          Verifier dataset "gsm8k".
  math    DIR/math/test.jsonl or DIR/math/test.parquet: rows {"problem": str, "solution": str} (Hendrycks'
          MATH; other fields ignored). Ground truth: the content of the solution's last \\boxed{}.
          4-shot Minerva prompt. Verifier dataset "math".
  ifeval  DIR/ifeval/input_data.jsonl or DIR/ifeval/input_data.parquet: rows {"key": int, "prompt": str,
          "instruction_id_list": [str], "kwargs": [object]} (Google's IFEval release). Zero-shot: the prompt
          is the user turn. Verifier dataset "google_ifeval" (every instruction, strict).
  tiny_arith, tiny_if   bundled RLVR files tulu_jax/assets/tiny_arith/eval.jsonl, tiny_if/eval.jsonl.
  NAME=PATH  any .jsonl/.parquet of RLVR rows {"messages": [...], "ground_truth": str, "dataset": str}
          (the format of Tülu 3's RLVR data; {"prompt": str} may stand for messages, one user turn):
          zero-shot, the messages are the chat; scored by the row's verifier dataset (lower-cased, so
          "MATH" is "math"). NAME may not be a built-in task's.

A bad row is a DataError naming "<file> line N" (or "row N" for Parquet) and the field.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tulu_jax.data.chat import DataError
from tulu_jax.data.sources import iter_raw_rows
from tulu_jax.evaluation.prompts import gsm8k_messages, math_messages
from tulu_jax.rewards.gsm8k import gsm8k_ground_truth
from tulu_jax.rewards.ifeval_google import ground_truth_from_row, instruction_ids
from tulu_jax.rewards.math_answer import last_boxed_content
from tulu_jax.rewards.registry import UnknownDataset, canonical_dataset, check_ground_truth

SAMPLE_NOTE = "bundled sample, hand-written, not benchmark items"
DEFAULT_MAX_TOKENS = 512  # benchmark tasks and user files
TINY_MAX_TOKENS = 128  # the bundled tiny tasks have one-line answers


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One prompt to answer. `messages`: the chat to continue (list of {"role", "content"}, last turn the
    user's); `ground_truth`: what the verifier `dataset` checks the response against; `where`: file and line."""

    index: int
    messages: list[dict[str, str]]
    ground_truth: str
    dataset: str
    where: str


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A named list of items. `source`: the file read (with a note for bundled samples); `max_tokens`: the
    task's default generation budget; `path`: the file read."""

    name: str
    items: tuple[EvalItem, ...]
    source: str
    max_tokens: int
    path: str = ""


def _fail(where: str, field: str, what: str, reason: str = "bad_eval_row"):
    raise DataError(f"{where}: field '{field}': {what}", reason)


def _text(row: Any, where: str, field: str) -> str:
    if not isinstance(row, Mapping):
        _fail(where, "<row>", f"expected a JSON object, got {type(row).__name__}", "not_an_object")
    if field not in row:
        _fail(where, field, "missing")
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        _fail(where, field, f"expected a non-empty string, got {value!r:.60}")
    return value


_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def gsm8k_item(row: Any, where: str, index: int) -> EvalItem:
    """A GSM8K row {"question", "answer": "... #### N"} -> its 8-shot item; ground truth N without thousands
    commas (the reward's `gsm8k_ground_truth`)."""
    question, answer = _text(row, where, "question"), _text(row, where, "answer")
    if "####" not in answer:
        _fail(where, "answer", "no '#### N' final answer")
    truth = gsm8k_ground_truth(answer)
    if not _NUMBER.fullmatch(truth):
        _fail(where, "answer", f"the text after '####' is not a number: {truth!r:.40}")
    return EvalItem(index, gsm8k_messages(question), truth, "gsm8k", where)


def math_item(row: Any, where: str, index: int) -> EvalItem:
    """A MATH row {"problem", "solution"} -> its 4-shot Minerva item; ground truth = the content of the last
    `\\boxed{}` (the reward's `last_boxed_content`, the extraction it applies to responses)."""
    problem, solution = _text(row, where, "problem"), _text(row, where, "solution")
    truth = last_boxed_content(solution)
    if truth is None or not truth.strip():
        _fail(where, "solution", "no \\boxed{...} answer (or its braces do not close)")
    truth = truth.strip()
    return EvalItem(index, math_messages(problem), truth, "math", where)


def ifeval_item(row: Any, where: str, index: int) -> EvalItem:
    """An IFEval row {"key", "prompt", "instruction_id_list", "kwargs"} -> its zero-shot item; ground truth
    from the reward's `ground_truth_from_row` (kwargs' nulls, which the Hugging Face copy adds, dropped;
    every instruction checked to build from its kwargs)."""
    prompt = _text(row, where, "prompt")
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    ids, kwargs = (x.tolist() if hasattr(x, "tolist") else x for x in (ids, kwargs))  # Parquet arrays
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        _fail(where, "instruction_id_list", f"expected a non-empty list of instruction ids, got {ids!r:.60}")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, Mapping) for k in kwargs):
        _fail(where, "kwargs", f"expected a list of {len(ids)} objects (one per instruction), got {kwargs!r:.60}")
    unknown = sorted(set(ids) - set(instruction_ids()))
    if unknown:
        _fail(where, "instruction_id_list", f"unknown IFEval instruction ids {unknown}")
    try:
        truth = ground_truth_from_row({"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs})
    except ValueError as e:
        _fail(where, "kwargs", str(e).removeprefix("IFEval row: "))
    return EvalItem(index, [{"role": "user", "content": prompt}], truth, "google_ifeval", where)


def rlvr_item(row: Any, where: str, index: int) -> EvalItem:
    """A Tülu RLVR row {"messages", "ground_truth", "dataset"} -> a zero-shot item scored by `dataset`. As in
    `tulu-jax generate`, {"prompt": str} may stand for "messages" (one user turn). A ground truth the
    verifier cannot use (`tulu_jax.rewards.check_ground_truth`) is a DataError naming field ground_truth."""
    from tulu_jax.generate import prompt_messages

    messages = prompt_messages(row, where)
    truth = _text(row, where, "ground_truth")
    try:
        dataset = canonical_dataset(_text(row, where, "dataset"))
    except UnknownDataset as e:
        _fail(where, "dataset", str(e))
    try:  # a ground truth the verifier cannot use would score every response 0: refuse it before generating
        check_ground_truth(dataset, truth)
    except ValueError as e:
        _fail(where, "ground_truth", f"not a {dataset} ground truth: {e}")
    return EvalItem(index, messages, truth, dataset, where)


Reader = Callable[[Any, str, int], EvalItem]


@dataclasses.dataclass(frozen=True)
class BuiltinTask:
    """Where a built-in task's file lives under --data-dir (first existing name wins), its bundled file, and
    how to read a row."""

    reader: Reader
    data_files: tuple[str, ...]  # under --data-dir; () for the tiny tasks, which are always bundled
    bundled: str  # path under tulu_jax/assets
    max_tokens: int
    sample: bool  # the bundled file is a stand-in sample, not the benchmark


BUILTIN: dict[str, BuiltinTask] = {
    "gsm8k": BuiltinTask(
        gsm8k_item, ("gsm8k/test.jsonl", "gsm8k/test.parquet"), "eval_samples/gsm8k.jsonl", DEFAULT_MAX_TOKENS, True
    ),
    "math": BuiltinTask(
        math_item, ("math/test.jsonl", "math/test.parquet"), "eval_samples/math.jsonl", DEFAULT_MAX_TOKENS, True
    ),
    "ifeval": BuiltinTask(
        ifeval_item,
        ("ifeval/input_data.jsonl", "ifeval/input_data.parquet"),
        "eval_samples/ifeval.jsonl",
        DEFAULT_MAX_TOKENS,
        True,
    ),
    "tiny_arith": BuiltinTask(rlvr_item, (), "tiny_arith/eval.jsonl", TINY_MAX_TOKENS, False),
    "tiny_if": BuiltinTask(rlvr_item, (), "tiny_if/eval.jsonl", TINY_MAX_TOKENS, False),
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def asset_path(relative: str) -> str:
    """Path of a file under the package's `tulu_jax/assets`."""
    return str(importlib.resources.files("tulu_jax") / "assets" / relative)


def read_items(path: str, reader: Reader, limit: int | None = None) -> list[EvalItem]:
    """The first `limit` (None: all) items of `path` (.jsonl or .parquet), read by `reader`. Raises DataError
    for a bad row (file, line, field) or a file without items, FileNotFoundError for a missing file."""
    items: list[EvalItem] = []
    rows: Iterator[tuple[str, Any]] = iter_raw_rows(path)
    for where, row in rows:
        if limit is not None and len(items) >= limit:
            break
        if isinstance(row, DataError):
            raise row
        items.append(reader(row, where, len(items)))
    if not items:
        raise DataError(f"{path}: no rows to evaluate", "empty_dataset")
    return items


def parse_task_spec(spec: str) -> tuple[str, str | None]:
    """ "NAME" (a built-in task) or "NAME=PATH" (a file of RLVR rows) -> (name, path or None). ValueError
    for an unknown built-in name or a name that cannot be a file name."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if sep:
        if name in BUILTIN:
            raise ValueError(f"{spec}: {name} is a built-in task; give the file another name")
        if not _NAME.fullmatch(name):
            raise ValueError(f"task name {name!r}: use letters, digits, '_', '.', '-' (it names the output file)")
        if not path.strip():
            raise ValueError(f"task {name}: empty path after '='")
        return name, path.strip()
    if name not in BUILTIN:
        raise ValueError(f"unknown task {name!r}; built-in: {', '.join(BUILTIN)}, or NAME=PATH for a file of RLVR rows")
    return name, None


def load_task(spec: str, data_dir: str | None = None, limit: int | None = None) -> EvalTask:
    """The task `spec` ("NAME" or "NAME=PATH", see `parse_task_spec`) with its first `limit` items. A built-in
    benchmark reads its file under `data_dir` (FileNotFoundError naming the expected paths if absent: never a
    silent fallback), or its bundled sample without `data_dir`. Raises DataError for bad rows."""
    name, path = parse_task_spec(spec)
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--tasks {name}={path}: no such file")
        return EvalTask(name, tuple(read_items(path, rlvr_item, limit)), path, DEFAULT_MAX_TOKENS, path)
    task = BUILTIN[name]
    if data_dir is not None and task.data_files:
        found = [os.path.join(data_dir, f) for f in task.data_files if os.path.isfile(os.path.join(data_dir, f))]
        if not found:
            raise FileNotFoundError(f"--data-dir {data_dir}: no {' or '.join(task.data_files)} for task {name}")
        return EvalTask(name, tuple(read_items(found[0], task.reader, limit)), found[0], task.max_tokens, found[0])
    bundled = asset_path(task.bundled)
    if not os.path.isfile(bundled):
        raise FileNotFoundError(f"task {name}: the bundled file {bundled} is missing (incomplete installation)")
    source = f"{SAMPLE_NOTE}: {bundled}" if task.sample else bundled
    return EvalTask(name, tuple(read_items(bundled, task.reader, limit)), source, task.max_tokens, bundled)
