"""End to end through the CLI: the tiny SFT run learns, checkpoints and exports; killed with SIGKILL and
started again with the same command, it resumes and logs the same per-step losses as a run that was
never killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 24
ARGS = [
    "train.max_steps=%d" % STEPS,
    "train.num_epochs=1",  # one epoch holds ~470 batches: counting them (packing) for 3 would cost seconds a run
    "checkpoint.every_steps=5",
    "data.max_seq_len=128",
    "train.batch_size=4",
    "optim.lr=3e-3",
    "checkpoint.keep=2",
    "train.eval_every=10",
]


def _cmd(out_dir):
    return [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        "sft",
        "--config",
        str(REPO / "configs/sft/tiny.yaml"),
        f"output_dir={out_dir}",
        *ARGS,
    ]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)  # one device, as a user's laptop run
    return env


def _losses(out_dir):
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _eval_losses(out_dir):
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r["eval/nll_per_token"] for r in rows if "eval/nll_per_token" in r}


def _logged_steps(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_tiny_run_learns_checkpoints_and_exports(uninterrupted):
    out, proc = uninterrupted
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < 0.75 * first, (first, last)
    evals = _eval_losses(out)  # step 0, every train.eval_every=10 steps, and the end
    assert sorted(evals) == [0, 10, 20, 24]
    assert evals[24] < 0.8 * evals[0], evals
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "packing_efficiency"):
        assert key in row
    assert 0.5 < row["packing_efficiency"] <= 1.0
    assert sorted(os.listdir(out / "checkpoints")) == ["20", "24"]  # keep=2
    assert (out / "hf" / "config.json").exists() and (out / "hf" / "model.safetensors").exists()
    assert list((out / "tensorboard").iterdir())
    assert "sft" in proc.stderr and "it/s" in proc.stderr  # the progress bar


def test_sigkill_then_resume_gives_identical_losses(uninterrupted, tmp_path):
    full_out, _ = uninterrupted
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _logged_steps(out) < 13 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _logged_steps(out)
    assert 13 <= killed_at < STEPS
    resumed = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert _losses(out) == _losses(full_out)  # bit-identical, every step
    assert _eval_losses(out) == _eval_losses(full_out)


def test_nan_loss_stops_the_run_with_a_clear_error(tmp_path):
    from tulu_jax import configlib
    from tulu_jax.config import SFTConfig
    from tulu_jax.train.sft import run_sft

    cfg = configlib.load_config(
        SFTConfig,
        str(REPO / "configs/sft/tiny.yaml"),
        [
            f"output_dir={tmp_path}",
            "train.max_steps=4",
            "train.num_epochs=1",
            "optim.lr=1e30",
            "optim.warmup_ratio=0",
            "checkpoint.every_steps=1",
            "data.max_seq_len=64",
            "train.eval_every=-1",
        ],
    )
    with pytest.raises(FloatingPointError, match=r"loss is nan.* at step \d; the last good checkpoint is \d") as e:
        run_sft(cfg)
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert saved and max(saved) < bad_step  # only finite states were saved


def test_output_dir_that_holds_another_run_is_one_clear_line(uninterrupted, tmp_path):
    """A finished run started again keeps what it wrote; a checkpoint past train.max_steps, or of another
    model, is one line naming output_dir, not a traceback or a silently overwritten summary."""
    import shutil

    done, _ = uninterrupted
    out = tmp_path / "again"
    shutil.copytree(done, out)
    summary = json.loads((out / "summary.json").read_text())
    proc = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do" in proc.stdout and json.loads((out / "summary.json").read_text()) == summary

    def one_line(*extra):
        proc = subprocess.run(_cmd(out) + list(extra), env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc.stderr.strip().splitlines()[-1]

    line = one_line("train.max_steps=5")
    assert f"output_dir: {out} holds a checkpoint at step {STEPS}, past this run's 5 steps" in line
    line = one_line("model.preset=bench-15m")
    assert f"output_dir: {out} holds a checkpoint (step {STEPS}) of another model or optimizer" in line
    assert json.loads((out / "summary.json").read_text()) == summary


def test_more_steps_than_the_data_holds_is_one_clear_line(tmp_path):
    rows = Path(REPO / "tulu_jax/assets/tiny_chat/train.jsonl").read_text().splitlines()[:8]
    (tmp_path / "few.jsonl").write_text("\n".join(rows) + "\n")
    few = [f"data.train_files={tmp_path / 'few.jsonl'}", "train.num_epochs=3"]  # 3: some full batch, not 50
    extra = ["data.use_bundled=false", *few, "train.max_steps=50"]
    proc = subprocess.run(_cmd(tmp_path / "o") + extra, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train.max_steps=50: the training data yields only" in proc.stderr
    assert not (tmp_path / "o" / "hf").exists()  # nothing trained, nothing exported
