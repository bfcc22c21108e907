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
