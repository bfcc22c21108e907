"""End to end through the CLI: tiny DPO from a tiny SFT export learns on held-out pairs, caches the
reference, matches the live reference, resumes after SIGKILL with identical losses, and rejects bad rows
with one clear line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env

from tulu_jax.data.preference import bundled_prefs_file

STEPS = 16


def _cmd(out_dir, model, data, *extra):
    return [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        "dpo",
        "--config",
        str(REPO / "configs/dpo/tiny.yaml"),
        f"output_dir={out_dir}",
        f"model.path={model}",
        "data.use_bundled=false",
        f"data.train_files={data}",
        f"data.eval_files={bundled_prefs_file('eval')}",
        f"train.max_steps={STEPS}",
        "train.eval_every=8",
        "checkpoint.every_steps=4",
        "optim.lr=2e-4",
        *extra,
    ]


def _rows(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _losses(out_dir):
    return {r["step"]: r["loss"] for r in _rows(out_dir) if "loss" in r}


def _evals(out_dir):
    return {r["step"]: r for r in _rows(out_dir) if "eval/loss" in r}


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory, tiny_sft_export, small_prefs):
    out = tmp_path_factory.mktemp("dpo_cache")
    proc = subprocess.run(_cmd(out, tiny_sft_export, small_prefs), env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_tiny_dpo_learns_logs_checkpoints_and_exports(cached_run):
    out, proc = cached_run
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))
    evals = _evals(out)
    assert sorted(evals) == [0, 8, 16]
    start, end = evals[0], evals[16]
    # At step 0 the policy is the reference: every reward is 0, no pair is ranked right, loss is ln 2.
    assert start["eval/rewards/accuracy"] == 0.0 and abs(start["eval/loss"] - 0.693147) < 1e-5
    # Learning, on 200 held-out pairs: the loss falls from ln 2 and more than half the pairs are ranked right
    # (a random ranking gets half). 16 steps from a 40-step SFT model measured 0.555; the bar leaves room for
    # another CPU's float32 rounding.
    assert end["eval/rewards/accuracy"] > 0.5, end
    assert end["eval/loss"] < 0.66 and end["eval/rewards/margin"] > 0
    row = _rows(out)[-1]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracy",
        "rewards/margin",
        "rewards/average",
        "logps/chosen",
        "logps/rejected",
        "learning_rate",
        "tokens_per_s",
        "epoch",
        "grad_norm",
    ):
        assert key in row, key
    assert abs(row["epoch"] - STEPS * 16 / 320) < 1e-9
    assert sorted(os.listdir(out / "checkpoints")) == ["12", "16"]
    assert len(list((out / "reference_cache").glob("*.npz"))) == 2  # train and eval pairs
    assert (out / "hf" / "model.safetensors").exists()
    assert "dpo" in proc.stderr and "reference log-probs" in proc.stderr


def test_live_reference_gives_the_cached_losses(cached_run, tmp_path, tiny_sft_export, small_prefs):
    out_cached, _ = cached_run
    # Evaluated only at the end: the final policy is what the live reference could change.
    extra = ("dpo.reference=live", "checkpoint.every_steps=0", "train.eval_every=0")
    cmd = _cmd(tmp_path, tiny_sft_export, small_prefs, *extra)
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Live: no cache of the training pairs, only of the held-out pairs (eval reuses cached log-probs).
    assert len(list((tmp_path / "reference_cache").glob("*.npz"))) == 1
    cached, live = _losses(out_cached), _losses(tmp_path)
    assert sorted(live) == sorted(cached)
    for step in cached:
        assert live[step] == pytest.approx(cached[step], rel=1e-5, abs=1e-6), step
    assert _evals(tmp_path)[16]["eval/loss"] == pytest.approx(_evals(out_cached)[16]["eval/loss"], rel=1e-5)


def test_sigkill_then_resume_gives_identical_losses(cached_run, tmp_path, tiny_sft_export, small_prefs):
    out_full, _ = cached_run
    out = tmp_path / "killed"
    cmd = _cmd(out, tiny_sft_export, small_prefs)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_losses(out)) < 9 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 9 <= len(_losses(out)) < STEPS
    resumed = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "reusing" in resumed.stdout  # the reference cache too
    assert _losses(out) == _losses(out_full)  # bit-identical, every step
    assert {s: r["eval/loss"] for s, r in _evals(out).items()} == {
        s: r["eval/loss"] for s, r in _evals(out_full).items()
    }


def test_bad_preference_row_is_one_clear_line(tmp_path, tiny_sft_export, capsys):
    """In-process (`tulu_jax.cli.main`, what `python -m tulu_jax.cli` calls): the row is read before any
    compile, so a fresh interpreter would only add its start-up."""
    from tulu_jax.cli import main

    bad = tmp_path / "bad.jsonl"
    good = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps({**good, "rejected": good["chosen"][:1] + [{"role": "assistant", "content": "x"}]}))
    bad.write_text(bad.read_text() + "\n" + json.dumps(good) + "\n")
    assert main(_cmd(tmp_path / "o", tiny_sft_export, bad)[3:]) == 2  # after `python -m tulu_jax.cli`
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("tulu-jax: error: ") and f"{bad} line 2" in line and "rejected" in line, err
    assert "Traceback" not in err
