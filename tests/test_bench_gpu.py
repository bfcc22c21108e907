"""scripts/bench_gpu.py --dry-run on CPU: every row of the GPU benchmark (train steps, decode, the RLVR step's
phases) runs on a tiny model and reports finite, positive figures, so the script is known to work before a GPU
is available."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # six tiny train/decode compilations and an RLVR step's ten: ~1 min alone, 2 on a loaded machine
def test_bench_gpu_dry_run_table(tmp_path, capsys):
    bench_gpu = _load_script()
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--dry-run", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    names = [r["row"] for r in result["rows"]]
    expected = ["sft remat=off", "sft remat=on", "dpo remat=off", "dpo remat=on", "decode batch=1", "decode batch=64"]
    expected += [f"rlvr {phase}" for phase in bench_gpu.RLVR_PHASES]
    assert names == expected
    for r in result["rows"]:
        assert "error" not in r, r
        if r["task"] == "rlvr":
            _check_rlvr_row(r, result["setup"])
            continue
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
        if r["task"] == "decode":
            assert r["new_tokens"] == r["batch"] * 4  # --dry-run: 4 new tokens per row, stop tokens off
            assert r["decode_s"] > 0
        else:
            assert math.isfinite(r["mfu"]) and 0 < r["mfu"] < 1, r
            assert r["step_s"] > 0 and math.isfinite(r["loss"])
            # tokens/s and MFU come from the same step time: MFU = tokens/s x FLOPs per token / peak.
            fpt = r["mfu"] * result["setup"]["peak_flops"] / r["tokens_per_s"]
            assert math.isclose(fpt, _flops_per_token(bench_gpu, result["setup"]), rel_tol=1e-9)
    _check_rlvr_step(result["rows"], result["setup"]["steps"])
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == expected
    assert f"jax {result['setup']['jax_version']}" in printed and result["setup"]["device"] in printed


def _check_rlvr_row(r: dict, setup: dict) -> None:
    assert math.isfinite(r["seconds"]) and r["seconds"] > 0, r
    if r["phase"] == "push":  # no tokens: a weight copy
        assert r["tokens_per_s"] is None
        return
    assert math.isclose(r["tokens_per_s"], r["tokens"] / r["seconds"], rel_tol=1e-12), r
    if r["phase"] in ("generate", "step"):  # stop tokens off: every prompt gets all its new tokens
        assert r["tokens"] == setup["rlvr_prompts"] * setup["rlvr_new_tokens"], r


def _check_rlvr_step(rows: list[dict], steps: int) -> None:
    """Each step's time covers its phases, so with one or two timed steps (medians = means) the step's median
    is at least the sum of the phases' medians."""
    by = {r["phase"]: r["seconds"] for r in rows if r["task"] == "rlvr"}
    assert steps in (1, 2), steps  # --dry-run's count; more steps make medians of sums differ from sums of medians
    assert by["step"] >= sum(v for k, v in by.items() if k != "step"), by
    assert math.isfinite(next(r for r in rows if r["row"] == "rlvr step")["loss"])


def _flops_per_token(bench_gpu, setup) -> float:
    from tulu_jax.models.config import preset

    return preset(setup["size"], **bench_gpu.DRY_RUN_MODEL).flops_per_token(setup["seq_len"])


def test_bench_gpu_imports_no_data_stack():
    """The GPU machine has no grain, tensorboardX, datasets or vLLM: the benchmark and the modules it runs
    (train steps, sampler) must not import them. A fresh interpreter, since other tests import them here."""
    code = (
        "import sys, runpy; sys.argv = ['bench_gpu']; "
        f"runpy.run_path({str(REPO / 'scripts' / 'bench_gpu.py')!r}, run_name='bench_gpu'); "
        "import tulu_jax.train.sft_step, tulu_jax.train.dpo_step, tulu_jax.train.rm_step, tulu_jax.sampling.sampler; "
        "import tulu_jax.train.rlvr_step, tulu_jax.train.episodes, tulu_jax.models.reward; "
        "print(sorted(m for m in ('grain', 'tensorboardX', 'datasets', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
