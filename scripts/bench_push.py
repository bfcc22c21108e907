#!/usr/bin/env python
"""Time a vLLM weight push: seconds per GB and per 1B parameters.

    python scripts/bench_push.py [--preset bench-1b | --params 0.5e9] [--dtype bfloat16 float32]
        [--dir /dev/shm /tmp] [--devices 8] [--reps 3] [--server URL | --vllm [--model DIR]] [--json PATH]

Write-only rows: a random model (a preset, or bench-1b's widths with as many layers as come closest to
--params) initialised on --devices devices, pushed through `weight_sync.publish_weights` (the transport a
`VLLMClient` push uses) into each --dir in each --dtype; the median of --reps pushes after one warm-up (the
first push compiles the conversions). Write+reload rows (--server URL of a running server, or --vllm to start
one on --model, default SmolLM2-135M from `tulu-jax get-smollm2`): the server's own model, loaded from its
folder, pushed by `VLLMClient.push_weights`: write, vLLM's pause/reload/resume, and the reload's share.

Prints a Markdown table; --json PATH writes {"setup": {...}, "rows": [{...}, ...]}. Run as every process of a
multi-process job (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set) the write rows time the
collective push: every process joins the gathers, process 0 writes and reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tulu_jax import multihost  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--preset", default=None, help="model preset (tulu_jax/models/config.py), e.g. bench-1b")
    size.add_argument("--params", type=float, default=None, help="about this many parameters (bench-1b widths)")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--dir", nargs="+", default=None, help="target folders (default: /dev/shm and the temp dir)")
    ap.add_argument("--devices", type=int, default=None, help="shard the params over this many devices (default all)")
    ap.add_argument("--reps", type=int, default=3, help="timed pushes per row, after one warm-up")
    server = ap.add_mutually_exclusive_group()
    server.add_argument("--server", default=None, help="URL of a running vLLM server (its model is pushed)")
    server.add_argument("--vllm", action="store_true", help="start a vLLM server on --model for the reload rows")
    ap.add_argument("--model", default=None, help="--vllm's model folder (default: SmolLM2-135M, get-smollm2)")
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.preset is None and args.params is None and not (args.server or args.vllm):
        args.preset = "bench-1b"
    return args


def sized_config(preset_name: str | None, params: float | None):
    """The preset, or bench-1b's widths with the layer count whose parameter count is closest to `params`."""
    from tulu_jax.models.config import preset

    if preset_name is not None:
        return preset(preset_name)
    one, two = preset("bench-1b", num_layers=1), preset("bench-1b", num_layers=2)
    per_layer = two.num_params - one.num_params
    layers = max(1, round((params - (one.num_params - per_layer)) / per_layer))
    return preset("bench-1b", num_layers=layers)


def _median_row(base: dict, runs: list[dict], params: int, nbytes: int) -> dict:
    row = dict(base, params=params, gb=nbytes / 1e9, reps=len(runs))
    for key in runs[0]:
        row[key] = statistics.median(r[key] for r in runs)
    total = row.get("total_s", row["write_s"])
    row["s_per_gb"] = total / (nbytes / 1e9)
    row["s_per_1b_params"] = total / (params / 1e9)
    if "load_s" in row:
        row["reload_share"] = row["load_s"] / total
    return row


def write_rows(cfg, dtypes, dirs, devices, reps) -> list[dict]:
    """Write-only pushes of a random `cfg` model sharded over `devices` devices (fsdp)."""
    import jax

    from tulu_jax.models.loading import build_model, init_params
    from tulu_jax.rollout.weight_sync import publish_weights, push_bytes
    from tulu_jax.sharding import make_mesh

    devs = jax.devices()[: devices or jax.device_count()]
    params = jax.block_until_ready(
        init_params(build_model(cfg), make_mesh(1, len(devs), 1, devices=devs), jax.random.key(0))
    )
    n = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    for dtype in dtypes:
        nbytes = push_bytes(cfg, dtype)
        for d in dirs:
            # Several processes (a job named by the environment): process 0 picks the folder and writes it.
            lead = jax.process_index() == 0
            work = multihost.broadcast_object(tempfile.mkdtemp(prefix="bench_push_", dir=d) if lead else None)
            try:
                runs = []
                for rep in range(reps + 1):
                    t = time.perf_counter()
                    publish_weights(params, cfg, os.path.join(work, f"push-{rep}"), dtype)
                    multihost.barrier(f"bench_push_{dtype}_{rep}")  # done when process 0 has written it
                    runs.append({"write_s": time.perf_counter() - t})
                    if lead:
                        shutil.rmtree(os.path.join(work, f"push-{rep}"))
            finally:
                if lead:
                    shutil.rmtree(work, ignore_errors=True)
            base = dict(row=f"write {dtype} {d}", task="push_write", dtype=dtype, dir=d, devices=len(devs))
            base["processes"] = jax.process_count()
            rows.append(_median_row(base, runs[1:], n, nbytes))
            print(f"# {rows[-1]['row']}: {rows[-1]['write_s']:.2f} s (first {runs[0]['write_s']:.2f} s)", flush=True)
    return rows


def reload_rows(url: str | None, model_dir: str | None, dtypes, dirs, reps) -> list[dict]:
    """`VLLMClient.push_weights` of the server's own model: write + pause/reload/resume."""
    import jax

    from tulu_jax.models import hf
    from tulu_jax.models.loading import build_model, load_params
    from tulu_jax.rollout.server import start_vllm_server
    from tulu_jax.rollout.vllm_client import VLLMClient
    from tulu_jax.rollout.weight_sync import push_bytes
    from tulu_jax.sharding import make_mesh

    server = None
    if url is None:
        if model_dir is None:
            from tulu_jax.models.smollm2 import ensure_smollm2

            model_dir = ensure_smollm2(None)
        server = start_vllm_server(model_dir, max_model_len=512)
        url = server.url
        print(f"# vLLM server on {model_dir} ready in {server.ready_s:.0f} s", flush=True)
    else:
        from tulu_jax.rollout.http import request_json as _http

        model_dir = _http(url.rstrip("/") + "/v1/models", timeout=60)["data"][0]["root"]
    try:
        cfg = hf.load_hf_config(model_dir)
        params = load_params(model_dir, build_model(cfg), make_mesh(devices=jax.devices()[:1]))
        n = sum(x.size for x in jax.tree.leaves(params))
        rows = []
        for dtype in dtypes:
            for d in dirs:
                work = tempfile.mkdtemp(prefix="bench_push_", dir=d)
                client = VLLMClient([url], eos_token_id=0, pad_token_id=0, cfg=cfg, weights_dir=work,
                                    weights_dtype=dtype, keep_folders=1)  # fmt: skip
                try:
                    runs = [client.push_weights(params, f"bench-{rep}") for rep in range(reps + 1)]
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                base = dict(row=f"write+reload {dtype} {d}", task="push_reload", dtype=dtype, dir=d, devices=1)
                rows.append(_median_row(base, runs[1:], n, push_bytes(cfg, dtype)))
                print(f"# {rows[-1]['row']}: {rows[-1]['total_s']:.2f} s", flush=True)
        return rows
    finally:
        if server is not None:
            server.stop()


def format_table(rows: list[dict]) -> str:
    """Markdown table, one line per row."""
    lines = [
        "| row | params | GB | write s | reload s | total s | s/GB | s/1B params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        load = f"{r['load_s']:.2f} ({100 * r['reload_share']:.0f}%)" if "load_s" in r else "-"
        total = r.get("total_s", r["write_s"])
        lines.append(
            f"| {r['row']} | {r['params'] / 1e9:.3f}B | {r['gb']:.2f} | {r['write_s']:.2f} | {load} | {total:.2f} "
            f"| {r['s_per_gb']:.2f} | {r['s_per_1b_params']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    multihost.initialize()  # a multi-process job when JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID say so
    import jax

    dirs = args.dir or [d for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]
    rows = []
    if args.preset is not None or args.params is not None:
        cfg = sized_config(args.preset, args.params)
        rows += write_rows(cfg, args.dtype, dirs, args.devices, args.reps)
    if args.server or args.vllm:
        rows += reload_rows(args.server, args.model, args.dtype, dirs, args.reps)
    if jax.process_index() != 0:
        return 0  # process 0 reports
    dev = jax.devices()[0]
    print(f"\n# bench_push: jax {jax.__version__}, {jax.device_count()} x {dev.platform} {dev.device_kind}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(format_table(rows))
    if args.json:
        setup = dict(jax_version=jax.__version__, platform=dev.platform, device=dev.device_kind, argv=sys.argv,
                     cpus=os.cpu_count())  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
