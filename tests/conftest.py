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
