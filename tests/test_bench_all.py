"""scripts/bench_all.py: a real --quick run of a cheap benchmark (the verifier pool) through the whole path
(child process, its --json, the combined table, --out), and the generic reader and failure handling on
stand-in benchmark scripts."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, cli_env


@pytest.fixture(scope="module")
def bench_all():
    sys.path.insert(0, str(REPO / "scripts"))  # bench_all imports machine.py from next to it
    spec = importlib.util.spec_from_file_location("bench_all", REPO / "scripts" / "bench_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_all"] = module  # its dataclass looks its module up while the class is made
    spec.loader.exec_module(module)
    return module


def _table(printed: str) -> list[list[str]]:
    """The combined table's body rows as cells (it is the last Markdown table printed)."""
    lines = printed.splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("| benchmark | case | metric |"))
    body = []
    for line in lines[head + 2 :]:
        if not line.startswith("| "):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def test_quick_verify_run(bench_all, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_all.py"), "--quick", "--only", "verify", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    raw = result["benchmarks"]["verify"]["result"]
    assert result["benchmarks"]["verify"]["rc"] == 0
    workers = raw["workers"]
    quick = next(b for b in bench_all.BENCHES if b.name == "verify").quick  # bench_all's --quick item counts
    counts = {v: int(quick[quick.index(f"--{v}") + 1]) for v in ("gsm8k", "math", "ifeval")}
    verifiers = [r["verifier"] for r in raw["rows"]]
    assert set(verifiers) <= set(counts) and {"gsm8k", "math"} <= set(verifiers)
    rows = result["rows"]
    assert {r["benchmark"] for r in rows} == {"verify"}
    by = {(r["case"], r["metric"]): r for r in rows}
    assert len(by) == len(rows) == 2 * len(verifiers)
    for v in verifiers:
        total = by[(f"{v} items={counts[v]}", "per_s")]
        per_worker = by[(f"{v} items={counts[v]}", "per_s_per_worker")]
        assert total["unit"] == per_worker["unit"] == "verifications/s"
        assert total["value"] > 0 and per_worker["value"] > 0
        # bench_verify rounds both to 0.1: per_worker x workers differs from the total by at most the two roundings
        assert abs(per_worker["value"] * workers - total["value"]) <= 0.05 * workers + 0.05 + 1e-9
    table = _table(proc.stdout)
    assert [(c[0], c[1], c[2], c[4]) for c in table] == [
        (r["benchmark"], r["case"], r["metric"], r["unit"]) for r in rows
    ]


def _script(path, body: str) -> str:
    path.write_text("import json, sys\nout = sys.argv[sys.argv.index('--json') + 1]\n" + body)
    return str(path)


def test_failing_benchmark_is_a_row_and_the_rest_run(bench_all, tmp_path, monkeypatch, capsys):
    """A child that fails gives an error row with its error line; one before and one after still report; the
    exit code is 1. The after-one writes JSON in the generic form bench_push.py is told to use."""
    bad = _script(tmp_path / "bad.py", "print('working'); print('ValueError: boom', file=sys.stderr); sys.exit(3)\n")
    generic = _script(
        tmp_path / "generic.py",
        "rows = [{'case': 'tiny', 'push_s': 0.25, 's_per_gb': 16.0, 'gb': 0.015625, 'note': 'x', 'units': "
        "{'gb': 'GB'}}]\njson.dump({'rows': rows, 'machine': 'ignored'}, open(out, 'w'))\n",
    )
    listed = _script(
        tmp_path / "listed.py", "json.dump([{'engine': 'e', 'batch': 4, 'tokens_per_s': 12.5}], open(out, 'w'))\n"
    )
    Bench = bench_all.Bench
    monkeypatch.setattr(
        bench_all,
        "BENCHES",
        (
            Bench("listed", listed, case=("engine", "batch"), metrics=(("tokens_per_s", "tok/s", 1),)),
            Bench("bad", bad),
            Bench("generic", generic),
            Bench("missing", str(tmp_path / "nope.py")),
        ),
    )
    out = tmp_path / "all.json"
    assert bench_all.main(["--out", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [(r["benchmark"], r["case"], r["metric"], r["value"], r["unit"]) for r in rows] == [
        ("listed", "e batch=4", "tokens_per_s", 12.5, "tok/s"),
        ("bad", "-", "error", "exit code 3: ValueError: boom", ""),
        ("generic", "tiny", "push_s", 0.25, "s"),
        ("generic", "tiny", "s_per_gb", 16.0, "s/GB"),
        ("generic", "tiny", "gb", 0.015625, "GB"),
        ("missing", "-", "skipped", f"{tmp_path / 'nope.py'} does not exist", ""),
    ]
    printed = capsys.readouterr().out
    assert "working" in printed  # the child's own output is streamed
    assert [c[2] for c in _table(printed)] == [r["metric"] for r in rows]


def test_json_rows_forms(bench_all):
    assert bench_all.json_rows({"rows": [{"a": 1}], "x": 2}) == [{"a": 1}]
    assert bench_all.json_rows([{"a": 1}, {"b": 2}]) == [{"a": 1}, {"b": 2}]
    assert bench_all.json_rows({"push_s": 1.0}) == [{"push_s": 1.0}]
    with pytest.raises(ValueError, match="list of row dicts"):
        bench_all.json_rows([1, 2])
    assert bench_all.guess_unit("gen_tok_s") == "tok/s" and bench_all.guess_unit("loss") == ""
