"""`tulu-jax verify`: accuracy table and --out rows in input order; bad rows named by file, line and field
(exit 2) or skipped and counted; flag errors."""

import json
import subprocess
import sys

import pytest
from conftest import cli_env
from test_rewards_math_gsm8k import GSM8K_VECTORS, MATH_VECTORS

from tulu_jax.cli import main
from tulu_jax.verify import verify_file

PROMPT = "<|user|>\nQ\n<|assistant|>\n"
ROWS = [
    {"id": i, "response": PROMPT + r, "ground_truth": g, "dataset": d, "expected": float(e)}
    for i, (d, (r, g, e)) in enumerate([("gsm8k", v) for v in GSM8K_VECTORS] + [("MATH", v) for v in MATH_VECTORS])
]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _table(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.strip().splitlines()[1:]}


def test_table_and_scored_rows_in_input_order(tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "scored.jsonl"
    assert main(["verify", "--data", data, "--out", str(out), "--workers", "2", "--timeout-s", "20"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == [r["id"] for r in ROWS]
    for row, got in zip(ROWS, scored, strict=True):
        assert {k: got[k] for k in row} == row  # the input row comes back whole
        assert got["score"] == row["expected"]
        assert got["verifier"] == row["dataset"].lower()
        assert got["verify_status"] == "ok"
    table = _table(capsys.readouterr().out)
    for name, dataset in (("gsm8k", "gsm8k"), ("math", "MATH")):
        mine = [r["expected"] for r in ROWS if r["dataset"] == dataset]
        n, passed, accuracy, timeouts, errors = table[name]
        assert (int(n), int(passed), int(timeouts), int(errors)) == (len(mine), sum(mine), 0, 0)
        assert float(accuracy) == pytest.approx(sum(mine) / len(mine), abs=5e-5)  # printed with 4 decimals
    assert int(table["all"][0]) == len(ROWS)


def test_lone_surrogates_round_trip(tmp_path):
    row = {"response": "\ud800 18", "ground_truth": "18", "dataset": "gsm8k"}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")  # json escapes the surrogate as \ud800
    out = tmp_path / "scored.jsonl"
    summary = verify_file(str(data), str(out), workers=1)
    assert json.loads(out.read_text()) == {**row, "score": 1.0, "verifier": "gsm8k", "verify_status": "ok"}
    assert summary["verifiers"]["gsm8k"] == {"n": 1, "passed": 1, "timeouts": 0, "errors": 0, "accuracy": 1.0}


GOOD = {"response": "18", "ground_truth": "18", "dataset": "gsm8k"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: invalid JSON"),
        ('["a list"]', "line 2: field '<row>': expected a JSON object, got list"),
        ({"ground_truth": "1", "dataset": "gsm8k"}, "line 2: field 'response': missing"),
        ({**GOOD, "ground_truth": ["18"]}, "line 2: field 'ground_truth': expected a string, got list"),
        ({**GOOD, "ground_truth": None}, "line 2: field 'ground_truth': expected a string, got null"),
        ({**GOOD, "dataset": 3}, "line 2: field 'dataset': expected a string, got int"),
        (
            {**GOOD, "dataset": "mmlu"},
            "line 2: field 'dataset': unknown dataset 'mmlu'; known: google_ifeval, gsm8k, ifeval, math",
        ),
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path, capsys, line, message):
    data = _write(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    assert main(["verify", "--data", data, "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tulu-jax: error: {data} {message}")
    assert len(err.splitlines()) == 1


def test_skip_counts_bad_rows(tmp_path, capsys):
    data = _write(tmp_path / "bad.jsonl", [GOOD, "{oops", {**GOOD, "dataset": "mmlu"}, {**GOOD, "response": "17"}])
    out = tmp_path / "scored.jsonl"
    assert main(["verify", "--data", data, "--out", str(out), "--workers", "1", "--on-bad-row", "skip"]) == 0
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [1.0, 0.0]
    printed = capsys.readouterr().out
    assert _table(printed)["gsm8k"][:2] == ["2", "1"]
    assert "skipped bad rows: 2 (invalid_json: 1, unknown_dataset: 1)" in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "--workers 0: must be >= 1"),
        (["--timeout-s", "0"], "--timeout-s 0.0: must be > 0"),
        (["--data", "/nonexistent/rows.jsonl"], "--data /nonexistent/rows.jsonl: no such file or directory"),
    ],
)
def test_bad_flags(tmp_path, capsys, flags, message):
    data = _write(tmp_path / "rows.jsonl", [GOOD])
    assert main(["verify", "--data", data, *flags]) == 2
    assert capsys.readouterr().err.strip() == f"tulu-jax: error: {message}"


@pytest.mark.xfail(
    strict=True,
    reason="tulu_jax/data/__init__.py imports the Grain pipeline (and so JAX) eagerly; verify reads rows with "
    "tulu_jax.data.sources. Passes once that package imports its pipelines lazily.",
)
def test_verify_command_imports_no_jax(tmp_path):
    data = _write(tmp_path / "rows.jsonl", [GOOD])
    code = (
        "import sys\nfrom tulu_jax.cli import main\n"
        f"if __name__ == '__main__':\n    assert main(['verify', '--data', {data!r}, '--workers', '1']) == 0\n"
        "    print(sorted(m for m in ('jax', 'grain', 'torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
