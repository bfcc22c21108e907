"""Builds the real Llama-3 tokenizer, as Tülu 3 uses it, from PyPI (the Hugging Face hub is unreachable).

    python scripts/fetch_llama3_tokenizer.py [--cache DIR]      # prints the tokenizer folder

The llama-cpp-python sdist ships a vocab-only GGUF of Llama-3's tokenizer. We download the sdist
(pip, no build), extract only that file, convert it with transformers, and save a Hugging Face
tokenizer folder with Tülu's additions: `<pad>` = 128256 and the `tulu` chat template (open-instruct `finetune.py`,
`dataset_processor.py`).
Idempotent: an existing complete folder is returned as is.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tulu_jax.data.chat import TULU_CHAT_TEMPLATE

LLAMA_CPP_PYTHON = "0.3.36"  # pinned: the vendored GGUF (and so the tokenizer) is then fixed
GGUF_NAME = "ggml-vocab-llama-bpe.gguf"
GGUF_MEMBER = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/models/{GGUF_NAME}"
DEFAULT_CACHE = Path.home() / ".cache" / "tulu_jax" / "llama3_tokenizer"
EOS_ID, PAD_ID = 128001, 128256
_DONE = "DONE"  # marker written last, so a half-written folder is never reused


def _download_gguf(work: Path) -> Path:
    sdist_dir = work / "sdist"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-python",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        "-d",
        str(sdist_dir),
        "--quiet",
        "--retries",
        "2",
        "--timeout",
        "20",
    ]  # fail fast (then tests skip) when PyPI is unreachable
    subprocess.run(cmd, check=True)
    (sdist,) = sdist_dir.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as tf:
        tf.extract(GGUF_MEMBER, work, filter="data")
    return work / GGUF_MEMBER


def _fix_pad_token(tokenizer_json: Path) -> None:
    """transformers' GGUF converter appends `<|endoftext|>` at id 128256; Tülu's `<pad>` goes there."""
    data = json.loads(tokenizer_json.read_text())
    extra = [t for t in data["added_tokens"] if t["id"] >= PAD_ID]
    if [t["content"] for t in extra] not in ([], ["<|endoftext|>"]):
        raise RuntimeError(f"unexpected added tokens after the Llama-3 vocab: {extra}")
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < PAD_ID] + [
        {
            "id": PAD_ID,
            "content": "<pad>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    ]
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def fetch_llama3_tokenizer(cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """Returns a folder that `AutoTokenizer.from_pretrained` loads offline; builds it on first use."""
    from transformers import AutoTokenizer

    out = Path(cache).expanduser().resolve()
    if (out / _DONE).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        work = Path(tmp)
        gguf = _download_gguf(work)
        raw = work / "raw"
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(raw)
        _fix_pad_token(raw / "tokenizer.json")
        tok = AutoTokenizer.from_pretrained(str(raw), pad_token="<pad>", eos_token="<|end_of_text|>")
        tok.chat_template = TULU_CHAT_TEMPLATE
        if tok.eos_token_id != EOS_ID or tok.pad_token_id != PAD_ID or len(tok) != PAD_ID + 1:
            raise RuntimeError(f"unexpected tokenizer: eos={tok.eos_token_id} pad={tok.pad_token_id} n={len(tok)}")
        staged = work / "final"
        tok.save_pretrained(staged)
        (staged / _DONE).write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} {GGUF_NAME}\n")
        if out.exists():  # a half-built folder from an interrupted run
            shutil.rmtree(out)
        staged.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="output folder")
    print(fetch_llama3_tokenizer(ap.parse_args().cache))


if __name__ == "__main__":
    main()
