"""RLVR inputs without a model: the episode arrays built from a rollout batch, the prompt pipeline (bad rows,
long prompts, resume), and the config checks of `tulu-jax rlvr` (open-instruct `ppo_vllm_thread_ray_gtrl.py`
builds the same left-padded prompt + right-padded response rows; Tülu 3 §6)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import cli_env
from tulu_jax import configlib
from tulu_jax.config import RLVRConfig, RLVRDataConfig, RolloutConfig
from tulu_jax.data.chat import DataError
from tulu_jax.data.prompts import PromptPipeline, read_prompts
from tulu_jax.rollout.types import FINISH_LENGTH, FINISH_STOP, RolloutBatch
from tulu_jax.train.episodes import episode_arrays, prompt_width

REPO = Path(__file__).resolve().parent.parent
PAD = 0


def _batch():
    """Three rows, prompts of 3, 1 and 2 real tokens left-padded to 3; responses of T = 4: the first stopped
    after 2 tokens (EOS = 9 kept), the second hit the length, the third stopped on its first token."""
    return RolloutBatch(
        prompt_token_ids=np.array([[11, 12, 13], [PAD, PAD, 21], [PAD, 31, 32]], np.int32),
        prompt_lengths=np.array([3, 1, 2], np.int32),
        token_ids=np.array([[14, 9, PAD, PAD], [22, 23, 24, 25], [9, PAD, PAD, PAD]], np.int32),
        logps=np.array([[-0.5, -1.5, 0, 0], [-1, -2, -3, -4], [-0.25, 0, 0, 0]], np.float32),
        lengths=np.array([2, 4, 1], np.int32),
        finish_reasons=np.array([FINISH_STOP, FINISH_LENGTH, FINISH_STOP], np.int32),
        prompt_index=np.array([0, 1, 2], np.int32),
        sample_index=np.zeros(3, np.int32),
        weight_versions=["0", "0", "0"],
    )


def test_episode_arrays_layout_by_hand():
    eps = episode_arrays(_batch(), width=5, pad_token_id=PAD)
    # Prompts right-aligned at column P-1 = 4, responses from column P = 5.
    np.testing.assert_array_equal(
        eps["input_ids"],
        [
            [0, 0, 11, 12, 13, 14, 9, 0, 0],
            [0, 0, 0, 0, 21, 22, 23, 24, 25],
            [0, 0, 0, 31, 32, 9, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(
        eps["segment_ids"],
        [
            [0, 0, 1, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 1, 1, 0, 0, 0],
        ],
    )
    # Exclusive cumulative sum: the first real prompt token at 0, the response continues the count.
    np.testing.assert_array_equal(
        eps["positions"],
        [
            [0, 0, 0, 1, 2, 3, 4, 5, 5],
            [0, 0, 0, 0, 0, 1, 2, 3, 4],
            [0, 0, 0, 0, 1, 2, 3, 3, 3],
        ],
    )
    np.testing.assert_array_equal(eps["responses"], _batch().token_ids)
    np.testing.assert_array_equal(eps["sampler_logps"], _batch().logps)
    np.testing.assert_array_equal(eps["lengths"], [2, 4, 1])
    np.testing.assert_array_equal(eps["stopped"], [True, False, True])
    for k in ("input_ids", "segment_ids", "positions", "responses", "lengths"):
        assert eps[k].dtype == np.int32, k
    assert eps["stopped"].dtype == bool and eps["sampler_logps"].dtype == np.float32


def test_episode_arrays_width_equal_to_the_prompt_and_too_narrow():
    eps = episode_arrays(_batch(), width=3, pad_token_id=PAD)
    np.testing.assert_array_equal(eps["input_ids"][:, :3], _batch().prompt_token_ids)
    with pytest.raises(ValueError, match="a prompt has 3 tokens, more than the prompt width 2"):
        episode_arrays(_batch(), width=2, pad_token_id=PAD)


@pytest.mark.parametrize("longest, width", [(0, 16), (1, 16), (16, 16), (17, 32), (62, 64), (64, 64), (65, 128)])
def test_prompt_width_is_the_next_power_of_two(longest, width):
    assert prompt_width(longest) == width
    assert prompt_width(longest, minimum=1) == max(1, 1 << max(longest - 1, 0).bit_length())


# ---------------------------------------------------------------- prompts


def _rows(n, dataset="gsm8k"):
    return [
        {
            "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "ground_truth": str(2 * i),
            "dataset": dataset,
        }
        for i in range(n)
    ]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _read(tok, files, **kw):
    kw.setdefault("max_prompt_len", 256)
    kw.setdefault("on_bad_row", "error")
    return read_prompts(files, tok, template="tulu", **kw)


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "hi"}], "dataset": "gsm8k"}, "ground_truth", "missing"),
    ({"messages": [{"role": "user", "content": "hi"}], "ground_truth": "4", "dataset": "nope"}, "dataset", "nope"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "ground_truth": "four", "dataset": "gsm8k"},
        "ground_truth",
        "gsm8k",
    ),
]


@pytest.mark.parametrize("row, field, what", BAD_ROWS, ids=["no_ground_truth", "unknown_dataset", "bad_gsm8k_truth"])
def test_bad_prompt_row_names_file_line_and_field(tiny_tokenizer, tmp_path, row, field, what):
    path = _write(tmp_path / "p.jsonl", [*_rows(2), row, *_rows(1)])
    with pytest.raises(DataError) as e:
        _read(tiny_tokenizer, [path])
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{path} line 3" in msg and f"'{field}'" in msg and what in msg, msg
    prompts, stats = _read(tiny_tokenizer, [path], on_bad_row="skip")
    assert len(prompts) == 3 and stats["rows_read"] == 4
    assert sum(stats["rows_skipped"].values()) == 1
    assert [p.ground_truth for p in prompts] == ["0", "2", "0"]


def test_long_prompts_are_skipped_and_counted(tiny_tokenizer, tmp_path):
    from tulu_jax.data.chat import prompt_token_ids

    rows = _rows(3)
    rows[1]["messages"][0]["content"] = "seven " * 40
    lengths = [len(prompt_token_ids(r["messages"], tiny_tokenizer, "tulu")) for r in rows]
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit
    prompts, stats = _read(tiny_tokenizer, [_write(tmp_path / "p.jsonl", rows)], max_prompt_len=limit)
    assert [p.ground_truth for p in prompts] == ["0", "4"]
    assert stats["rows_skipped"] == {"prompt_too_long": 1}
    assert stats["longest_prompt"] == limit and stats["prompts"] == 2
    assert prompts[1].where.endswith("line 3")
    with pytest.raises(DataError, match=r"no usable prompt .*prompt_too_long.*data.max_seq_len=3"):
        _read(tiny_tokenizer, [str(tmp_path / "p.jsonl")], max_prompt_len=3)


def test_prompt_pipeline_resumes_the_same_batches(tiny_tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", _rows(10))
    cfg = RLVRDataConfig(train_files=(path,), max_seq_len=256)
    pipe = PromptPipeline(cfg, tiny_tokenizer, files=[path], batch_size=3, seed=7, num_epochs=2)
    assert pipe.count_batches() == 6  # 20 prompt draws, the last incomplete batch dropped
    it = pipe.iterator()
    full = [np.asarray(b) for b in it]
    assert len(full) == 6 and all(b.shape == (3,) for b in full)
    draws = np.concatenate(full)  # epoch 1 = draws 0..9 (a permutation), epoch 2 = draws 10..17 of the next
    assert sorted(draws[:10].tolist()) == list(range(10))
    assert len(set(draws[10:].tolist())) == 8
    assert not np.array_equal(draws[:8], draws[10:])  # reshuffled per epoch
    it = pipe.iterator()
    next(it), next(it)
    state = it.get_state()
    resumed = pipe.iterator()
    resumed.set_state(state)
    rest = [np.asarray(b) for b in resumed]
    assert len(rest) == 4
    for a, b in zip(rest, full[2:]):
        np.testing.assert_array_equal(a, b)
    assert [p.ground_truth for p in pipe.take(full[0])] == [str(2 * int(i)) for i in full[0]]


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"top_p": 0.9}, "top_p=0.9"),
        ({"top_k": 5}, "^top_k=5"),
        ({"temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_rollout_config_refuses(kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**kw)


def test_vllm_backend_needs_servers_before_any_weights_load():
    """Servers are one of the run's required inputs, checked with the others (after model.path and the
    prompt files), before anything is loaded."""
    from tulu_jax.train.rlvr import check_rlvr_inputs

    cfg = configlib.load_config(
        RLVRConfig, str(REPO / "configs/rlvr/grpo_tiny.yaml"), ["rollout.backend=vllm", "rollout.servers=[]"]
    )
    with pytest.raises(configlib.ConfigError, match="^rollout.servers: required"):
        check_rlvr_inputs(cfg)


def test_grpo_needs_a_group():
    with pytest.raises(configlib.ConfigError, match="rollout.n"):
        configlib.load_config(RLVRConfig, str(REPO / "configs/rlvr/grpo_tiny.yaml"), ["rollout.n=1"])


def _cli_error(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "tulu_jax.cli", "rlvr", "--config", str(REPO / "configs/rlvr/tulu3_8b.yaml")]
    cmd += [f"output_dir={tmp_path / 'out'}", *overrides]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("tulu-jax: error: "), lines
    return lines[-1]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_tokenizer):
    """A random tiny-preset model exported as a Hugging Face folder (what model.path / value.path accept)."""
    import jax

    from tulu_jax.models import hf
    from tulu_jax.models.config import preset
    from tulu_jax.models.loading import build_model, init_params
    from tulu_jax.sharding import make_mesh

    cfg = preset("tiny")
    params = init_params(build_model(cfg), make_mesh(devices=jax.devices()[:1]), jax.random.key(0))
    path = tmp_path_factory.mktemp("tiny_export") / "hf"
    hf.export_hf(params, cfg, str(path), tokenizer=tiny_tokenizer)
    return path


SERVER = "rollout.servers=[http://x:1]"


def test_cli_names_model_path_first(tmp_path):
    """tulu3_8b.yaml leaves model.path, value.path and data.train_files for the user: the first of them in the
    config's order, model.path (the policy, needed before anything else), is the one line."""
    line = _cli_error(tmp_path, SERVER)
    assert "model.path" in line, line


def test_cli_names_train_files_then_value_path(tmp_path, tiny_export, tmp_path_factory):
    """After model.path: the prompt files (what every algorithm needs), then PPO's value model."""
    line = _cli_error(tmp_path, SERVER, f"model.path={tiny_export}")
    assert "data.train_files" in line, line
    prompts = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    row = {"messages": [{"role": "user", "content": "1+1?"}], "ground_truth": "2", "dataset": "gsm8k"}
    prompts.write_text(json.dumps(row) + "\n")
    line = _cli_error(tmp_path, SERVER, f"model.path={tiny_export}", f"data.train_files=[{prompts}]")
    assert "value.path" in line and "required for PPO" in line, line
