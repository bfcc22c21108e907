"""Multi-process (multi-host) runs, on this machine: two processes join one JAX job on loopback (gloo), each
with 4 CPU devices, and train on one global 2x2x2 mesh, as the hosts of a pod would. Every stage must give
the losses of one process driving all 8 devices, write the same export, resume bit-identically after a
SIGKILL, and leave checkpoints that restore on another process/device layout (Orbax reshards on restore).

Float tolerance: the two layouts run the same sharded program, but the cross-process reductions go through
gloo instead of in-process all-reduces, so sums may associate differently: a few float32 ulps per reduction,
far below the 1e-5 relative bound used here."""

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from multihost_job import REPO, ok, run, start

pytestmark = pytest.mark.slow

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
SFT_STEPS = 6
SFT_ARGS = [
    "--config",
    str(REPO / "configs/sft/tiny.yaml"),
    f"train.max_steps={SFT_STEPS}",
    "train.num_epochs=1",
    "train.batch_size=8",
    "train.eval_every=3",
    "data.max_seq_len=128",
    "checkpoint.every_steps=2",
    "checkpoint.keep=3",
]
RTOL = 1e-5


def cli(stage: str, out: Path, *args: str) -> list[str]:
    return ["-m", "tulu_jax.cli", stage, f"output_dir={out}", *args]


def metrics(out: Path) -> dict[int, dict]:
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


def assert_same_metrics(got: Path, want: Path, keys: tuple[str, ...], steps=None, rtol=RTOL, atol=1e-7):
    a, b = metrics(got), metrics(want)
    steps = sorted(b) if steps is None else steps
    compared = 0
    for step in steps:
        for key in keys:
            if key in b[step]:
                assert key in a[step], (step, key)
                np.testing.assert_allclose(a[step][key], b[step][key], rtol=rtol, atol=atol, err_msg=f"{key} @ {step}")
                compared += 1
    assert compared >= len(steps), f"compared only {compared} values"  # the keys were really there


def load_export(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.fixture(scope="module")
def sft_two(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_two")
    log = ok(run(cli("sft", out, *SFT_ARGS, *MESH)))
    return out, log


@pytest.fixture(scope="module")
def sft_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_one")
    ok(run(cli("sft", out, *SFT_ARGS, *MESH), processes=1, devices=8))
    return out


SFT_KEYS = ("loss", "grad_norm", "eval/loss", "eval/nll_per_token")


def test_two_process_sft_equals_one_process_and_exports_the_same_model(sft_two, sft_one):
    two, log = sft_two
    assert "on 8 cpu device(s)" in log  # one global mesh over both processes' devices
    assert sorted(k for k, r in metrics(two).items() if "loss" in r) == list(range(1, SFT_STEPS + 1))
    assert_same_metrics(two, sft_one, SFT_KEYS)
    a, b = load_export(two / "hf"), load_export(sft_one / "hf")
    assert sorted(a) == sorted(b)
    # AdamW divides each gradient by its running RMS, so where a gradient is itself at float-rounding size
    # a rounding difference moves the update by up to a learning rate: allow that on a few elements only.
    lr, total = 3e-3, sum(w.size for w in b.values())
    off = sum(int((~np.isclose(a[n], b[n], rtol=RTOL, atol=1e-6)).sum()) for n in b)
    assert off <= 1e-4 * total, f"{off} of {total} weights differ"
    for name in b:
        assert np.abs(a[name] - b[name]).max() <= lr, name
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(two / "hf"), dtype=torch.float32)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, w in a.items():
        np.testing.assert_array_equal(state[name], w, err_msg=name)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["2", "4", "6"]


def test_two_process_sft_killed_with_sigkill_resumes_bit_identically(sft_two, tmp_path):
    want, _ = sft_two
    out = tmp_path / "killed"
    procs = start(cli("sft", out, *SFT_ARGS, *MESH), logs=tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
        steps = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
        if steps >= 4 and (out / "checkpoints" / "2").is_dir():
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), (tmp_path / "process-0.log").read_text()[-3000:]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()
    assert len(metrics(out)) < SFT_STEPS + 1  # killed before the end
    log = ok(run(cli("sft", out, *SFT_ARGS, *MESH)))
    assert "resumed from" in log
    a, b = metrics(out), metrics(want)
    for step in range(1, SFT_STEPS + 1):
        for key in ("loss", "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)  # bit-identical
    assert a[SFT_STEPS]["eval/loss"] == b[SFT_STEPS]["eval/loss"]


@pytest.mark.parametrize("devices,mesh", [(8, MESH), (1, ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])])
def test_checkpoints_of_two_processes_restore_on_one_process(sft_two, tmp_path, devices, mesh):
    """Checkpoints written collectively by 2 processes x 4 devices restore on 1 process with 8 devices or with
    1 (resharded on restore): the last one exports exactly the two-process run's model, and (8 devices) from
    step 2 the run goes on with the two-process run's losses."""
    want, _ = sft_two
    final = tmp_path / "final"
    shutil.copytree(want, final)
    shutil.rmtree(final / "hf")
    (final / "summary.json").unlink()  # as if killed after the last checkpoint, before the export
    log = ok(run(cli("sft", final, *SFT_ARGS, *mesh), processes=1, devices=devices))
    assert f"resumed from {final / 'checkpoints'}/{SFT_STEPS}" in log
    a, b = load_export(final / "hf"), load_export(want / "hf")
    assert sorted(a) == sorted(b)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    if devices == 1:
        return  # continuing on one device is the same program as on eight, less the sharding: one run is enough

    mid = tmp_path / "mid"
    shutil.copytree(want, mid)
    for step in ("4", "6"):
        shutil.rmtree(mid / "checkpoints" / step)
    log = ok(run(cli("sft", mid, *SFT_ARGS, *mesh), processes=1, devices=devices))
    assert f"resumed from {mid / 'checkpoints'}/2" in log
    assert_same_metrics(mid, want, SFT_KEYS, steps=range(3, SFT_STEPS + 1))


def pref_args(model: Path, prefs: Path) -> list[str]:
    return [
        f"model.path={model}",
        "data.use_bundled=false",
        f"data.train_files=[{prefs}]",
        f"data.eval_files=[{prefs}]",
        "train.max_steps=3",
        "train.eval_every=-1",
        "checkpoint.every_steps=0",
        *MESH,
    ]


@pytest.mark.parametrize(
    "stage,keys",
    [
        ("dpo", ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")),
        ("rm", ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "accuracy")),
    ],
)
def test_two_process_preference_steps_equal_one_process(tiny_sft_export, small_prefs, tmp_path, stage, keys):
    """DPO (with its reference log-probs cached by the two processes together) and the reward model."""
    args = ["--config", str(REPO / f"configs/{stage}/tiny.yaml"), *pref_args(tiny_sft_export, small_prefs)]
    two, one = tmp_path / "two", tmp_path / "one"
    log = ok(run(cli(stage, two, *args)))
    ok(run(cli(stage, one, *args), processes=1, devices=8))
    assert "on 8 cpu device(s)" in log
    # DPO's rewards are beta * (logps - reference logps): differences of sums of ~100 token log-probs of
    # magnitude ~5, times beta 5, so float32 rounding reaches ~1e-6 absolute however small the reward.
    assert_same_metrics(two, one, keys, steps=[1, 2, 3], atol=2e-5)
    if stage == "dpo":
        (cache,) = (two / "reference_cache").glob("*.npz")  # written once, by process 0
        (cache_one,) = (one / "reference_cache").glob("*.npz")
        a, b = np.load(cache), np.load(cache_one)
        for name in b.files:
            np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=1e-6, err_msg=name)


def test_two_process_rlvr_equals_one_process(tiny_sft_export, tmp_path):
    """PPO with the local sampler: both processes sample together (one SPMD program), process 0 scores and
    shares the rollouts; the value model starts from the policy (no reward model needed here). One update a
    step, so step 1's losses are computed before any update and must match; step 2 samples with the updated
    weights, which AdamW's normalised first step may round differently, so it is only checked to run."""
    args = [
        "--config",
        str(REPO / "configs/rlvr/tiny.yaml"),
        f"model.path={tiny_sft_export}",
        "value.init=policy",
        "value.path=null",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.eval_every=2",  # greedy eval at steps 0 and 2: generated where sampling runs, scored on process 0
        "data.eval_limit=8",
        "rollout.max_tokens=8",
        "ppo.epochs=1",
        "ppo.minibatches=1",
        "checkpoint.every_steps=0",
        *MESH,
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    ok(run(cli("rlvr", two, *args)))
    ok(run(cli("rlvr", one, *args), processes=1, devices=8))
    a, b = metrics(two), metrics(one)
    assert sorted(a) == sorted(b) == [0, 1, 2]
    assert a[0]["eval/verifiable_correct_rate"] == b[0]["eval/verifiable_correct_rate"]
    for key in ("objective/scores", "val/sequence_lengths", "val/stop_token_rate"):
        assert a[1][key] == b[1][key], key  # the same samples, scored the same
    keys = ("loss/policy_avg", "loss/value_avg", "objective/rlhf_reward", "policy/entropy_avg", "rollout/logp_gap_mean")
    # At ratio 1 the policy loss is minus the mean of whitened advantages: zero up to float32 rounding (~1e-7),
    # so it gets an absolute bound on the advantages' unit scale.
    assert_same_metrics(two, one, keys, steps=[1], atol=1e-5)


def test_sigterm_stops_every_process_of_a_job(tmp_path):
    """A launcher's stop (or a preemption notice) is SIGTERM to every worker: each process ends within
    seconds, like Ctrl-C, instead of letting JAX's own handler note it and train on."""
    out = tmp_path / "run"
    procs = start(cli("sft", out, *SFT_ARGS, "train.max_steps=40", "train.eval_every=-1", *MESH), logs=tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), (tmp_path / "process-0.log").read_text()[-3000:]
    stopped = time.time()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [130, 130], codes
    assert time.time() - stopped < 60
    assert "tulu-jax: interrupted" in (tmp_path / "process-1.log").read_text()
    assert len(metrics(out)) < 40
