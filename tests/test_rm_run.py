"""End to end through the CLI: a tiny reward model trained from the tiny SFT export improves its held-out
Bradley-Terry loss, and its export is a transformers sequence classifier that loads back as a value model
with the same scores."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli_env

from tulu_jax.data.preference import bundled_prefs_file

STEPS = 16


def _refusal_pairs(src: str, dst: Path, n: int) -> Path:
    """tiny_prefs pairs whose rejected reply is always a refusal: a preference a reward model can learn
    in a few steps, so the test checks the trainer rather than the data set's difficulty."""
    rows = []
    for line in Path(src).read_text().splitlines()[:n]:
        row = json.loads(line)
        row["rejected"] = row["rejected"][:-1] + [{"role": "assistant", "content": "I do not know."}]
        rows.append(json.dumps(row))
    dst.write_text("\n".join(rows) + "\n")
    return dst


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, tiny_sft_export):
    out = tmp_path_factory.mktemp("rm")
    train = _refusal_pairs(bundled_prefs_file("train"), out.parent / "rm_train.jsonl", 320)
    held_out = _refusal_pairs(bundled_prefs_file("eval"), out.parent / "rm_eval.jsonl", 200)
    cmd = [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        "rm",
        "--config",
        str(REPO / "configs/rm/tiny.yaml"),
        f"output_dir={out}",
        f"model.path={tiny_sft_export}",
        "data.use_bundled=false",
        f"data.train_files={train}",
        f"data.eval_files={held_out}",
        f"train.max_steps={STEPS}",
        "train.eval_every=0",
        "optim.lr=5e-4",
        "checkpoint.every_steps=0",
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_reward_model_learns_and_logs(rm_run):
    rows = [json.loads(line) for line in (rm_run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/loss" in r}
    assert sorted(evals) == [0, STEPS]
    start, end = evals[0], evals[STEPS]
    assert end["eval/loss"] < 0.5 * start["eval/loss"], (start, end)
    assert end["eval/accuracy"] > 0.9 and end["eval/rewards/margin"] > start["eval/rewards/margin"] + 1
    for key in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin", "learning_rate", "epoch"):
        assert key in rows[-1], key


def test_export_is_a_sequence_classifier_and_loads_back_as_value_model(rm_run, tiny_tokenizer):
    import jax
    import torch
    from transformers import AutoModelForSequenceClassification

    from tulu_jax.models import hf
    from tulu_jax.models.reward import build_reward_model, last_token_scores, load_reward_params
    from tulu_jax.sharding import make_mesh

    export = Path(rm_run) / "hf"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    torch_model = AutoModelForSequenceClassification.from_pretrained(str(export)).eval()
    assert torch_model.config.num_labels == 1

    texts = ["<|user|>\nWhat is 2 + 3?\n<|assistant|>\n2 + 3 = 5.", "<|user|>\nReverse 'cat'.\n<|assistant|>\ntac"]
    ids = [tiny_tokenizer(t + tiny_tokenizer.eos_token, add_special_tokens=False)["input_ids"] for t in texts]
    t = max(map(len, ids))
    pad = config["pad_token_id"]
    batch = np.full((len(ids), t), pad, np.int32)
    seg = np.zeros((len(ids), t), np.int32)
    for i, row in enumerate(ids):
        batch[i, : len(row)], seg[i, : len(row)] = row, 1
    with torch.no_grad():
        want = torch_model(torch.tensor(batch, dtype=torch.long), attention_mask=torch.tensor(seg)).logits[:, 0].numpy()

    model = build_reward_model(hf.load_hf_config(str(export)))
    params = load_reward_params(str(export), model, make_mesh(1, 1, 1, jax.devices()[:1]))
    values = model.apply({"params": params}, batch, None, seg)  # per-token values, as PPO's value model reads them
    assert values.shape == batch.shape
    got = np.asarray(last_token_scores(values, batch, seg, pad))
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("pad", ["eos", "none"])
def test_reward_model_scores_in_transformers_whatever_the_pad_token(pad, tmp_path, tiny_sft_export, small_prefs):
    """Trained from a tokenizer whose pad token is its EOS (as SmolLM2's) or that has none: the run finds its
    pad id at start-up, trains, exports, and transformers' *ForSequenceClassification on the export gives
    our reward (read at the same position) to float32 precision."""
    import shutil

    import jax
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tulu_jax.models import hf
    from tulu_jax.models.reward import build_reward_model, last_token_scores, load_reward_params
    from tulu_jax.sharding import make_mesh

    start = tmp_path / "start"
    shutil.copytree(tiny_sft_export, start)
    tok_cfg = json.loads((start / "tokenizer_config.json").read_text())
    tok_cfg["pad_token"] = tok_cfg["eos_token"] if pad == "eos" else None
    (start / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    out = tmp_path / "rm"
    cmd = [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        "rm",
        "--config",
        str(REPO / "configs/rm/tiny.yaml"),
        f"output_dir={out}",
        f"model.path={start}",
        "data.use_bundled=false",
        f"data.train_files={small_prefs}",
        "train.max_steps=2",  # trained weights to export; the comparison needs no learning
        "train.eval_every=-1",
        "checkpoint.every_steps=0",
    ]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = out / "hf"
    config = json.loads((export / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(start))
    eos = tokenizer.eos_token_id
    assert config["pad_token_id"] == eos  # no distinct pad token: EOS pads, as transformers will read it

    texts = ["<|user|>\nWhat is 2 + 3?\n<|assistant|>\n2 + 3 = 5.", "<|user|>\nReverse 'cat'.\n<|assistant|>\ntac"]
    ids = [tokenizer(t + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids)) + 3  # right padding with the pad id (= EOS) after every row
    batch = np.full((len(ids), width), eos, np.int32)
    seg = np.zeros((len(ids), width), np.int32)
    for i, row in enumerate(ids):
        batch[i, : len(row)], seg[i, : len(row)] = row, 1
    torch_model = AutoModelForSequenceClassification.from_pretrained(str(export)).eval()
    with torch.no_grad():
        want = torch_model(torch.tensor(batch, dtype=torch.long), attention_mask=torch.tensor(seg)).logits[:, 0]
    model = build_reward_model(hf.load_hf_config(str(export)))
    params = load_reward_params(str(export), model, make_mesh(1, 1, 1, jax.devices()[:1]))
    values = np.asarray(model.apply({"params": params}, batch, None, seg))
    got = np.asarray(last_token_scores(values, batch, seg, config["pad_token_id"]))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(values).max()))
    # The position read is the token before each row's final EOS (transformers' rule with pad = EOS).
    before_eos = [values[i, len(row) - 2] for i, row in enumerate(ids)]
    np.testing.assert_array_equal(got, before_eos)
