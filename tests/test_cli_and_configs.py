"""Every shipped config loads; the Tülu configs carry the paper's hyperparameters; the CLI turns bad
configs and bad data into one clear line, and `score` prints JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tulu_jax import configlib
from tulu_jax.cli import main
from tulu_jax.config import DPOConfig, RLVRConfig, RMConfig, SFTConfig

REPO = Path(__file__).resolve().parent.parent
# Trainer configs; configs/data holds the data commands' configs (mixes, model pools), tested with them.
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "data")
CONFIG_CLASSES = {"sft": SFTConfig, "dpo": DPOConfig, "rm": RMConfig, "rlvr": RLVRConfig}


def test_every_config_folder_has_a_config_class():
    assert {p.parent.name for p in CONFIGS} == set(CONFIG_CLASSES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path):
    cfg = configlib.load_config(CONFIG_CLASSES[path.parent.name], str(path), [])
    assert cfg.train.batch_size % cfg.train.grad_accum_steps == 0


@pytest.mark.parametrize("name,lr,accum,reference", [("8b", 5e-7, 16, "live"), ("70b", 2e-7, 2, "cache")])
def test_tulu3_dpo_hyperparameters(name, lr, accum, reference):
    cfg = configlib.load_config(DPOConfig, str(REPO / f"configs/dpo/tulu3_{name}.yaml"), [])
    assert (cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.reference) == ("dpo_norm", 5.0, 0.0, reference)
    optim = cfg.optim
    assert (optim.lr, optim.warmup_ratio, optim.weight_decay, optim.max_grad_norm) == (lr, 0.1, 0.0, 1.0)
    assert (cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.num_epochs) == (128, accum, 1)
    assert cfg.data.max_seq_len == 2048 and cfg.data.label == "all"


def test_tulu3_rm_hyperparameters():
    cfg = configlib.load_config(RMConfig, str(REPO / "configs/rm/tulu3_8b.yaml"), [])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.train.batch_size, cfg.train.num_epochs) == (3e-6, 1e-5, 256, 1)
    assert cfg.data.max_seq_len == 2048


@pytest.mark.parametrize(
    "name,beta,lr,warmup,batch,seed", [("8b", 0.05, 3e-7, 0.0, 224, 3), ("70b", 0.07, 1e-7, 0.1, 640, 8)]
)
def test_tulu3_rlvr_hyperparameters(name, beta, lr, warmup, batch, seed):
    """Tülu 3 §6 / open-instruct `ppo_vllm_thread_ray_gtrl.py` as run for the 8B and 70B models."""
    cfg = configlib.load_config(RLVRConfig, str(REPO / f"configs/rlvr/tulu3_{name}.yaml"), [])
    p = cfg.ppo
    assert cfg.algo == "ppo" and (p.beta, p.kl_estimator, p.verify_reward, p.non_stop_penalty) == (beta, "k1", 10, -10)
    assert (p.gamma, p.lam, p.clip, p.clip_high, p.value_clip, p.value_coef) == (1.0, 0.95, 0.2, None, 0.2, 0.1)
    assert (p.epochs, p.minibatches, p.whiten_advantages, p.aggregation, p.tis_cap) == (4, 1, True, "token", 0.0)
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (
        lr,
        warmup,
        0.01,
        1,
    )
    assert cfg.value.init == "reward_model" and cfg.value.lr is None  # the value model shares the policy's lr
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.n, cfg.rollout.max_tokens) == (1.0, 1.0, 1, 2048)
    assert (cfg.train.batch_size, cfg.train.seed, cfg.data.max_seq_len) == (batch, seed, 2048)
    # The episodes of a step split into micro-batches that split over 8 devices (and 64 for 70B).
    micro = cfg.train.batch_size * cfg.rollout.n // cfg.train.grad_accum_steps
    assert cfg.train.batch_size * cfg.rollout.n % cfg.train.grad_accum_steps == 0 and micro % 8 == 0
    # Fail closed: nothing to train from until the user names it.
    assert cfg.model.path is None and cfg.value.path is None and not cfg.data.train_files and not cfg.data.use_bundled


def test_dpo_beta_defaults_follow_the_loss():
    # beta 5 only makes sense length-normalized (Tülu 3 §5): an unset beta takes the loss's own default.
    assert configlib.load_config(DPOConfig, None, []).dpo.beta == 5.0
    assert configlib.load_config(DPOConfig, None, ["dpo.loss=dpo"]).dpo.beta == 0.1
    assert configlib.load_config(DPOConfig, None, ["dpo.loss=simpo"]).dpo.beta == 2.0
    assert configlib.load_config(DPOConfig, None, ["dpo.loss=dpo", "dpo.beta=0.5"]).dpo.beta == 0.5
    with pytest.raises(configlib.ConfigError, match="dpo.loss"):
        configlib.load_config(DPOConfig, None, ["dpo.loss=kto"])


@pytest.mark.parametrize("name,lr,seed", [("8b", 5e-6, 123), ("70b", 2e-6, 456)])
def test_tulu3_sft_hyperparameters(name, lr, seed):
    cfg = configlib.load_config(SFTConfig, str(REPO / f"configs/sft/tulu3_{name}.yaml"), [])
    assert cfg.optim.lr == lr and cfg.train.seed == seed
    assert (cfg.optim.warmup_ratio, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (0.03, 0.0, 1.0)
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps) == (0.9, 0.999, 1e-8)
    assert cfg.train.batch_size == 128 and cfg.train.num_epochs == 2 and cfg.train.loss_reduction == "sum"
    assert cfg.data.max_seq_len == 4096 and cfg.data.chat_template == "tulu"


def test_overrides_reach_the_config():
    cfg = configlib.load_config(
        SFTConfig,
        str(REPO / "configs/sft/tiny.yaml"),
        [
            "output_dir=/tmp/run",
            "train.max_steps=50",
            "train.seed=1",
            "checkpoint.every_steps=10",
            "mesh.fsdp=8",
            "optim.lr=5e-6",
            "data.use_bundled=false",
            "data.train_files=a.jsonl,b.parquet",
        ],
    )
    assert (cfg.output_dir, cfg.train.max_steps, cfg.train.seed, cfg.checkpoint.every_steps) == ("/tmp/run", 50, 1, 10)
    assert cfg.mesh.fsdp == 8 and cfg.optim.lr == 5e-6 and cfg.data.train_files == ("a.jsonl", "b.parquet")


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_stepz=5", "train.max_stepz"),
        ("train.max_steps=five", "train.max_steps"),
        ("train.loss_reduction=avg", "train.loss_reduction"),
        ("train.grad_accum_steps=3", "grad_accum_steps"),
        ("train.batch_size=6", "divisible by the data-parallel size"),  # 8 test devices
        ("mesh.tensor=3", "mesh"),
    ],
)
def test_bad_config_is_one_clear_line(override, message, capsys, tmp_path):
    assert main(["sft", "--config", str(REPO / "configs/sft/tiny.yaml"), f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tulu-jax: error:") and message in err


def test_bad_data_row_names_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "train.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    code = main(
        [
            "sft",
            "--config",
            str(REPO / "configs/sft/tiny.yaml"),
            f"output_dir={tmp_path / 'out'}",
            "data.use_bundled=false",
            f"data.train_files={bad}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "train.jsonl line 2" in err and "messages[0].role" in err and "bot" in err


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("tulu-jax: error:") and err.count("\n") == 1, err
    return err


def test_missing_data_file_is_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    tiny = ["sft", "--config", str(REPO / "configs/sft/tiny.yaml"), f"output_dir={tmp_path / 'out'}"]
    err = _one_line_error(capsys, [*tiny, "data.use_bundled=false", f"data.train_files={missing}"])
    assert f"data.train_files[0]: {missing}: no such file or directory" in err
    err = _one_line_error(capsys, [*tiny, f"data.train_files={missing}"])  # both the toy set and files
    assert "data.use_bundled=false" in err
    err = _one_line_error(capsys, [*tiny, "data.use_bundled=false"])
    assert "data.train_files: no training files given" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm"])
def test_production_configs_fail_closed(stage, tmp_path, capsys):
    """A Tülu 3 config with a forgotten override refuses to start (no random 8B on the toy set)."""
    cfg = ["--config", str(REPO / f"configs/{stage}/tulu3_8b.yaml"), f"output_dir={tmp_path / 'out'}"]
    err = _one_line_error(capsys, [stage, *cfg])
    assert "model.path: required" in err
    model = tmp_path / "model"
    model.mkdir()
    err = _one_line_error(capsys, [stage, *cfg, f"model.path={model}"])
    assert f"model.path: {model}: not a Hugging Face model folder (no config.json)" in err
    err = _one_line_error(capsys, [stage, *cfg, f"model.path={tmp_path / 'nope'}"])
    assert f"model.path: {tmp_path / 'nope'}: no such directory" in err
    (model / "config.json").write_text("{}")
    err = _one_line_error(capsys, [stage, *cfg, f"model.path={model}"])
    assert f"model.path: {model}: config.json is not a usable model config" in err
    from hf_models import make_hf_model

    make_hf_model("llama", str(model))
    capsys.readouterr()  # transformers' own progress output
    err = _one_line_error(capsys, [stage, *cfg, f"model.path={model}"])
    assert "data.train_files: no training files given" in err
    assert not (tmp_path / "out").exists()


def test_stage_before_its_input_exists_is_one_clear_line(tmp_path, capsys):
    """`tulu-jax dpo` before the SFT stage wrote its export: the key and the path, no transformers traceback."""
    args = ["--config", str(REPO / "configs/dpo/tiny.yaml"), f"output_dir={tmp_path / 'o'}"]
    err = _one_line_error(capsys, ["dpo", *args, f"model.path={tmp_path / 'sft/hf'}"])
    assert f"model.path: {tmp_path / 'sft/hf'}: no such directory" in err
    err = _one_line_error(
        capsys, ["dpo", *args, "model.path=null", "model.preset=tiny", f"model.tokenizer={tmp_path}/t"]
    )
    assert f"model.tokenizer: {tmp_path}/t: no such directory" in err


def test_score_cli_prints_json(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("qwen2", str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tulu_jax.cli", "score", "--model", str(tmp_path), "--text", "Hello there, world"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == len(out["logprobs"]) > 3
    assert out["logprobs"][0] is None and all(lp < 0 for lp in out["logprobs"][1:])
    assert abs(sum(out["logprobs"][1:]) - out["sum_logprob"]) < 1e-3
