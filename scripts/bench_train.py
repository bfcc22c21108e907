#!/usr/bin/env python
"""SFT train-step throughput: our jitted JAX step against transformers + PyTorch, on this machine, in one run.

    python scripts/bench_train.py [--sizes bench-15m,bench-40m,bench-100m] [--batch 4] [--seq-len 512]
                                  [--steps 4] [--warmup 1] [--rounds 4] [--dtype float32,bfloat16]
                                  [--xla-flags "..."] [--no-tuned] [--json OUT]

For each model size and compute dtype it times, with the same architecture and batch shape:
  * jax:   tulu_jax's jitted SFT step (forward, sum-reduced masked cross entropy, backward,
           global-norm clip, AdamW), parameters and optimizer in float32, compute in `dtype`;
  * torch: transformers' LlamaForCausalLM built from the same DecoderConfig, the same loss, backward,
           clip_grad_norm_ and torch.optim.AdamW (bf16: float32 parameters under torch.autocast);
  * peak:  a square float32 / bfloat16 matrix multiply in JAX and in PyTorch (GFLOP/s).
The timed steps run in `--rounds` rounds that alternate JAX steps, PyTorch steps and peak samples, so a
load change on a shared machine hits all of them alike; each figure is the median over its samples
(the warm-up steps are not timed). Model FLOPs are `DecoderConfig.flops_per_token(seq_len)` (6 x matmul
parameters + 12 L T N H for attention, i.e. forward + backward), the same figure for both frameworks.
"% jax pk" is our achieved FLOP/s over the JAX float32 matmul peak measured in the same rounds (for
bf16 too: XLA:CPU upcasts bf16 dots to float32, so that is its ceiling); "jax % torch pk" is the same
achieved FLOP/s over PyTorch's matmul peak of that dtype ("torch pk"; bf16 uses AMX there), and
"torch % pk" is PyTorch's own step against it.

XLA settings: DEFAULT_XLA_FLAGS (process-wide; appended to any XLA_FLAGS in the environment before jax is
imported; `--xla-flags` replaces them) and DEFAULT_COMPILER_OPTIONS (per compute dtype, passed to that
step's compilation; `--no-tuned` drops them). Both hold only what measurably helped on the 2-core Sapphire
Rapids this was tuned on; the comment above them lists what was tried and what it did. The header prints
what a run used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# XLA settings, measured with jaxlib 0.10.2 on the 2-core Xeon (Sapphire Rapids: AVX-512 + AMX) this
# was written on, by in-process interleaved A/B runs of the whole step.
#
# Process-wide XLA_FLAGS: none of those tried held up (numbers are step speed vs. the default):
#   --xla_cpu_use_onednn / --xla_cpu_experimental_onednn_custom_call: no effect on their own (dots stay in YNNPACK);
#   ... plus --xla_cpu_experimental_onednn_fusion_type=dot with YNN dots removed: the step aborts
#       ("partition compile failed"); oneDNN also gets bf16 dots only after they are upcast to f32;
#   --xla_cpu_experimental_ynn_fusion_type= (empty: Eigen dots): -5..-15%; Eigen is ~10% faster than YNNPACK on
#       isolated matmuls, but not inside the step;
#   --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY(_SLINKY): -3..+0% (noise);
#   --xla_cpu_enable_fast_math, --xla_cpu_prefer_vector_width=512, --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME,
#   --xla_cpu_scheduler_type=..., --xla_cpu_use_fusion_emitters=false: within +-3% (noise);
#   --xla_cpu_experimental_enable_tiling_propagation: -40%;  --xla_cpu_use_thunk_runtime=false: deprecated, ignored;
#   --xla_cpu_max_isa=AMX: bf16 dots are still upcast to f32 (XLA:CPU has no bf16 matmul here).
# Per-dtype compiler options (jax `.compile(compiler_options=...)`, i.e. only for that dtype's step):
#   float32: YNNPACK also for elementwise fusions (individual_dot,reduce are its defaults; the XLA_FLAGS
#            spelling is --xla_cpu_experimental_ynn_fusion_type=+eltwise): +4% (100M) .. +15% (15M);
#   bfloat16: the same option costs 15-25%, so bf16 keeps XLA's defaults.
DEFAULT_XLA_FLAGS = ""
_YNN = "LIBRARY_FUSION_TYPE_"
DEFAULT_COMPILER_OPTIONS = {
    "float32": {"xla_cpu_experimental_ynn_fusion_type": f"{_YNN}INDIVIDUAL_DOT,{_YNN}ELTWISE,{_YNN}REDUCE"},
    "bfloat16": {},
}

SIZES = "bench-15m,bench-40m,bench-100m"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default=SIZES, help=f"comma-separated model presets (default {SIZES})")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per framework, size and dtype (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation (default 1)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="interleaving rounds the timed steps are split into (default 4, at most --steps)",
    )
    ap.add_argument("--dtype", default="float32,bfloat16", help="compute dtypes, comma-separated (default both)")
    ap.add_argument("--peak-n", type=int, default=2048, help="square matmul size of the peak measurement")
    ap.add_argument("--peak-reps", type=int, default=3, help="matmuls per peak sample (one sample per round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument(
        "--xla-flags", default=None, help='XLA flags to use instead of the script\'s defaults ("" for none)'
    )
    ap.add_argument(
        "--tuned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile each dtype's step with DEFAULT_COMPILER_OPTIONS (default on)",
    )
    ap.add_argument(
        "--torch-fused-adamw",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.optim.AdamW(fused=True), PyTorch's fastest CPU AdamW (default on)",
    )
    ap.add_argument("--torch-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    ap.add_argument("--no-torch", action="store_true", help="time only the JAX step")
    ap.add_argument(
        "--in-one-process",
        action="store_true",
        help="measure every size and framework in this process (default: one child process each)",
    )
    ap.add_argument("--no-jax", action="store_true", help="time only the PyTorch step")
    ap.add_argument(
        "--scan-unroll",
        type=int,
        default=-1,
        help="layers per scan iteration in our model (-1: all, i.e. fully unrolled; default)",
    )
    ap.add_argument(
        "--attention-block",
        type=int,
        default=128,
        help="query block of our causal attention (0: full T x T scores; default 128)",
    )
    ap.add_argument("--json", metavar="OUT", default=None, help="also write the rows (and the run's setup) here")
    args = ap.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.dtype = [d for d in args.dtype.split(",") if d]
    for d in args.dtype:
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtype: {d!r} is not float32 or bfloat16")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    args.rounds = min(args.rounds, args.steps)
    return args


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _median(xs):
    import numpy as np

    return float(np.median(xs)) if xs else float("nan")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.in_one_process and (len(args.sizes) > 1 or not (args.no_torch or args.no_jax)):
        return _run_isolated(args, sys.argv[1:] if argv is None else list(argv))
    flags = DEFAULT_XLA_FLAGS if args.xla_flags is None else args.xla_flags
    if "jax" in sys.modules:
        print("warning: jax was imported before the XLA flags were set; they may not apply", file=sys.stderr)
    os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # PyTorch's OpenMP threads spin-wait after each op and steal the cores from the XLA step that follows
    # (measured: our 100M step 8.4 s -> 7.2 s with PASSIVE, PyTorch's own step unchanged at 4.5 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import jax

    from tulu_jax import bench
    from tulu_jax.models.config import preset

    torch = None
    if not args.no_torch:
        import torch
        import transformers

        torch.set_num_threads(args.threads or os.cpu_count())

    cores = os.cpu_count()
    print(
        f"# bench_train: {_cpu_name()}, {cores} cores; jax {jax.__version__} ({jax.default_backend()}, "
        f"{len(jax.devices())} device)"
        + (
            ""
            if torch is None
            else f"; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}"
        )
    )
    compiler_options = {d: (DEFAULT_COMPILER_OPTIONS.get(d, {}) if args.tuned else {}) for d in args.dtype}
    print(f"# XLA_FLAGS={os.environ['XLA_FLAGS']!r}; per-dtype compiler options: {compiler_options}")
    print(
        f"# OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} (PyTorch's idle threads would otherwise spin on the cores)"
    )
    print(
        f"# ours: layer scan unroll={args.scan_unroll} (-1 = all layers), "
        f"causal attention query block={args.attention_block}"
    )
    if torch is not None:
        print(
            f"# torch: LlamaForCausalLM attn={args.torch_attn}, AdamW fused={args.torch_fused_adamw}, "
            f"bf16 = torch.autocast over float32 parameters"
        )
    print(
        f"# batch {args.batch} x seq {args.seq_len} = {args.batch * args.seq_len} tokens/step; {args.warmup} warm-up"
        f" + {args.steps} timed steps per framework in {args.rounds} interleaved rounds; peak: {args.peak_n}^2 "
        f"matmul, median of samples taken in the same rounds; load average at start "
        f"{os.getloadavg()[0]:.2f}",
        flush=True,
    )

    n = args.peak_n
    peak_flops = 2.0 * n**3
    peak_fns = {("jax", d): bench.jax_matmul(n, d) for d in ("float32", "bfloat16")}
    if torch is not None:
        peak_fns.update({("torch", d): bench.torch_matmul(n, d) for d in ("float32", "bfloat16")})
    all_peaks = {k: [] for k in peak_fns}
    torch_opts = bench.TorchOptions(attn_implementation=args.torch_attn, fused_adamw=args.torch_fused_adamw)

    rows = []
    tokens = args.batch * args.seq_len
    t_start = time.perf_counter()
    for size in args.sizes:
        cfg = preset(size)
        fpt = cfg.flops_per_token(args.seq_len)
        batch = bench.make_batch(cfg.vocab_size, args.batch, args.seq_len)
        runners = {}
        for d in args.dtype:
            if not args.no_jax:
                j = bench.JaxSFTBench(
                    cfg,
                    batch,
                    d,
                    attention_block=args.attention_block,
                    scan_unroll=cfg.num_layers if args.scan_unroll < 0 else args.scan_unroll,
                )
                compile_s = j.compile(compiler_options[d] or None)
                runners[("jax", d)] = j
                for _ in range(args.warmup):
                    j()
                print(f"# {size} {d}: jax compiled in {compile_s:.1f}s, first loss {j.loss():.1f}", flush=True)
            if torch is not None:
                t = bench.TorchSFTBench(cfg, batch, d, torch_opts)
                runners[("torch", d)] = t
                for _ in range(args.warmup):
                    t()
                print(f"# {size} {d}: torch warm, loss {t.loss():.1f}", flush=True)
        times = {k: [] for k in runners}
        peaks = {k: [] for k in peak_fns}
        for per_round in _split(args.steps, args.rounds):
            for k, f in peak_fns.items():
                if k[0] == "jax":
                    peaks[k] += bench.time_calls(f, args.peak_reps)
            for k, r in runners.items():
                times[k] += bench.time_calls(r, per_round)
            for k, f in peak_fns.items():
                if k[0] == "torch":
                    peaks[k] += bench.time_calls(f, args.peak_reps)
        for k, v in peaks.items():
            all_peaks[k] += v
        peak = {k: peak_flops / _median(v) / 1e9 for k, v in peaks.items()}
        for d in args.dtype:
            row = dict(
                size=size,
                params=cfg.num_params,
                dtype=d,
                batch=args.batch,
                seq_len=args.seq_len,
                flops_per_token=fpt,
                jax_peak_f32_gflop_s=peak[("jax", "float32")],
                jax_peak_bf16_gflop_s=peak[("jax", "bfloat16")],
            )
            if not args.no_jax:
                row.update(_step_fields("jax", times[("jax", d)], runners[("jax", d)], fpt * tokens, tokens))
            if torch is not None:
                row.update(_step_fields("torch", times[("torch", d)], runners[("torch", d)], fpt * tokens, tokens))
                row.update(
                    torch_peak_gflop_s=peak[("torch", d)],
                    torch_peak_f32_gflop_s=peak[("torch", "float32")],
                    torch_peak_bf16_gflop_s=peak[("torch", "bfloat16")],
                )
            _derive(row)
            rows.append(row)
            print(
                f"# {size} {d}:"
                + ("" if args.no_jax else f" jax {row['jax_step_s']:.3f}s/step")
                + ("" if torch is None else f" torch {row['torch_step_s']:.3f}s/step")
                + f"; jax fp32 peak {row['jax_peak_f32_gflop_s']:.0f} GFLOP/s",
                flush=True,
            )
        del runners
    elapsed = time.perf_counter() - t_start

    print()
    _print_table(rows, torch is not None, not args.no_jax)
    overall = {f"{fw}_{d}": peak_flops / _median(v) / 1e9 for (fw, d), v in all_peaks.items()}
    print(
        "\nmatmul peak over the whole run (median, GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in overall.items())
    )
    print(f"wall time {elapsed:.0f}s; load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        out = dict(
            argv=sys.argv,
            xla_flags=os.environ["XLA_FLAGS"],
            compiler_options=compiler_options,
            torch_fused_adamw=args.torch_fused_adamw,
            torch_attn=args.torch_attn,
            cpu=_cpu_name(),
            cores=cores,
            jax_version=jax.__version__,
            torch_version=None if torch is None else torch.__version__,
            batch=args.batch,
            seq_len=args.seq_len,
            steps=args.steps,
            warmup=args.warmup,
            rounds=args.rounds,
            peak_n=n,
            peak_gflop_s=overall,
            rows=rows,
        )
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _step_fields(fw: str, step_times: list[float], runner, flops: float, tokens: int) -> dict:
    """One framework's columns of a row: median step time and what follows from it."""
    t = _median(step_times)
    return {
        f"{fw}_step_s": t,
        f"{fw}_tok_s": tokens / t,
        f"{fw}_gflop_s": flops / t / 1e9,
        f"{fw}_step_s_all": step_times,
        f"{fw}_loss": runner.loss(),
    }


def _derive(row: dict) -> None:
    """The ratios, from whichever frameworks' figures the row holds."""
    if "jax_gflop_s" in row:
        row["pct_jax_peak"] = 100 * row["jax_gflop_s"] / row["jax_peak_f32_gflop_s"]
    if "jax_gflop_s" in row and "torch_gflop_s" in row:
        row["jax_over_torch"] = row["jax_tok_s"] / row["torch_tok_s"]
        row["pct_torch_peak"] = 100 * row["jax_gflop_s"] / row["torch_peak_gflop_s"]
    if "torch_gflop_s" in row:
        row["torch_pct_torch_peak"] = 100 * row["torch_gflop_s"] / row["torch_peak_gflop_s"]


def _run_isolated(args, argv: list[str]) -> int:
    """Each size, and each framework, in a child process of its own. Measured here: our 100M step took
    6.3 s alone, 7.2 s with PyTorch's step interleaved in the same process, 8.7 s after other sizes and
    dtypes had run there (allocator and thread-pool state left behind). Later options win in argparse,
    so the child's `--sizes`/`--json` simply go last."""
    import subprocess
    import tempfile

    def child(size: str, flag: str) -> list[dict]:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), *argv, flag, "--sizes", size, "--json", tmp.name]
            subprocess.run(cmd, check=True)
            with open(tmp.name) as f:
                return json.load(f)["rows"]

    rows = []
    for size in args.sizes:
        jax_rows = child(size, "--no-torch")
        torch_rows = child(size, "--no-jax") if not args.no_torch else [{}] * len(jax_rows)
        for j, t in zip(jax_rows, torch_rows, strict=True):
            row = {**t, **j}  # the JAX child's peak figures take precedence for the JAX columns
            _derive(row)
            rows.append(row)
    print("\n# all sizes; each size and framework measured in its own process:")
    _print_table(rows, not args.no_torch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _print_table(rows, with_torch: bool, with_jax: bool = True):
    cols = [("size", "{size}"), ("params", "{params_m:.1f}M"), ("dtype", "{dtype}")]
    if with_jax:
        cols += [("jax tok/s", "{jax_tok_s:.0f}")]
    if with_torch:
        cols += [("torch tok/s", "{torch_tok_s:.0f}")]
    if with_jax and with_torch:
        cols += [("jax/torch", "{jax_over_torch:.2f}x")]
    if with_jax:
        cols += [
            ("jax GFLOP/s", "{jax_gflop_s:.1f}"),
            ("jax fp32 pk", "{jax_peak_f32_gflop_s:.0f}"),
            ("% jax pk", "{pct_jax_peak:.0f}%"),
        ]
    if with_jax and with_torch:
        cols += [("jax % torch pk", "{pct_torch_peak:.0f}%")]
    if with_torch:
        cols += [
            ("torch GFLOP/s", "{torch_gflop_s:.1f}"),
            ("torch pk", "{torch_peak_gflop_s:.0f}"),
            ("torch % pk", "{torch_pct_torch_peak:.0f}%"),
        ]
    cells = [[fmt.format(params_m=r["params"] / 1e6, **r) for _, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.rjust(w) for x, w in zip(xs, widths)) + " |"
    print(line([h for h, _ in cols]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


if __name__ == "__main__":
    sys.exit(main())
