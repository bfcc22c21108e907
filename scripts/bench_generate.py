#!/usr/bin/env python
"""Generation throughput: our in-process JAX sampler against transformers `generate` on the same weights,
and (with --vllm) a real vLLM server through our rollout client plus its weight-push time.

    python scripts/bench_generate.py [--model DIR | --preset tiny] [--batches 1,32] [--prompt-len 64]
                                     [--new-tokens 128] [--reps 3] [--no-torch] [--vllm] [--json OUT]

Both local engines decode greedily exactly --new-tokens tokens per row (no early stop) from random prompts
of --prompt-len tokens; the figure is new tokens / (prefill + decode) seconds, median over --reps timed
calls after one untimed warm-up (compilation). Without --model, a random model of --preset is exported to a
temporary Hugging Face folder with the bundled tokenizer, so both frameworks load the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle PyTorch threads would otherwise spin on the cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    """The command line above -> argparse.Namespace."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="Hugging Face folder (default: a random --preset model)")
    p.add_argument("--preset", default="tiny", help="architecture used when --model is not given")
    p.add_argument("--batches", default="1,32", help="batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="timed calls per engine and batch size")
    p.add_argument("--no-torch", action="store_true", help="skip transformers generate")
    p.add_argument("--vllm", action="store_true", help="also time a real vLLM server through our client")
    p.add_argument("--vllm-prompts", type=int, default=64, help="concurrent prompts sent to vLLM")
    p.add_argument("--json", dest="out", help="also write the rows here")
    return p.parse_args(argv)


def random_prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of `length` uniform token ids in [3, vocab)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, length).tolist() for _ in range(batch)]  # skip pad/eos-like low ids


def export_random_model(preset_name: str, out_dir: str) -> str:
    """A randomly initialised model of the preset, with the bundled tokenizer, as a Hugging Face folder."""
    import jax

    from tulu_jax.data import load_tokenizer
    from tulu_jax.models import hf
    from tulu_jax.models.config import preset
    from tulu_jax.models.loading import build_model, init_params
    from tulu_jax.sharding import make_mesh

    tok = load_tokenizer(None)
    cfg = preset(preset_name, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    params = init_params(build_model(cfg), make_mesh(devices=jax.devices()[:1]), jax.random.key(0))
    return hf.export_hf(params, cfg, out_dir, tokenizer=tok)


def time_decode(sampler, batch: int, prompt_len: int, new_tokens: int, *, temperature: float = 1.0, seed: int = 0):
    """Times `batch` random prompts of `prompt_len` tokens decoding exactly `new_tokens` each, after one
    untimed call that compiles. -> the sampler's `last_stats` (prefill_s, decode_s, decode_tokens_per_s)."""
    from tulu_jax.rollout.types import SamplingParams

    rows = random_prompts(sampler.model.cfg.vocab_size, batch, prompt_len, seed)
    sp = SamplingParams(max_tokens=new_tokens, temperature=temperature, seed=seed)
    eos, sampler.eos_token_id = sampler.eos_token_id, -1  # no id is -1: every row runs all new_tokens steps
    try:
        for _ in range(2):
            sampler.generate(rows, sp)
    finally:
        sampler.eos_token_id = eos
    return dict(sampler.last_stats, batch=batch, prompt_len=prompt_len)


def time_local(model_dir: str, batch: int, prompt_len: int, new_tokens: int, reps: int) -> dict:
    """Our sampler, greedy: median over `reps` of prefill + decode seconds -> a result row."""
    from tulu_jax.sampling.sampler import LocalSampler

    sampler = LocalSampler.from_hf(model_dir)
    runs = [time_decode(sampler, batch, prompt_len, new_tokens, temperature=0.0) for _ in range(reps)]
    total = statistics.median(r["prefill_s"] + r["decode_s"] for r in runs)
    return {"engine": "jax (ours)", "batch": batch, "seconds": total, "tokens_per_s": batch * new_tokens / total}


def time_torch(model_dir: str, batch: int, prompt_len: int, new_tokens: int, reps: int) -> dict:
    """transformers `generate`, greedy, exactly `new_tokens` per row: median over `reps` -> a result row."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(random_prompts(model.config.vocab_size, batch, prompt_len), dtype=torch.long)
    mask = torch.ones_like(ids)

    def once():
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # no early stop: the same work as ours
                pad_token_id=model.config.pad_token_id or 0,
            )
        assert out.shape[1] == prompt_len + new_tokens

    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    total = statistics.median(times)
    return {
        "engine": "transformers generate",
        "batch": batch,
        "seconds": total,
        "tokens_per_s": batch * new_tokens / total,
    }


def time_vllm(model_dir: str, prompts: int, prompt_len: int, new_tokens: int, reps: int) -> list[dict]:
    """A real vLLM server through our client: throughput of `prompts` concurrent requests (sampling at
    temperature 1, exactly `new_tokens` each unless EOS) and the time of a weight push of the same model."""
    import jax

    from tulu_jax.models import hf
    from tulu_jax.models.loading import build_model, load_params
    from tulu_jax.rollout.server import start_vllm_server
    from tulu_jax.rollout.types import SamplingParams
    from tulu_jax.rollout.vllm_client import VLLMClient
    from tulu_jax.sharding import make_mesh

    cfg = hf.load_hf_config(model_dir)
    with start_vllm_server(model_dir, max_model_len=prompt_len + new_tokens + 16) as server:
        client = VLLMClient([server.url], eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id or 0, cfg=cfg)
        sp = SamplingParams(max_tokens=new_tokens, temperature=1.0)
        rows = random_prompts(cfg.vocab_size, prompts, prompt_len)
        client.generate(rows[:4], sp)  # warm-up
        times, tokens = [], []
        for _ in range(reps):
            t = time.perf_counter()
            out = client.generate(rows, sp)
            times.append(time.perf_counter() - t)
            tokens.append(sum(len(c.token_ids) for c in out))
        secs = statistics.median(times)
        params = load_params(model_dir, build_model(cfg), make_mesh(devices=jax.devices()[:1]))
        pushes = [client.push_weights(params, f"bench-{i}") for i in range(reps)]
    push = statistics.median(p["total_s"] for p in pushes)
    return [
        {
            "engine": f"vLLM via VLLMClient ({prompts} concurrent)",
            "batch": prompts,
            "seconds": secs,
            "tokens_per_s": statistics.median(tokens) / secs,
            "server_start_s": server.ready_s,
        },
        {"what": f"{cfg.num_params / 1e6:.1f}M parameters", "push_s": push},
    ]


def main(argv=None) -> int:
    """Runs every engine and batch size, prints a Markdown table (and --json rows)."""
    args = parse_args(argv)
    import jax

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or export_random_model(args.preset, os.path.join(tmp, "model"))
        print(
            f"# bench_generate: {model_dir}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy;"
            f" jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} cpus",
            flush=True,
        )
        for b in batches:
            rows.append(time_local(model_dir, b, args.prompt_len, args.new_tokens, args.reps))
            print(f"# {rows[-1]}", flush=True)
            if not args.no_torch:
                rows.append(time_torch(model_dir, b, args.prompt_len, args.new_tokens, args.reps))
                print(f"# {rows[-1]}", flush=True)
        if args.vllm:
            rows.extend(time_vllm(model_dir, args.vllm_prompts, args.prompt_len, args.new_tokens, args.reps))
    print()
    print("| engine | batch | new tokens/s | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" in r:
            print(f"| {r['engine']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} |")
    for r in rows:
        if "push_s" in r:
            print(f"# weight push ({r['what']}): {r['push_s']:.2f} s")
    by = {(r["engine"], r.get("batch")): r for r in rows if "tokens_per_s" in r}
    for b in batches:
        ours, theirs = by.get(("jax (ours)", b)), by.get(("transformers generate", b))
        if ours and theirs:
            print(f"# batch {b}: ours / transformers = {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
