"""`tulu-jax verify`: accuracy table and --out rows in input order; bad rows named by file, line and field
(exit 2) or skipped and counted; flag errors."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import cli_env
from test_rewards_math_gsm8k import GSM8K_VECTORS, MATH_VECTORS

from tulu_jax.cli import main
from tulu_jax.rewards import check_ground_truth, verify
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
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl", "scored.jsonl"]  # the .tmp was renamed


@pytest.mark.parametrize("before", [None, "rows of an earlier run\n"])
def test_bad_row_late_in_the_file_leaves_out_as_it_was(tmp_path, capsys, monkeypatch, before):
    """A bad row after some batches were written: no truncated --out, an earlier --out kept, no .tmp left."""
    monkeypatch.setattr("tulu_jax.verify.BATCH_ROWS", 1)  # every row is its own batch, written before the next
    data = _write(tmp_path / "rows.jsonl", [GOOD, GOOD, {**GOOD, "dataset": "mmlu"}])
    out = tmp_path / "scored.jsonl"
    if before is not None:
        out.write_text(before)
    assert main(["verify", "--data", data, "--out", str(out), "--workers", "1"]) == 2
    assert "line 3: field 'dataset'" in capsys.readouterr().err
    assert (out.read_text() if out.exists() else None) == before
    assert not os.path.exists(f"{out}.tmp")


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


GOOGLE = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "prompt": "Answer."}
# (dataset, malformed ground truth): every response would score 0 with status "error".
BAD_GROUND_TRUTHS = [
    ("ifeval", "not json"),
    ("ifeval", '["validate_title"]'),
    ("ifeval", '{"func_name": "validate_nothing"}'),
    ("ifeval", '{"func_name": "validate_end"}'),
    ("ifeval", '{"func_name": "validate_title", "N": 3}'),
    ("ifeval", '{"func_name": "validate_word_constraint", "N": "3", "quantifier": "around"}'),
    ("google_ifeval", json.dumps({k: v for k, v in GOOGLE.items() if k != "prompt"})),
    ("google_ifeval", json.dumps({**GOOGLE, "instruction_id_list": ["detectable_format:rephrase"]})),
    ("google_ifeval", json.dumps({**GOOGLE, "kwargs": [{}, {}]})),
    ("google_ifeval", json.dumps({**GOOGLE, "kwargs": [{"num_words": 5}]})),
]


@pytest.mark.parametrize(("dataset", "ground_truth"), BAD_GROUND_TRUTHS)
def test_bad_ground_truth_is_a_bad_row(tmp_path, capsys, dataset, ground_truth):
    with pytest.raises(ValueError) as from_verifier:  # in-process, the verifier raises on any response
        verify(dataset, "18", ground_truth)
    data = _write(tmp_path / "bad.jsonl", [GOOD, {"response": "18", "ground_truth": ground_truth, "dataset": dataset}])
    assert main(["verify", "--data", data, "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tulu-jax: error: {data} line 2: field 'ground_truth': {from_verifier.value}"


@pytest.mark.parametrize(("dataset", "ground_truth"), [("gsm8k", ""), ("MATH", " \n")])
def test_empty_reference_answer_is_a_bad_row(tmp_path, capsys, dataset, ground_truth):
    data = _write(tmp_path / "bad.jsonl", [GOOD, {"response": "18", "ground_truth": ground_truth, "dataset": dataset}])
    assert main(["verify", "--data", data, "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"tulu-jax: error: {data} line 2: field 'ground_truth': must be a non-empty string (the reference answer)"
    )


def test_check_ground_truth_is_fast_on_repeated_ground_truths():
    truths = [json.dumps({**GOOGLE, "prompt": f"Answer {i}."}) for i in range(20)]
    check_ground_truth("google_ifeval", truths[0])  # the first google_ifeval check imports its checkers
    start = time.perf_counter()
    for i in range(20_000):
        check_ground_truth("google_ifeval", truths[i % len(truths)])
    rate = 20_000 / (time.perf_counter() - start)
    assert rate > 50_000, f"{rate:.0f} checks/s"  # verify reads tens of thousands of rows per second


def test_skip_counts_bad_rows_and_keeps_them_in_out(tmp_path, capsys):
    lines = [
        GOOD,
        "{oops",
        {**GOOD, "dataset": "mmlu"},
        {**GOOD, "response": "17"},
        {**GOOD, "dataset": "ifeval", "ground_truth": "{}"},
    ]
    data = _write(tmp_path / "bad.jsonl", lines)
    out = tmp_path / "scored.jsonl"
    assert main(["verify", "--data", data, "--out", str(out), "--workers", "1", "--on-bad-row", "skip"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["score"], r["verify_status"]) for r in scored] == [
        (1.0, "ok"),
        (None, "skipped"),
        (None, "skipped"),
        (0.0, "ok"),
        (None, "skipped"),
    ]
    assert scored[1]["verify_message"].startswith(f"{data} line 2: invalid JSON")
    message = scored[2].pop("verify_message")
    assert scored[2] == {**lines[2], "score": None, "verifier": None, "verify_status": "skipped"}
    # (test_scorer's plugin may have added test verifiers to the known names)
    assert message.startswith(f"{data} line 3: field 'dataset': unknown dataset 'mmlu'; known: google_ifeval, gsm8k")
    assert scored[4]["verify_message"].startswith(f"{data} line 5: field 'ground_truth': IFEval ground truth")
    assert "verify_message" not in scored[0]
    printed = capsys.readouterr().out
    assert _table(printed)["gsm8k"][:2] == ["2", "1"]
    assert "skipped bad rows: 3 (invalid_json: 1, unknown_dataset: 1, bad_ground_truth: 1)" in printed


def test_timeout_message_in_out_and_under_the_table(tmp_path, capsys):
    hang = {"response": "So the answer is $\\boxed{(x+y+z)^{999}}$.", "ground_truth": "x^2+1", "dataset": "math"}
    data = _write(tmp_path / "rows.jsonl", [GOOD, hang])
    out = tmp_path / "scored.jsonl"
    assert main(["verify", "--data", data, "--out", str(out), "--workers", "1", "--timeout-s", "1"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert (scored[1]["score"], scored[1]["verify_status"]) == (0.0, "timeout")
    assert scored[1]["verify_message"] == "over the 1 s deadline"
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == ["timeouts and errors:", f"  {data} line 2 (math, timeout): over the 1 s deadline"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "no rows to verify"),
        (["", "  "], "no rows to verify"),
        (
            ["{oops", {**GOOD, "dataset": "mmlu"}],
            "no rows to verify: all 2 rows were skipped as bad (invalid_json: 1, unknown_dataset: 1)",
        ),
    ],
)
def test_no_rows_to_verify(tmp_path, capsys, lines, message):
    data = _write(tmp_path / "rows.jsonl", lines)
    assert main(["verify", "--data", data, "--workers", "1", "--on-bad-row", "skip"]) == 2
    assert capsys.readouterr().err.strip() == f"tulu-jax: error: {data}: {message}"


def test_if_semantics_is_case_insensitive(tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", [GOOD])
    assert main(["verify", "--data", data, "--workers", "1", "--if-semantics", "HEAD"]) == 0
    assert _table(capsys.readouterr().out)["all"][:2] == ["1", "1"]


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tulu_jax.verify.verify_file", interrupted)
    data = _write(tmp_path / "rows.jsonl", [GOOD])
    assert main(["verify", "--data", data]) == 130
    assert capsys.readouterr().err == "tulu-jax: interrupted\n"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--workers", "0"],
            f"--workers 0: must be between 1 and {4 * (os.cpu_count() or 1)} "
            f"(4 per CPU; this machine has {os.cpu_count() or 1})",
        ),
        (["--timeout-s", "0"], "--timeout-s 0: must be a finite number of seconds > 0"),
        (["--timeout-s", "inf"], "--timeout-s inf: must be a finite number of seconds > 0"),
        (["--timeout-s", "nan"], "--timeout-s nan: must be a finite number of seconds > 0"),
        (["--timeout-s", "-1"], "--timeout-s -1: must be a finite number of seconds > 0"),
        (["--out", ""], "--out: empty path; give a file to write or leave --out out"),
        (["--out", "/proc/x.jsonl"], "--out /proc/x.jsonl: cannot be written: No such file or directory"),
        (
            ["--workers", str(4 * (os.cpu_count() or 1) + 1)],
            f"--workers {4 * (os.cpu_count() or 1) + 1}: must be between 1 and {4 * (os.cpu_count() or 1)} "
            f"(4 per CPU; this machine has {os.cpu_count() or 1})",
        ),
        (["--data", "/nonexistent/rows.jsonl"], "--data /nonexistent/rows.jsonl: no such file or directory"),
        (["--out", "DATA"], "--out DATA: is the --data file; writing would destroy it"),
    ],
)
def test_bad_flags(tmp_path, capsys, flags, message):
    data = _write(tmp_path / "rows.jsonl", [GOOD])
    message = message.replace("DATA", data)
    assert main(["verify", "--data", data, *[f.replace("DATA", data) for f in flags]]) == 2
    assert capsys.readouterr().err.strip() == f"tulu-jax: error: {message}"


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
