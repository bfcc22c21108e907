"""`tulu-jax eval`: flags, their checks (one-line errors before any compute) and the run."""

from __future__ import annotations

import argparse
import math
import os

from tulu_jax.config import DTYPE_NAMES
from tulu_jax.inputs import (
    InputError,
    check_backend_flags,
    check_model_dir,
    check_writable_output,
    load_chat_tokenizer,
    parse_mesh,
)
from tulu_jax.rewards.scorer import DEFAULT_MAX_WORKERS, default_workers

DESCRIPTION = (
    "Greedy responses to benchmark prompts, scored by the RLVR verifiers (the reward the same response earns "
    "in training). Tasks: gsm8k (8-shot CoT), math (4-shot Minerva), ifeval (zero-shot, strict), tiny_arith, "
    "tiny_if, or NAME=PATH for a file of RLVR rows (messages or prompt, ground_truth, dataset). Benchmarks read "
    "--data-dir/gsm8k/test.jsonl|.parquet, math/test.jsonl|.parquet, ifeval/input_data.jsonl|.parquet; "
    "without --data-dir, small hand-written bundled samples (not benchmark items). Prints one row per task; "
    "--out DIR keeps TASK.jsonl (per item) and summary.json, and a restarted run resumes them."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `eval` subcommand's flags."""
    p.add_argument("--model", required=True, help="Hugging Face model folder (tokenizer and, for local, weights)")
    p.add_argument(
        "--tasks", required=True, help="comma-separated: gsm8k, math, ifeval, tiny_arith, tiny_if or NAME=PATH"
    )
    p.add_argument("--backend", choices=("local", "vllm"), default="local")
    p.add_argument("--servers", help="vLLM server URLs, comma-separated (backend vllm)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task")
    p.add_argument(
        "--out",
        default=None,
        help="folder for TASK.jsonl, summary.json and settings.json (the settings its rows were made with); "
        "a rerun with the same settings resumes it",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete what an earlier eval and this run's tasks wrote in --out first"
    )
    p.add_argument("--data-dir", default=None, help="folder holding gsm8k/, math/, ifeval/ (see the description)")
    p.add_argument(
        "--chat-template",
        choices=("tulu", "model"),
        default="tulu",
        help="tulu: Tülu's template; model: the model folder's own chat template",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="generation budget per response (default: 512 for benchmarks and files, 128 for the tiny tasks)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="prompts per backend call and output flush (default: %(default)s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"verifier processes (default: CPU cores, at most {DEFAULT_MAX_WORKERS})",
    )
    p.add_argument(
        "--timeout-s", type=float, default=10.0, help="seconds a verifier may take per response (default: %(default)s)"
    )
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="compute dtype of the local sampler")
    p.add_argument(
        "--mesh",
        default=None,
        help="data,fsdp,tensor device mesh of the local sampler (e.g. 2,2,2 or -1,1,1). Default: one device",
    )


def _check_numbers(args) -> None:
    for flag, value, low in (
        ("--limit", args.limit, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 1),
    ):
        if value is not None and value < low:
            raise InputError(f"{flag} {value}: must be >= {low}")
    if not (math.isfinite(args.timeout_s) and args.timeout_s > 0):  # the verifiers' deadline must be a real time
        raise InputError(f"--timeout-s {args.timeout_s}: must be a finite number > 0")


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: is a file, expected a folder")
    check_writable_output(os.path.join(out, "summary.json"), "--out")


def _load_tasks(args) -> list:
    from tulu_jax.evaluation.tasks import load_task, parse_task_spec

    specs = [s.strip() for s in args.tasks.split(",") if s.strip()]
    if not specs:
        raise InputError(f"--tasks {args.tasks!r}: no task named")
    try:
        names = [parse_task_spec(s)[0] for s in specs]
    except ValueError as e:
        raise InputError(f"--tasks: {e}") from None
    if len(set(names)) != len(names):
        raise InputError(f"--tasks {args.tasks}: a task is named twice")
    return [load_task(s, args.data_dir, args.limit) for s in specs]


def _prompt_ids(tasks, tokenizer, template: str, max_tokens: dict[str, int], max_positions: int) -> dict:
    from tulu_jax.data.chat import check_chat_template, prompt_token_ids

    check_chat_template(tokenizer, template, "--chat-template")
    out = {}
    for task in tasks:
        try:
            ids = [prompt_token_ids(item.messages, tokenizer, template=template) for item in task.items]
        except InputError:  # already names the flag and the folder (e.g. a tokenizer without a template)
            raise
        except (KeyError, ValueError) as e:
            raise InputError(
                f"--chat-template {template}: cannot render the prompts of task {task.name}: {e}"
            ) from None
        for item, row in zip(task.items, ids):
            if len(row) + max_tokens[task.name] > max_positions:
                raise InputError(
                    f"{item.where}: the prompt has {len(row)} tokens; with max tokens {max_tokens[task.name]} it "
                    f"exceeds the model's {max_positions} positions (lower --max-tokens)"
                )
        out[task.name] = ids
    return out


def _check_inputs_are_not_outputs(tasks, out: str) -> None:
    """An input file that is also one of the run's outputs would be overwritten (or deleted by --overwrite)."""
    from tulu_jax.evaluation.tasks import BUILTIN

    outputs = {os.path.realpath(os.path.join(out, n)) for n in ("settings.json", "summary.json")}
    outputs |= {os.path.realpath(os.path.join(out, f"{t.name}.jsonl")) for t in tasks}
    for task in tasks:
        if os.path.realpath(task.path) in outputs:
            named = f"--data-dir {task.path}" if task.name in BUILTIN else f"--tasks {task.name}={task.path}"
            raise InputError(f"{named}: the task's file is also an output in --out; use another --out")


def run(args, overrides) -> int:
    """Checks every flag, loads the tasks and renders their prompts, loads the backend, checks --out, and
    only then writes anything: generates, scores, writes and prints. Bad flags, paths and rows raise
    InputError / DataError / FileNotFoundError (exit 2)."""
    if overrides:
        raise InputError(f"eval takes no key=value overrides, got {overrides}")
    _check_numbers(args)
    check_backend_flags(args.backend, args.servers, args.mesh)
    check_model_dir(args.model, "--model", weights=args.backend == "local")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise InputError(f"--data-dir {args.data_dir}: no such directory")
    if args.out is not None:
        _check_out(args.out)
    tokenizer = load_chat_tokenizer(args.model, "--model")
    mesh_shape = parse_mesh(args.mesh)
    tasks = _load_tasks(args)
    if args.out is not None:
        _check_inputs_are_not_outputs(tasks, args.out)

    from tulu_jax.evaluation import runner
    from tulu_jax.models import hf

    max_tokens = {t.name: args.max_tokens or t.max_tokens for t in tasks}
    max_positions = hf.load_hf_config(args.model).max_position_embeddings
    prompt_ids = _prompt_ids(tasks, tokenizer, args.chat_template, max_tokens, max_positions)
    model = os.path.abspath(args.model)
    settings = runner.RunSettings(
        model=model,
        chat_template=args.chat_template,
        dtype=args.dtype,
        weights=runner.weights_fingerprint(args.model),
        backend=args.backend,
        servers=tuple(u.strip().rstrip("/") for u in (args.servers or "").split(",") if u.strip()),
        batch_size=args.batch_size,
        timeout_s=args.timeout_s,
    )
    if args.out is not None and not args.overwrite:  # refuse foreign or stale rows before any compute
        runner.check_settings(args.out, settings, max_tokens)
        for task in tasks:
            runner.resume_rows(os.path.join(args.out, f"{task.name}.jsonl"), task, prompt_ids[task.name])

    from tulu_jax.generate import make_backend
    from tulu_jax.rewards.scorer import Scorer

    backend, tokenizer = make_backend(  # probes vLLM servers: a dead one fails here, before anything is written
        args.backend, args.model, servers=args.servers, dtype=args.dtype, mesh_shape=mesh_shape, tokenizer=tokenizer
    )
    if args.out is not None:
        if args.overwrite:
            runner.clear_outputs(args.out, [t.name for t in tasks])
        runner.record_settings(args.out, settings, max_tokens)
        # until a task is done its entry says so: a killed run's summary is not mistaken for a finished one
        runner.write_summary(args.out, model, {t.name: {"complete": False} for t in tasks})
    summaries = {}
    workers = args.workers or default_workers()
    with Scorer(workers=workers, timeout_s=args.timeout_s) as scorer:
        for task in tasks:
            out_path = None if args.out is None else os.path.join(args.out, f"{task.name}.jsonl")
            rows = runner.evaluate_task(
                task,
                prompt_ids[task.name],
                backend,
                tokenizer,
                scorer,
                max_tokens=max_tokens[task.name],
                batch_size=args.batch_size,
                out_path=out_path,
            )
            summaries[task.name] = runner.summarize(task, rows, max_tokens[task.name])
            if args.out is not None:  # after each task, so a later kill keeps the finished tasks' summary
                runner.write_summary(args.out, model, {task.name: summaries[task.name]})
    print(runner.format_table(summaries))
    return 0
