#!/usr/bin/env python
"""SFT and DPO train-step throughput: our jitted JAX steps against transformers + PyTorch, on this machine, in one run.

    python scripts/bench_train.py [--task sft,dpo] [--sizes bench-15m,bench-40m,bench-100m] [--batch 4]
                                  [--pairs 2] [--seq-len 512] [--dpo-reference cache|live]
                                  [--steps 4] [--warmup 1] [--rounds 4] [--dtype float32,bfloat16]
                                  [--xla-flags "..."] [--no-tuned] [--json OUT]

For each task, model size and compute dtype it times, with the same architecture and batch shape:
  * jax:   tulu_jax's jitted step, parameters and optimizer in float32, compute in `dtype`:
           sft: forward, sum-reduced masked cross entropy, backward, global-norm clip, AdamW;
           dpo: one forward of the 2P chosen+rejected rows, per-side summed log-probs of the response
           tokens, Tülu 3's length-normalized DPO loss (dpo_norm, beta 5) against cached reference
           log-probs that come with the batch (`--dpo-reference live`: a frozen reference forward runs in
           the step instead), backward, global-norm clip, AdamW;
  * torch: transformers' LlamaForCausalLM built from the same DecoderConfig, the same loss, backward,
           clip_grad_norm_ and torch.optim.AdamW (bf16: float32 parameters under torch.autocast). The DPO
           step starts from our initial weights, and the run fails if the two frameworks' first DPO loss or
           gradient norm differ by more than PARITY_TOL (they run in separate processes; the check is made
           on the merged rows);
  * peak:  a square float32 / bfloat16 matrix multiply in JAX and in PyTorch (GFLOP/s).
An SFT step takes `--batch` sequences of `--seq-len` tokens (loss on the second half of each); a DPO step
takes `--pairs` pairs, each side `--seq-len` tokens (a shared prompt as the first half, the labelled
response the second), i.e. 2 x pairs x seq-len tokens: the defaults give both tasks 2048 tokens a step.
The timed steps run in `--rounds` rounds that alternate JAX steps, PyTorch steps and peak samples, so a
load change on a shared machine hits all of them alike; each figure is the median over its samples
(the warm-up steps are not timed). Model FLOPs are `DecoderConfig.flops_per_token(seq_len)` (6 x matmul
parameters + 12 L T N H for attention, i.e. forward + backward), the same figure for both frameworks and
both tasks (DPO: over its 2 x pairs x seq-len tokens; with a live reference 4/3 of that, the reference's
forward included).
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
import sys
import time

from machine import cpu_model  # scripts/machine.py, next to this script (sys.path[0])

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
TASKS = ("sft", "dpo")
# The DPO step's first loss and pre-clip gradient norm, JAX against PyTorch from the same weights: (largest
# |loss difference|, largest relative gradient-norm difference) per compute dtype. Measured at 15M, 2 x 128
# tokens: float32 2e-6 and 6e-6, bfloat16 1e-3 and 5e-4 (bf16 rounds in different places in the two).
PARITY_TOL = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 2e-2)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--task", default=",".join(TASKS), help="train steps to time, comma-separated (default sft,dpo)")
    ap.add_argument("--sizes", default=SIZES, help=f"comma-separated model presets (default {SIZES})")
    ap.add_argument("--batch", type=int, default=4, help="SFT sequences per step (default 4)")
    ap.add_argument(
        "--pairs", type=int, default=2, help="DPO pairs per step, 2 sequences each (default 2: as many tokens as SFT)"
    )
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    ap.add_argument(
        "--dpo-reference",
        default="cache",
        choices=["cache", "live"],
        help="DPO reference log-probs: cached, given with the batch (default; Tülu 3's 70B run), or live: a "
        "frozen reference model's forward in every step",
    )
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
    args.task = [t for t in args.task.split(",") if t]
    for t in args.task:
        if t not in TASKS:
            ap.error(f"--task: {t!r} is not one of {', '.join(TASKS)}")
    if not args.task or not args.sizes:
        ap.error("--task and --sizes need at least one entry")
    args.dtype = [d for d in args.dtype.split(",") if d]
    for d in args.dtype:
        if d not in ("float32", "bfloat16"):
            ap.error(f"--dtype: {d!r} is not float32 or bfloat16")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    if args.batch < 1 or args.pairs < 1 or args.seq_len < 2:
        ap.error("--batch and --pairs must be >= 1, --seq-len >= 2")
    args.rounds = min(args.rounds, args.steps)
    return args


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _median(xs):
    import numpy as np

    return float(np.median(xs)) if xs else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.in_one_process and (len(args.sizes) > 1 or len(args.task) > 1 or not (args.no_torch or args.no_jax)):
        return _run_isolated(args, sys.argv[1:] if argv is None else list(argv))
    flags = DEFAULT_XLA_FLAGS if args.xla_flags is None else args.xla_flags
    if "jax" in sys.modules:
        print("warning: jax was imported before the XLA flags were set; they may not apply", file=sys.stderr)
    os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # PyTorch's OpenMP threads spin-wait after each op and steal the cores from the XLA step that follows
    # (measured: our 100M step 8.4 s -> 7.2 s with PASSIVE, PyTorch's own step unchanged at 4.5 s).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import benchlib as bench  # scripts/benchlib.py, next to this script (sys.path[0])
    import jax

    from tulu_jax.models.config import preset

    torch = None
    if not args.no_torch:
        import torch
        import transformers

        torch.set_num_threads(args.threads or os.cpu_count())

    cores = os.cpu_count()
    print(
        f"# bench_train: {cpu_model()}, {cores} cores; jax {jax.__version__} ({jax.default_backend()}, "
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
    for task in args.task:
        print(f"# {_task_caption(task, args.batch, args.pairs, args.seq_len, args.dpo_reference)}")
    print(
        f"# {args.warmup} warm-up + {args.steps} timed steps per framework in {args.rounds} interleaved rounds; "
        f"peak: {args.peak_n}^2 matmul, median of samples taken in the same rounds; load average at start "
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
    t_start = time.perf_counter()
    for size in args.sizes:
        cfg = preset(size)
        fpt = cfg.flops_per_token(args.seq_len)
        for task in args.task:
            live = task == "dpo" and args.dpo_reference == "live"
            if task == "sft":
                batch = bench.make_batch(cfg.vocab_size, args.batch, args.seq_len)
                tokens, examples = args.batch * args.seq_len, None
            else:
                batch = bench.make_pair_batch(cfg.vocab_size, args.pairs, args.seq_len)
                tokens, examples = 2 * args.pairs * args.seq_len, args.pairs
            # A live reference adds its forward: a third of forward + backward.
            flops = fpt * tokens * (4 / 3 if live else 1)
            label = f"{size} {task}"
            runners = {}
            for d in args.dtype:
                if not args.no_jax:
                    jax_cls, extra = (bench.JaxSFTBench, {}) if task == "sft" else (bench.JaxDPOBench, {"live": live})
                    j = jax_cls(
                        cfg,
                        batch,
                        d,
                        attention_block=args.attention_block,
                        scan_unroll=cfg.num_layers if args.scan_unroll < 0 else args.scan_unroll,
                        **extra,
                    )
                    compile_s = j.compile(compiler_options[d] or None)
                    runners[("jax", d)] = j
                    for _ in range(args.warmup):
                        j()
                    first = "" if args.warmup == 0 else f", first loss {_first_loss(j)}"
                    print(f"# {label} {d}: jax compiled in {compile_s:.1f}s{first}", flush=True)
                if torch is not None:
                    if task == "sft":
                        t = bench.TorchSFTBench(cfg, batch, d, torch_opts)
                    else:
                        t = bench.TorchDPOBench(cfg, batch, d, torch_opts, live=live)
                    runners[("torch", d)] = t
                    for _ in range(args.warmup):
                        t()
                    first = "" if args.warmup == 0 else f", first loss {_first_loss(t)}"
                    print(f"# {label} {d}: torch warm{first}", flush=True)
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
                    task=task,
                    size=size,
                    params=cfg.num_params,
                    dtype=d,
                    seq_len=args.seq_len,
                    tokens=tokens,
                    flops_per_token=fpt,
                    flops_per_step=flops,
                    jax_peak_f32_gflop_s=peak[("jax", "float32")],
                    jax_peak_bf16_gflop_s=peak[("jax", "bfloat16")],
                )
                if task == "sft":
                    row.update(batch=args.batch)
                else:
                    row.update(pairs=args.pairs, reference=args.dpo_reference, loss="dpo_norm", beta=5.0)
                for fw in ("jax", "torch"):
                    if (fw, d) in runners:
                        row.update(_step_fields(fw, times[(fw, d)], runners[(fw, d)], flops, tokens, examples))
                if torch is not None:
                    row.update(
                        torch_peak_gflop_s=peak[("torch", d)],
                        torch_peak_f32_gflop_s=peak[("torch", "float32")],
                        torch_peak_bf16_gflop_s=peak[("torch", "bfloat16")],
                    )
                _derive(row)
                rows.append(row)
                print(
                    f"# {label} {d}:"
                    + ("" if args.no_jax else f" jax {row['jax_step_s']:.3f}s/step")
                    + ("" if torch is None else f" torch {row['torch_step_s']:.3f}s/step")
                    + f"; jax fp32 peak {row['jax_peak_f32_gflop_s']:.0f} GFLOP/s",
                    flush=True,
                )
            del runners
    elapsed = time.perf_counter() - t_start

    print()
    _print_table(rows, torch is not None, not args.no_jax)
    failures = _parity_failures(rows)
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
            cpu=cpu_model(),
            cores=cores,
            jax_version=jax.__version__,
            torch_version=None if torch is None else torch.__version__,
            tasks=args.task,
            batch=args.batch,
            pairs=args.pairs,
            dpo_reference=args.dpo_reference,
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
    return _report_parity(failures)


def _task_caption(task: str, batch: int, pairs: int, seq_len: int, reference: str) -> str:
    if task == "sft":
        return f"SFT step: batch {batch} x seq {seq_len} = {batch * seq_len} tokens/step"
    return (
        f"DPO step (dpo_norm, beta 5, {reference} reference): {pairs} pairs x 2 sides x seq {seq_len} = "
        f"{2 * pairs * seq_len} tokens/step"
    )


def _first_loss(runner) -> str:
    first = getattr(runner, "first", None)
    if first is None:
        return f"{runner.loss():.1f}"
    return f"{first['loss']:.6f} (grad norm {first['grad_norm']:.4f})"


def _step_fields(fw: str, step_times: list[float], runner, flops: float, tokens: int, pairs: int | None) -> dict:
    """One framework's columns of a row: median step time and what follows from it."""
    t = _median(step_times)
    out = {
        f"{fw}_step_s": t,
        f"{fw}_tok_s": tokens / t,
        f"{fw}_gflop_s": flops / t / 1e9,
        f"{fw}_step_s_all": step_times,
        f"{fw}_loss": runner.loss(),
    }
    if pairs is not None:
        out[f"{fw}_pairs_s"] = pairs / t
    if getattr(runner, "first", None) is not None:
        out[f"{fw}_loss0"] = runner.first["loss"]
        out[f"{fw}_grad_norm0"] = runner.first["grad_norm"]
    return out


def _derive(row: dict) -> None:
    """The ratios, from whichever frameworks' figures the row holds."""
    if "jax_gflop_s" in row:
        row["pct_jax_peak"] = 100 * row["jax_gflop_s"] / row["jax_peak_f32_gflop_s"]
    if "jax_gflop_s" in row and "torch_gflop_s" in row:
        row["jax_over_torch"] = row["jax_tok_s"] / row["torch_tok_s"]
        row["pct_torch_peak"] = 100 * row["jax_gflop_s"] / row["torch_peak_gflop_s"]
    if "torch_gflop_s" in row:
        row["torch_pct_torch_peak"] = 100 * row["torch_gflop_s"] / row["torch_peak_gflop_s"]
    if "jax_loss0" in row and "torch_loss0" in row:
        row["loss0_abs_diff"] = abs(row["jax_loss0"] - row["torch_loss0"])
        row["grad_norm0_rel_diff"] = abs(row["jax_grad_norm0"] - row["torch_grad_norm0"]) / max(
            abs(row["torch_grad_norm0"]), 1e-30
        )


def _parity_failures(rows) -> list[str]:
    """The rows whose first DPO loss or gradient norm differ between the frameworks beyond PARITY_TOL."""
    out = []
    for r in rows:
        if "loss0_abs_diff" not in r:
            continue
        loss_tol, grad_tol = PARITY_TOL[r["dtype"]]
        if not (r["loss0_abs_diff"] <= loss_tol and r["grad_norm0_rel_diff"] <= grad_tol):
            out.append(
                f"{r['size']} {r['task']} {r['dtype']}: first loss jax {r['jax_loss0']:.6f} torch "
                f"{r['torch_loss0']:.6f} (|diff| {r['loss0_abs_diff']:.2e}, tol {loss_tol:.0e}); grad norm jax "
                f"{r['jax_grad_norm0']:.6f} torch {r['torch_grad_norm0']:.6f} (rel diff "
                f"{r['grad_norm0_rel_diff']:.2e}, tol {grad_tol:.0e})"
            )
    return out


def _report_parity(failures: list[str]) -> int:
    if failures:
        print("\nFAILED: the JAX and PyTorch DPO steps disagree on the same weights:", file=sys.stderr)
        for f in failures:
            print("  " + f, file=sys.stderr)
        return 1
    return 0


def _run_isolated(args, argv: list[str]) -> int:
    """Each size, and each framework, in a child process of its own. Measured here: our 100M step took
    6.3 s alone, 7.2 s with PyTorch's step interleaved in the same process, 8.7 s after other sizes and
    dtypes had run there (allocator and thread-pool state left behind). Later options win in argparse,
    so the child's `--sizes`/`--json` simply go last."""
    import subprocess
    import tempfile

    def child(size: str, task: str, flag: str) -> list[dict]:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--task", task, flag, "--sizes", size]
            subprocess.run([*cmd, "--json", tmp.name], check=True)
            with open(tmp.name) as f:
                return json.load(f)["rows"]

    rows = []
    for size in args.sizes:
        for task in args.task:
            jax_rows = child(size, task, "--no-torch") if not args.no_jax else None
            torch_rows = child(size, task, "--no-jax") if not args.no_torch else None
            jax_rows = jax_rows or [{}] * len(torch_rows)
            torch_rows = torch_rows or [{}] * len(jax_rows)
            for j, t in zip(jax_rows, torch_rows, strict=True):
                row = {**t, **j}  # the JAX child's peak figures take precedence for the JAX columns
                _derive(row)
                rows.append(row)
    print("\n# all sizes; each task, size and framework measured in its own process:")
    _print_table(rows, not args.no_torch, not args.no_jax)
    failures = _parity_failures(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv, rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return _report_parity(failures)


def _print_table(rows, with_torch: bool, with_jax: bool = True):
    """One table per task, in the order the tasks first appear."""
    for i, task in enumerate(dict.fromkeys(r.get("task", "sft") for r in rows)):
        task_rows = [r for r in rows if r.get("task", "sft") == task]
        r0 = task_rows[0]
        caption = _task_caption(task, r0.get("batch", 0), r0.get("pairs", 0), r0["seq_len"], r0.get("reference", ""))
        print(("\n" if i else "") + caption + ":")
        _print_task_table(task, task_rows, with_torch, with_jax)


def _print_task_table(task: str, rows, with_torch: bool, with_jax: bool):
    cols = [("size", "{size}"), ("params", "{params_m:.1f}M"), ("dtype", "{dtype}")]
    if task == "dpo":
        if with_jax:
            cols += [("jax pairs/s", "{jax_pairs_s:.2f}")]
        if with_torch:
            cols += [("torch pairs/s", "{torch_pairs_s:.2f}")]
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
    if task == "dpo" and with_jax:
        cols += [("jax loss0", "{jax_loss0:.5f}")]
    if task == "dpo" and with_jax and with_torch:
        cols += [("loss0 |diff|", "{loss0_abs_diff:.1e}")]
    cells = [[fmt.format(params_m=r["params"] / 1e6, **r) for _, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.rjust(w) for x, w in zip(xs, widths)) + " |"
    print(line([h for h, _ in cols]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


if __name__ == "__main__":
    sys.exit(main())
