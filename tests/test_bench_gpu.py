"""scripts/bench_gpu.py --dry-run on CPU: every row of the GPU benchmark runs (tiny model) and reports finite,
positive figures, so the script is known to work before a GPU is available."""

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


@pytest.mark.slow  # six tiny compilations: ~25 s alone, a minute on a loaded 2-core machine
def test_bench_gpu_dry_run_table(tmp_path, capsys):
    bench_gpu = _load_script()
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--dry-run", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    names = [r["row"] for r in result["rows"]]
    expected = ["sft remat=off", "sft remat=on", "dpo remat=off", "dpo remat=on", "decode batch=1", "decode batch=64"]
    assert names == expected
    for r in result["rows"]:
        assert "error" not in r, r
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
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == expected
    assert f"jax {result['setup']['jax_version']}" in printed and result["setup"]["device"] in printed


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
        "print(sorted(m for m in ('grain', 'tensorboardX', 'datasets', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
