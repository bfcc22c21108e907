"""Bad inputs to `tulu-jax score`, `generate` (flags, vLLM server URLs), `vllm` and the trainers' --config:
one line naming the flag and the path on stderr, exit code 2, no traceback. Each case runs the real command
in a subprocess."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO, cli_env
from hf_models import make_hf_model


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A tiny model folder, its copies with a broken tokenizer or config, a prompts file, an empty dir."""
    root = tmp_path_factory.mktemp("cli_inputs")
    model = root / "model"
    make_hf_model("llama", str(model))
    no_eos = root / "no_eos"
    shutil.copytree(model, no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    (no_eos / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    bad_config = root / "bad_config"
    shutil.copytree(model, bad_config)
    (bad_config / "config.json").write_text("{not json")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("hello\n")
    prompts = root / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    return {
        "model": str(model),
        "no_eos": str(no_eos),
        "bad_config": str(bad_config),
        "empty": str(root / "empty"),
        "file": str(root / "file.txt"),
        "prompts": str(prompts),
        "out": str(root / "out.jsonl"),
        "dead_server": f"http://127.0.0.1:{_closed_port()}",
    }


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released): connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*argv):
    return subprocess.run(
        [sys.executable, "-m", "tulu_jax.cli", *argv],
        env=cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _gen(p, **changes):
    args = {"--model": p["model"], "--prompts": p["prompts"], "--out": p["out"], **changes}
    return ["generate", *[x for kv in args.items() for x in kv], "--max-tokens", "2"]


CASES = {
    # name: (argv from the paths, flag, path named in the message, what the message says)
    "score_missing_model": (lambda p: ["score", "--model", "/no/such/dir", "--text", "x"], "--model",
                            "/no/such/dir", "no such directory"),
    "score_model_is_a_file": (lambda p: ["score", "--model", p["file"], "--text", "x"], "--model", "file",
                              "not a directory"),
    "score_model_not_a_model": (lambda p: ["score", "--model", p["empty"], "--text", "x"], "--model", "empty",
                                "no config.json"),
    "score_model_bad_config": (lambda p: ["score", "--model", p["bad_config"], "--text", "x"], "--model",
                               "bad_config", "config.json is not a usable model config"),
    "generate_missing_model": (lambda p: _gen(p, **{"--model": "/no/such/dir"}), "--model", "/no/such/dir",
                               "no such directory"),
    "generate_missing_prompts": (lambda p: _gen(p, **{"--prompts": "/no/such.jsonl"}), "--prompts",
                                 "/no/such.jsonl", "no such file"),
    "generate_prompts_is_a_dir": (lambda p: _gen(p, **{"--prompts": p["empty"]}), "--prompts", "empty",
                                  "is a directory"),
    "generate_tokenizer_without_eos": (lambda p: _gen(p, **{"--model": p["no_eos"]}), "--model", "no_eos",
                                       "no eos_token"),
    "generate_out_is_a_dir": (lambda p: _gen(p, **{"--out": p["empty"]}), "--out", "empty", "is a directory"),
    "generate_bad_mesh": (lambda p: _gen(p, **{"--mesh": "3,1,1"}), "--mesh", "3,1,1", "devices"),
    "generate_servers_without_vllm": (lambda p: _gen(p, **{"--servers": "http://127.0.0.1:8000"}), "--servers",
                                      "http://127.0.0.1:8000", "needs --backend vllm"),
    "generate_servers_not_a_url": (lambda p: _gen(p, **{"--backend": "vllm", "--servers": "notaurl"}), "--servers",
                                   "notaurl", "not an http(s) URL"),
    "generate_server_down": (lambda p: _gen(p, **{"--backend": "vllm", "--servers": p["dead_server"]}), "--servers",
                             "http://127.0.0.1:", "no vLLM server answers (connection refused)"),
    "vllm_missing_model": (lambda p: ["vllm", "--model", "/no/such/dir"], "--model", "/no/such/dir",
                           "no such directory"),
    "sft_config_is_a_dir": (lambda p: ["sft", "--config", p["empty"]], "--config", "empty", "is a directory"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(paths, case):
    argv, flag, where, what = CASES[case]
    proc = _run(*argv(paths))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"tulu-jax: error: {flag} ") and where in line and what in line, line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_prompts_is_one_line_exit_2(paths, tmp_path):
    locked = tmp_path / "locked.jsonl"
    locked.write_text('{"prompt": "hi"}\n')
    locked.chmod(0)
    proc = _run(*_gen(paths, **{"--prompts": str(locked)}))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"tulu-jax: error: --prompts {locked}: cannot read")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")
def test_output_a_folder_refuses_is_named_before_any_work(tmp_path):
    """/proc passes an access check as root yet refuses new files: every command's output check opens it."""
    from tulu_jax.inputs import InputError, check_writable_output

    with pytest.raises(InputError, match=r"^--out /proc/x\.jsonl: cannot be written: "):
        check_writable_output("/proc/x.jsonl", "--out")
    fine = tmp_path / "new" / "o.jsonl"
    assert check_writable_output(str(fine), "--out") == str(fine) and not fine.exists()  # probe leaves nothing
    fine.write_text("kept\n")
    check_writable_output(str(fine), "--out")
    assert fine.read_text() == "kept\n"  # an existing output (resume) is untouched


JOB_ENV_CASES = {
    # name: (extra environment, extra flags, what the one line says)
    "count_not_an_int": ({"JAX_NUM_PROCESSES": "abc", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, [],
                         "JAX_NUM_PROCESSES='abc': expected an integer"),
    "id_out_of_range": ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"},
                        [], "JAX_PROCESS_ID=5 with JAX_NUM_PROCESSES=2: need 0 <= id < count"),
    "no_coordinator": ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, [],
                       "JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS"),
    "bad_coordinator": ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "nonsense"}, [],
                        "JAX_COORDINATOR_ADDRESS='nonsense': expected host:port"),
    "port_out_of_range": ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
                           "JAX_COORDINATOR_ADDRESS": "127.0.0.1:99999"}, [], "port 1-65535"),
    "no_count": ({"JAX_PROCESS_ID": "0", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, [],
                 "set but JAX_NUM_PROCESSES is not"),
    "no_id": ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, [],
              "JAX_PROCESS_ID is not set"),
    "distributed_without_a_cluster": ({}, ["--distributed"], "--distributed: JAX found no multi-process job here"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(JOB_ENV_CASES))
def test_bad_multi_process_job_is_one_line_exit_2(tmp_path, case):
    env_extra, flags, what = JOB_ENV_CASES[case]
    env = {k: v for k, v in cli_env().items() if not k.startswith(("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORD"))}
    proc = subprocess.run(
        [sys.executable, "-m", "tulu_jax.cli", "sft", *flags, "--config", str(REPO / "configs/sft/tiny.yaml"),
         f"output_dir={tmp_path / 'out'}"],
        env={**env, **env_extra}, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("tulu-jax: error: ") and what in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any work
