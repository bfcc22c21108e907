#!/usr/bin/env python
"""One-GPU benchmark: MFU and tokens/s of our SFT and DPO train steps, the local sampler's decode rate, and
the phase times of a two-stage RLVR step.

    python scripts/bench_gpu.py [--size bench-1b] [--seq-len 2048] [--batch 8] [--pairs 4] [--steps 5]
                                [--peak-flops 790e12] [--decode-batches 1,64] [--rlvr-prompts 64]
                                [--rlvr-prompt-len 128] [--rlvr-new-tokens 128] [--rows sft,dpo,decode,rlvr]
                                [--json OUT] [--dry-run]
    (or scripts/bench_gpu.sh, which sets the environment and installs carried wheels first)

Rows (about 6-10 minutes on one H100/H200 with the defaults, compilation included):
  * sft, remat off / on: `tulu_jax.train.sft_step.jit_sft_step` on a ~1.2B Llama-3-style model (preset
    bench-1b: vocab 128,256, hidden 2048, 16 layers, tied embeddings), bfloat16 compute, float32 master
    weights and AdamW state, Tülu 3's sum reduction, `--batch` sequences of `--seq-len` tokens, next-token
    log-probs through the chunked LM head (`tulu_jax.losses.logps`, `--logits-chunk` 512 positions).
  * dpo, remat off / on: `tulu_jax.train.dpo_step.jit_dpo_step`, dpo_norm with β = 5 and cached reference
    log-probs, `--pairs` pairs of 2 x `--seq-len` tokens.
  * decode, batch 1 and 64: `LocalSampler` (tulu_jax/sampling) generating `--new-tokens` tokens after a
    `--prompt-len`-token prompt, stop tokens off; decode tokens/s excludes the prefill.
  * rlvr generate / forward / update / push / step: one PPO step of RLVR (Tülu 3 §6) on the same model in the
    trainer's two stages (`benchlib.JaxRLVRBench`, built from `tulu_jax.train.rlvr_step`'s jitted pieces):
    stage 1 the local sampler generates `--rlvr-new-tokens` tokens for each of `--rlvr-prompts` random
    `--rlvr-prompt-len`-token prompts (temperature 1, stop tokens off); stage 2 the policy's, reference's and
    value model's forward passes and the PPO advantages ("forward"), then 4 epochs x 1 minibatch of value and
    policy updates ("update", Tülu 3's PPO settings), then the new policy copied to the sampler ("push").
    Seconds are medians over `--steps` steps after one untimed step (compilation) and `--warmup` more.
    tokens/s: generate and step = generated tokens per second; forward = sequence tokens (prompt + response)
    per second through the three forward passes; update = sequence tokens x epochs per second through the
    value and policy updates. Verifier scores are random stand-ins (no verifiers on the GPU machine).
MFU = model FLOPs per second / `--peak-flops`. Model FLOPs are `DecoderConfig.flops_per_token(seq_len)` per
trained token (6 x matmul parameters + attention, forward and backward; remat's recomputation is not
counted, as usual for MFU). The default peak, 790e12 bf16 FLOP/s, is what a PyTorch 8192^3 bf16 matmul
reaches on an H200 (its datasheet's dense figure is 989e12); pass `--peak-flops` for another GPU.
Each step figure is the median of `--steps` timed steps after `--warmup` untimed ones. A row that fails
(e.g. out of memory) is printed with its error and the others still run; the exit code is then 1.

Dependencies: jax (0.10 or 0.11, with CUDA), flax, optax, numpy. Nothing this imports pulls in grain,
tensorboardX, datasets or vLLM (tests/test_bench_gpu.py checks). Should a machine lack a wheel, carry it
in the git-ignored `wheels/` folder (keep it under 64 MiB) and let bench_gpu.sh install it, e.g.

    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 PACKAGE==VERSION -d wheels/

`--dry-run` runs every row on a tiny model, a few steps and tokens, on whatever device JAX has (the test
suite runs it on CPU): the numbers then only show that the pipeline works.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

PEAK_BF16_H200 = 790e12  # FLOP/s of a PyTorch 8192^3 bf16 matmul on one H200
ROWS = ("sft", "dpo", "decode", "rlvr")
RLVR_PHASES = ("generate", "forward", "update", "push", "step")
RLVR_NOTES = {
    "generate": "stage 1: {tokens:.0f} tokens generated",
    "forward": "policy + reference + value over {tokens:.0f} tokens, advantages",
    "update": "value + policy updates, {tokens:.0f} tokens ({epochs} epochs x {minibatches} minibatch(es))",
    "push": "new policy -> sampler (bf16 copy)",
    "step": "{prompts} prompts, {new_tokens_per_step:.0f} generated tokens; loss {loss:.4f}",
}
# --dry-run's model: the tiny preset cut to one narrow layer, so that its six compilations take seconds.
DRY_RUN_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=32)  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="bench-1b", help="model preset (tulu_jax/models/config.py; default bench-1b)")
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    ap.add_argument("--batch", type=int, default=8, help="SFT sequences per step (default 8)")
    ap.add_argument("--pairs", type=int, default=4, help="DPO pairs per step, 2 sequences each (default 4)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling (default 1)")
    ap.add_argument("--attention-block", type=int, default=512, help="causal attention query block (0: full)")
    ap.add_argument(
        "--logits-chunk", type=int, default=512, help="positions per chunk of the LM head (model.logits_chunk default)"
    )
    ap.add_argument("--peak-flops", type=float, default=PEAK_BF16_H200, help="peak bf16 FLOP/s (default 790e12)")
    ap.add_argument("--decode-batches", default="1,64", help="sampler batch sizes (default 1,64)")
    ap.add_argument("--prompt-len", type=int, default=128, help="sampler prompt tokens (default 128)")
    ap.add_argument("--new-tokens", type=int, default=256, help="sampler tokens generated per row (default 256)")
    ap.add_argument("--rlvr-prompts", type=int, default=64, help="RLVR prompts per step, 1 sample each (default 64)")
    ap.add_argument("--rlvr-prompt-len", type=int, default=128, help="RLVR prompt tokens (default 128)")
    ap.add_argument("--rlvr-new-tokens", type=int, default=128, help="RLVR tokens generated per prompt (default 128)")
    ap.add_argument("--rows", default=",".join(ROWS), help="which of sft,dpo,decode,rlvr to run (default all)")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the rows and the setup here")
    ap.add_argument("--dry-run", action="store_true", help="tiny model and sizes: a pipeline check in seconds")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.size, args.seq_len, args.batch, args.pairs = "tiny", 32, 2, 1
        args.steps, args.warmup, args.attention_block = 2, 0, 0
        args.prompt_len, args.new_tokens = 8, 4
        args.rlvr_prompts, args.rlvr_prompt_len, args.rlvr_new_tokens = 4, 8, 4
    args.rows = [r for r in args.rows.split(",") if r]
    for r in args.rows:
        if r not in ROWS:
            ap.error(f"--rows: {r!r} is not one of {', '.join(ROWS)}")
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    sizes = [args.steps, args.batch, args.pairs, args.seq_len - 1, args.new_tokens, *args.decode_batches]
    if min(sizes + [args.rlvr_prompts, args.rlvr_prompt_len, args.rlvr_new_tokens]) < 1:
        ap.error("--steps, --batch, --pairs, --new-tokens, --decode-batches and --rlvr-* must be >= 1, --seq-len >= 2")
    if args.peak_flops <= 0:
        ap.error("--peak-flops must be > 0")
    return args


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _time_step(bench, args) -> float:
    """Compiles, warms up, and returns the median wall time of `args.steps` steps."""
    bench.compile()
    for _ in range(args.warmup):
        bench()
    times = benchlib.time_calls(bench, args.steps)
    if not math.isfinite(bench.loss()):
        raise FloatingPointError(f"non-finite loss {bench.loss()}")
    return _median(times)


def step_row(task: str, remat: bool, cfg, args) -> dict:
    """One train-step row: step time, tokens/s, MFU."""
    step_kwargs = dict(
        dtype="bfloat16", remat=remat, attention_block=args.attention_block, logits_chunk=args.logits_chunk
    )
    if task == "sft":
        batch = benchlib.make_batch(cfg.vocab_size, args.batch, args.seq_len)
        bench = benchlib.JaxSFTBench(cfg, batch, **step_kwargs)
        tokens = args.batch * args.seq_len
    else:
        batch = benchlib.make_pair_batch(cfg.vocab_size, args.pairs, args.seq_len)
        bench = benchlib.JaxDPOBench(cfg, batch, **step_kwargs)
        tokens = 2 * args.pairs * args.seq_len
    step_s = _time_step(bench, args)
    flops = cfg.flops_per_token(args.seq_len) * tokens
    return dict(
        row=f"{task} remat={'on' if remat else 'off'}",
        task=task,
        remat=remat,
        tokens_per_step=tokens,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        mfu=flops / step_s / args.peak_flops,
        loss=bench.loss(),
    )


def decode_row(batch: int, cfg, args) -> dict:
    """The local sampler's decode rate at `batch` rows (its bfloat16 copy of the weights, bfloat16 KV cache),
    every row generating exactly `--new-tokens` tokens."""
    import jax
    from bench_generate import time_decode  # scripts/bench_generate.py

    from tulu_jax.models.loading import build_model, init_params
    from tulu_jax.sampling.sampler import LocalSampler
    from tulu_jax.sharding import make_mesh

    mesh = make_mesh(devices=jax.devices()[:1])
    model = build_model(cfg, dtype="bfloat16", param_dtype="float32")
    params = init_params(model, mesh, jax.random.key(0))
    sampler = LocalSampler(model, params, mesh, eos_token_id=0, pad_token_id=0)
    stats = time_decode(sampler, batch, args.prompt_len, args.new_tokens)
    return dict(
        row=f"decode batch={batch}",
        task="decode",
        batch=batch,
        new_tokens=int(stats["new_tokens"]),
        prefill_s=stats["prefill_s"],
        decode_s=stats["decode_s"],
        tokens_per_s=stats["decode_tokens_per_s"],
    )


def rlvr_rows(cfg, args) -> list[dict]:
    """The RLVR rows: one per phase of `RLVR_PHASES`, each with the median seconds over the timed steps."""
    bench = benchlib.JaxRLVRBench(
        cfg,
        prompts=args.rlvr_prompts,
        prompt_len=args.rlvr_prompt_len,
        new_tokens=args.rlvr_new_tokens,
        dtype="bfloat16",
        attention_block=args.attention_block,
        logits_chunk=args.logits_chunk,
    )
    for _ in range(1 + args.warmup):  # the first step compiles every piece
        bench()
    steps = [bench() for _ in range(args.steps)]
    if not math.isfinite(bench.loss()):
        raise FloatingPointError(f"non-finite loss {bench.loss()}")
    new_tokens = _median([s["new_tokens"] for s in steps])
    seq_tokens = args.rlvr_prompts * (bench.shapes.width + args.rlvr_new_tokens)  # N x (P + T)
    tokens = dict(generate=new_tokens, forward=seq_tokens, update=seq_tokens * bench.cfg.epochs, push=0,
                  step=new_tokens)  # fmt: skip
    rows = []
    for phase in RLVR_PHASES:
        seconds = _median([s[f"{phase}_s"] for s in steps])
        rows.append(dict(row=f"rlvr {phase}", task="rlvr", phase=phase, seconds=seconds, tokens=tokens[phase],
                         tokens_per_s=tokens[phase] / seconds if tokens[phase] else None))  # fmt: skip
    rows[RLVR_PHASES.index("update")].update(epochs=bench.cfg.epochs, minibatches=bench.cfg.minibatches)
    rows[-1].update(prompts=args.rlvr_prompts, new_tokens_per_step=new_tokens, loss=bench.loss())
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per row; step rows have MFU, decode rows the decode time, RLVR rows the
    seconds of their phase."""
    head = "| row | tokens/s | MFU | step or decode s | note |"
    lines = [head, "|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | - | - | - | FAILED: {r['error']} |")
        elif r["task"] == "rlvr":
            rate = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
            note = RLVR_NOTES[r["phase"]].format(**r)
            lines.append(f"| {r['row']} | {rate} | - | {r['seconds']:.3f} | {note} |")
        elif r["task"] == "decode":
            note = f"{r['new_tokens']} new tokens, prefill {r['prefill_s']:.3f} s"
            lines.append(f"| {r['row']} | {r['tokens_per_s']:.1f} | - | {r['decode_s']:.3f} | {note} |")
        else:
            note = f"{r['tokens_per_step']} tokens/step, loss {r['loss']:.4f}"
            lines.append(
                f"| {r['row']} | {r['tokens_per_s']:.1f} | {100 * r['mfu']:.1f}% | {r['step_s']:.3f} | {note} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from tulu_jax.models.config import preset

    cfg = preset(args.size, **(DRY_RUN_MODEL if args.dry_run else {}))
    dev = jax.devices()[0]
    header = (
        f"# bench_gpu: jax {jax.__version__}, {dev.platform} {dev.device_kind}; model {args.size} "
        f"({cfg.num_params / 1e9:.3f}B params), bf16 compute, float32 weights + AdamW; seq {args.seq_len}, "
        f"SFT batch {args.batch}, DPO {args.pairs} pairs; RLVR {args.rlvr_prompts} prompts x "
        f"{args.rlvr_prompt_len} + {args.rlvr_new_tokens} tokens; logits chunk {args.logits_chunk}; "
        f"peak {args.peak_flops:.3g} FLOP/s"
    )
    print(header, flush=True)
    jobs = []
    for task in ("sft", "dpo"):
        if task in args.rows:
            jobs += [(f"{task} remat={'on' if r else 'off'}", lambda t=task, r=r: step_row(t, r, cfg, args))
                     for r in (False, True)]  # fmt: skip
    if "decode" in args.rows:
        jobs += [(f"decode batch={b}", lambda b=b: decode_row(b, cfg, args)) for b in args.decode_batches]
    if "rlvr" in args.rows:
        jobs.append(("rlvr", lambda: rlvr_rows(cfg, args)))
    rows, t0 = [], time.perf_counter()
    for name, job in jobs:
        t = time.perf_counter()
        try:
            out = job()
        except Exception as e:  # noqa: BLE001 - report the row, keep measuring the others
            traceback.print_exc()
            out = dict(row=name, task=name.split()[0], error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        out = out if isinstance(out, list) else [out]
        wall = time.perf_counter() - t
        for row in out:
            row["wall_s"] = wall  # the job's: an RLVR row shares it with its other phases
        print(f"# {name}: done in {wall:.0f} s", flush=True)
        rows.extend(out)
    print()
    print(format_table(rows))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        setup = dict(jax_version=jax.__version__, device=dev.device_kind, platform=dev.platform, argv=sys.argv,
                     size=args.size, params=cfg.num_params, steps=args.steps, seq_len=args.seq_len, batch=args.batch,
                     pairs=args.pairs, logits_chunk=args.logits_chunk, peak_flops=args.peak_flops,
                     rlvr_prompts=args.rlvr_prompts, rlvr_prompt_len=args.rlvr_prompt_len,
                     rlvr_new_tokens=args.rlvr_new_tokens)  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(dict(setup=setup, rows=rows), f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


# scripts/benchlib.py lives next to this file; a test may load this module without that on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
