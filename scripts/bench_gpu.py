#!/usr/bin/env python
"""One-GPU benchmark: MFU and tokens/s of our SFT and DPO train steps, and the local sampler's decode rate.

    python scripts/bench_gpu.py [--size bench-1b] [--seq-len 2048] [--batch 8] [--pairs 4] [--steps 5]
                                [--peak-flops 790e12] [--decode-batches 1,64] [--json OUT] [--dry-run]
    (or scripts/bench_gpu.sh, which sets the environment and installs carried wheels first)

Rows (about 5-8 minutes on one H100/H200 with the defaults, compilation included):
  * sft, remat off / on: `tulu_jax.train.sft_step.jit_sft_step` on a ~1.2B Llama-3-style model (preset
    bench-1b: vocab 128,256, hidden 2048, 16 layers, tied embeddings), bfloat16 compute, float32 master
    weights and AdamW state, Tülu 3's sum reduction, `--batch` sequences of `--seq-len` tokens, next-token
    log-probs through the chunked LM head (`tulu_jax.losses.logps`, `--logits-chunk` 512 positions).
  * dpo, remat off / on: `tulu_jax.train.dpo_step.jit_dpo_step`, dpo_norm with β = 5 and cached reference
    log-probs, `--pairs` pairs of 2 x `--seq-len` tokens.
  * decode, batch 1 and 64: `LocalSampler` (tulu_jax/sampling) generating `--new-tokens` tokens after a
    `--prompt-len`-token prompt, stop tokens off; decode tokens/s excludes the prefill.
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
ROWS = ("sft", "dpo", "decode")
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
    ap.add_argument("--rows", default=",".join(ROWS), help="which of sft,dpo,decode to run (default all)")
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the rows and the setup here")
    ap.add_argument("--dry-run", action="store_true", help="tiny model and sizes: a pipeline check in seconds")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.size, args.seq_len, args.batch, args.pairs = "tiny", 32, 2, 1
        args.steps, args.warmup, args.attention_block = 2, 0, 0
        args.prompt_len, args.new_tokens = 8, 4
    args.rows = [r for r in args.rows.split(",") if r]
    for r in args.rows:
        if r not in ROWS:
            ap.error(f"--rows: {r!r} is not one of {', '.join(ROWS)}")
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    if min([args.steps, args.batch, args.pairs, args.seq_len - 1, args.new_tokens, *args.decode_batches]) < 1:
        ap.error("--steps, --batch, --pairs, --new-tokens and --decode-batches must be >= 1, --seq-len >= 2")
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


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per row; step rows have MFU, decode rows the decode time."""
    head = "| row | tokens/s | MFU | step or decode s | note |"
    lines = [head, "|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | - | - | - | FAILED: {r['error']} |")
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
        f"SFT batch {args.batch}, DPO {args.pairs} pairs; logits chunk {args.logits_chunk}; "
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
    rows, t0 = [], time.perf_counter()
    for name, job in jobs:
        t = time.perf_counter()
        try:
            row = job()
        except Exception as e:  # noqa: BLE001 - report the row, keep measuring the others
            traceback.print_exc()
            row = dict(row=name, task=name.split()[0], error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        row["wall_s"] = time.perf_counter() - t
        print(f"# {name}: done in {row['wall_s']:.0f} s", flush=True)
        rows.append(row)
    print()
    print(format_table(rows))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        setup = dict(jax_version=jax.__version__, device=dev.device_kind, platform=dev.platform, argv=sys.argv,
                     size=args.size, params=cfg.num_params, seq_len=args.seq_len, batch=args.batch, pairs=args.pairs,
                     logits_chunk=args.logits_chunk, peak_flops=args.peak_flops)  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(dict(setup=setup, rows=rows), f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


# scripts/benchlib.py lives next to this file; a test may load this module without that on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
