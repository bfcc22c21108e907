"""`tulu-jax eval`: readers of each benchmark layout (JSONL and Parquet), bad rows named by file, line and
field, the bundled samples scored right by the RLVR verifiers when answered right, and the command end to
end on a tiny random model (result files, summary, table, --limit, resume after a kill, one-line errors)."""

import contextlib
import io
import json
import os
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tulu_jax.cli import main
from tulu_jax.data.chat import DataError
from tulu_jax.evaluation import runner
from tulu_jax.evaluation.prompts import GSM8K_EXEMPLARS, MATH_EXEMPLARS
from tulu_jax.evaluation.tasks import BUILTIN, SAMPLE_NOTE, EvalItem, EvalTask, load_task
from tulu_jax.generate import make_backend


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


GSM8K_ROWS = [
    {"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "A town has 1,000 homes and builds 234. How many?", "answer": "1000 + 234 = 1234\n#### 1,234"},
    {"question": "It is 3 degrees and falls by 10. Temperature?", "answer": "3 - 10 = -7\n#### -7"},
    {"question": "Half of 0.5?", "answer": "0.5 / 2 = 0.25\n#### 0.25"},
]
MATH_ROWS = [
    {"problem": "Compute $1/2 + 1/4$.", "solution": "It is $\\boxed{\\frac{3}{4}}$.", "level": "Level 1"},
    {"problem": "Pick a letter.", "solution": "First $\\boxed{A}$, then in the end $\\boxed{\\text{(B)}}$."},
]
IFEVAL_ROWS = [
    {
        "key": 1,
        "prompt": "Say hi without commas.",
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [{}, {"num_words": 5, "relation": "less than"}],
    },
]


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize("writer,name", [(_jsonl, "test.jsonl"), (_parquet, "test.parquet")])
def test_gsm8k_reader(tmp_path, writer, name):
    path = writer(tmp_path / "gsm8k" / name, GSM8K_ROWS)
    task = load_task("gsm8k", str(tmp_path))
    assert task.source == str(path) and task.max_tokens == BUILTIN["gsm8k"].max_tokens
    assert [i.ground_truth for i in task.items] == ["5", "1234", "-7", "0.25"]  # after '####', commas removed
    assert all(i.dataset == "gsm8k" for i in task.items)
    item = task.items[1]
    # 8 exemplars as user/assistant pairs, then the question as the last user turn
    assert len(item.messages) == 2 * len(GSM8K_EXEMPLARS) + 1
    assert [m["role"] for m in item.messages[:2]] == ["user", "assistant"]
    assert item.messages[1]["content"].endswith(f"So the answer is {GSM8K_EXEMPLARS[0][2]}.")
    assert item.messages[-1] == {"role": "user", "content": f"Question: {GSM8K_ROWS[1]['question']}"}


def test_gsm8k_prefers_jsonl_and_limit_takes_the_first_items(tmp_path):
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_ROWS)
    _parquet(tmp_path / "gsm8k" / "test.parquet", GSM8K_ROWS[::-1])
    full = load_task("gsm8k", str(tmp_path))
    assert full.source.endswith("test.jsonl")
    two = load_task("gsm8k", str(tmp_path), limit=2)
    assert two.items == full.items[:2] and len(full.items) == len(GSM8K_ROWS)


@pytest.mark.parametrize("writer,name", [(_jsonl, "test.jsonl"), (_parquet, "test.parquet")])
def test_math_reader(tmp_path, writer, name):
    writer(tmp_path / "math" / name, MATH_ROWS)
    task = load_task("math", str(tmp_path))
    assert [i.ground_truth for i in task.items] == ["\\frac{3}{4}", "\\text{(B)}"]  # the last boxed answer
    item = task.items[0]
    assert len(item.messages) == 2 * len(MATH_EXEMPLARS) + 1 and item.dataset == "math"
    assert item.messages[1]["content"].endswith("I hope it is correct.")
    assert item.messages[-1]["content"] == f"Problem:\n{MATH_ROWS[0]['problem']}"


def test_ifeval_reader_jsonl_and_parquet(tmp_path):
    _jsonl(tmp_path / "a" / "ifeval" / "input_data.jsonl", IFEVAL_ROWS)
    (item,) = load_task("ifeval", str(tmp_path / "a")).items
    assert item.messages == [{"role": "user", "content": IFEVAL_ROWS[0]["prompt"]}]
    assert item.dataset == "google_ifeval"
    want = {k: IFEVAL_ROWS[0][k] for k in ("instruction_id_list", "kwargs", "prompt")}
    assert json.loads(item.ground_truth) == want
    # The Hugging Face Parquet copy gives every kwargs dict every argument, null where unset: nulls dropped.
    _parquet(tmp_path / "b" / "ifeval" / "input_data.parquet", IFEVAL_ROWS)
    (from_parquet,) = load_task("ifeval", str(tmp_path / "b")).items
    assert json.loads(from_parquet.ground_truth) == want


@pytest.mark.parametrize(
    "task,rel,good,bad,field",
    [
        ("gsm8k", "gsm8k/test.jsonl", GSM8K_ROWS[0], {"question": "q", "answer": "no marker"}, "answer"),
        ("gsm8k", "gsm8k/test.jsonl", GSM8K_ROWS[0], {"question": "q", "answer": "#### ten"}, "answer"),
        ("gsm8k", "gsm8k/test.jsonl", GSM8K_ROWS[0], {"answer": "#### 1"}, "question"),
        ("math", "math/test.jsonl", MATH_ROWS[0], {"problem": "p", "solution": "no box"}, "solution"),
        ("math", "math/test.jsonl", MATH_ROWS[0], {"problem": 3, "solution": "\\boxed{1}"}, "problem"),
        ("ifeval", "ifeval/input_data.jsonl", IFEVAL_ROWS[0], {**IFEVAL_ROWS[0], "kwargs": [{}]}, "kwargs"),
        (
            "ifeval",
            "ifeval/input_data.jsonl",
            IFEVAL_ROWS[0],
            {**IFEVAL_ROWS[0], "kwargs": [{}, {"num_words": 5}]},
            "kwargs",
        ),  # no relation: the checker would draw one at random
        (
            "ifeval",
            "ifeval/input_data.jsonl",
            IFEVAL_ROWS[0],
            {**IFEVAL_ROWS[0], "instruction_id_list": ["punctuation:no_comma", "no:such"]},
            "instruction_id_list",
        ),
        (
            "ifeval",
            "ifeval/input_data.jsonl",
            IFEVAL_ROWS[0],
            {**IFEVAL_ROWS[0], "instruction_id_list": []},
            "instruction_id_list",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, task, rel, good, bad, field):
    path = _jsonl(tmp_path / rel, [good, bad])
    with pytest.raises(DataError, match=re.escape(f"{path} line 2: field '{field}'")):
        load_task(task, str(tmp_path))


def test_bad_parquet_row_is_named_by_row(tmp_path):
    path = _parquet(tmp_path / "gsm8k" / "test.parquet", [GSM8K_ROWS[0], {"question": "q", "answer": "x"}])
    with pytest.raises(DataError, match=re.escape(f"{path} row 2: field 'answer'")):
        load_task("gsm8k", str(tmp_path))


def test_rlvr_file_rows(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}], "ground_truth": "4", "dataset": "gsm8k"},
        {"messages": [{"role": "user", "content": "x?"}], "ground_truth": "1", "dataset": "MATH"},
    ]
    task = load_task(f"mine={_jsonl(tmp_path / 'r.jsonl', rows)}")
    assert task.name == "mine" and [i.dataset for i in task.items] == ["gsm8k", "math"]
    assert task.items[0].messages == rows[0]["messages"]
    prompt_row = {"prompt": "2+2?", "ground_truth": "4", "dataset": "gsm8k"}  # as `tulu-jax generate` reads
    (item,) = load_task(f"mine={_jsonl(tmp_path / 'p.jsonl', [prompt_row])}").items
    assert item.messages == rows[0]["messages"] and item.ground_truth == "4"
    for bad, field in [
        ({**rows[0], "dataset": "chess"}, "dataset"),
        ({**rows[0], "ground_truth": ""}, "ground_truth"),
        ({"ground_truth": "4", "dataset": "gsm8k"}, "messages"),
        ({"prompt": " ", "ground_truth": "4", "dataset": "gsm8k"}, "prompt"),
        ({**rows[0], "dataset": "ifeval", "ground_truth": "not json"}, "ground_truth"),
        ({**rows[0], "dataset": "google_ifeval", "ground_truth": '{"instruction_id_list": ["nope"]}'}, "ground_truth"),
        ({**rows[0], "messages": [{"role": "assistant", "content": "4"}]}, "messages"),
    ]:
        path = _jsonl(tmp_path / "bad.jsonl", [rows[0], bad])
        with pytest.raises(DataError, match=re.escape(f"{path} line 2: field '{field}'")):
            load_task(f"mine={path}")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data-dir .*: no gsm8k/test.jsonl or gsm8k/test.parquet"):
        load_task("gsm8k", str(tmp_path))
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows to evaluate"):
        load_task("math", str(tmp_path))


def test_bundled_tiny_tasks():
    for name, dataset in (("tiny_arith", "gsm8k"), ("tiny_if", "ifeval")):
        task = load_task(name)
        assert task.source.endswith(f"tiny_{name[5:]}/eval.jsonl") and task.max_tokens == BUILTIN[name].max_tokens
        assert {i.dataset for i in task.items} == {dataset} and len(task.items) > 100
        assert [i.index for i in task.items] == list(range(len(task.items)))


def test_model_template_prompts(tiny_tokenizer):
    """--chat-template model renders with the folder's template: the tiny tokenizer stores Tülu's, so the
    prompts equal the built-in renderer's, few-shot chats included."""
    from tulu_jax.evaluation.cli import _prompt_ids

    tasks = [load_task("gsm8k", limit=2), load_task("tiny_if", limit=2)]
    budgets = {t.name: 8 for t in tasks}
    model = _prompt_ids(tasks, tiny_tokenizer, "model", budgets, 2048)
    assert model == _prompt_ids(tasks, tiny_tokenizer, "tulu", budgets, 2048)
    assert len(model["gsm8k"][0]) > 500  # the eight exemplars are in the prompt


def test_bundled_samples_are_marked_as_samples():
    for name in ("gsm8k", "math", "ifeval"):
        task = load_task(name)
        assert len(task.items) == 20 and task.source.startswith(SAMPLE_NOTE)
        assert len({i.ground_truth for i in task.items}) > 1


# ---------------------------------------------------------------- the command on a tiny random model

ARITH_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "ground_truth": str(a + b), "dataset": "gsm8k"}
    for a, b in [(2, 3), (10, 7), (4, 4), (9, 1), (6, 8), (5, 0)]
]


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    """A random model smaller than the `tiny` preset (2048 positions, for the few-shot prompts) saved as a
    Hugging Face folder with the tiny tokenizer."""
    import jax

    from tulu_jax.data import load_tokenizer
    from tulu_jax.models import hf
    from tulu_jax.models.config import preset
    from tulu_jax.models.loading import build_model, init_params
    from tulu_jax.sharding import make_mesh

    cfg = preset("tiny", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32)
    params = init_params(build_model(cfg), make_mesh(devices=jax.devices()[:1]), jax.random.key(0))
    return hf.export_hf(params, cfg, str(tmp_path_factory.mktemp("eval_model") / "hf"), tokenizer=load_tokenizer(None))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """A --data-dir with gsm8k and ifeval files, and a file of RLVR rows."""
    d = tmp_path_factory.mktemp("eval_tasks")
    _jsonl(d / "data" / "ifeval" / "input_data.jsonl", IFEVAL_ROWS * 5)
    _jsonl(d / "data" / "gsm8k" / "test.jsonl", GSM8K_ROWS)
    return {"arith": _jsonl(d / "arith.jsonl", ARITH_ROWS), "data": d / "data"}


def _eval_args(model, files, out, *extra):
    return [
        "eval", "--model", str(model), "--tasks", f"arith={files['arith']},ifeval,gsm8k",
        "--data-dir", str(files["data"]), "--limit", "4", "--max-tokens", "6", "--batch-size", "2",
        "--out", str(out), "--workers", "1", *extra,
    ]  # fmt: skip


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


_BACKENDS: dict = {}


def _shared_backend(backend, model, **kw):
    """`make_backend`, one sampler per model for the module: its compiled functions are reused by every run."""
    key = (backend, model, kw.get("dtype"), kw.get("mesh_shape"))
    if key not in _BACKENDS:
        _BACKENDS[key] = make_backend(backend, model, **kw)  # the real one, imported before any patching
    return _BACKENDS[key]


@pytest.fixture(autouse=True)
def _reuse_sampler(monkeypatch):
    monkeypatch.setattr("tulu_jax.generate.make_backend", _shared_backend)


@pytest.fixture(scope="module")
def full_run(eval_model, task_files, tmp_path_factory):
    """An uninterrupted run into a fresh --out, and what it printed."""
    out = tmp_path_factory.mktemp("eval_out") / "full"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setattr("tulu_jax.generate.make_backend", _shared_backend)
        assert main(_eval_args(eval_model, task_files, out)) == 0
    return out, buf.getvalue()


def test_eval_writes_rows_summary_and_table(full_run, task_files):
    out, printed = full_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"arith", "ifeval", "gsm8k"}
    for name, s in summary["tasks"].items():
        rows = _rows(out / f"{name}.jsonl")
        assert [r["index"] for r in rows] == [0, 1, 2, 3] and s["n"] == 4  # --limit 4
        assert all(r["task"] == name and 1 <= r["response_tokens"] <= 6 for r in rows)
        assert all(r["status"] == "ok" for r in rows) and s["verifier_errors"] == s["verifier_timeouts"] == 0
        assert s["accuracy"] == pytest.approx(sum(r["score"] for r in rows) / 4)
        assert s["mean_response_tokens"] == pytest.approx(sum(r["response_tokens"] for r in rows) / 4)
        assert s["no_eos_share"] == pytest.approx(sum(r["finish_reason"] == "length" for r in rows) / 4)
        assert all((r["finish_reason"] == "stop") or r["response_tokens"] == 6 for r in rows)
        line = next(x for x in printed.splitlines() if x.startswith(name + " "))
        assert line.split()[1:3] == [f"{s['accuracy']:.4f}", "4"] and line.endswith(s["source"])
    arith = _rows(out / "arith.jsonl")
    assert [r["prompt"] for r in arith] == [r["messages"] for r in ARITH_ROWS[:4]]
    assert [r["ground_truth"] for r in arith] == ["5", "17", "8", "10"]
    inst = summary["tasks"]["ifeval"]
    rows = _rows(out / "ifeval.jsonl")
    assert all(len(r["instructions"]) == 2 for r in rows)
    assert inst["prompt_level_strict"] == pytest.approx(sum(all(r["instructions"]) for r in rows) / 4)
    assert inst["instruction_level_strict"] == pytest.approx(sum(sum(r["instructions"]) for r in rows) / 8)
    assert inst["accuracy"] == pytest.approx(inst["prompt_level_strict"])
    assert summary["tasks"]["gsm8k"]["source"] == str(task_files["data"] / "gsm8k" / "test.jsonl")


def test_rows_hold_the_greedy_response_and_its_verdict(full_run, eval_model, tiny_tokenizer):
    """Each row is the backend's greedy completion of the Tülu-rendered prompt, decoded, with the verdict
    the reward gives it (checked in-process, without the worker pool)."""
    from tulu_jax.data.chat import prompt_token_ids
    from tulu_jax.rewards.registry import verify
    from tulu_jax.rollout.types import SamplingParams

    rows = _rows(full_run[0] / "arith.jsonl")[:2]  # batch 0, as the run sent it
    backend, _ = _shared_backend("local", str(eval_model), dtype="float32", mesh_shape=None)
    ids = [prompt_token_ids(r["prompt"], tiny_tokenizer) for r in rows]
    for row, c in zip(rows, backend.generate(ids, SamplingParams(max_tokens=6, temperature=0.0))):
        assert row["response"] == tiny_tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
        assert (row["response_tokens"], row["finish_reason"]) == (len(c.token_ids), c.finish_reason)
        assert row["score"] == verify("gsm8k", row["response"], row["ground_truth"]).score


def test_summarize_hand_computed():
    """Three IFEval rows: all followed; one of two followed; verifier error (2 instructions, counted failed)."""
    gt = json.dumps({"instruction_id_list": ["a", "b"], "kwargs": [{}, {}], "prompt": "p"})
    rows = [
        {"score": 1.0, "response_tokens": 3, "finish_reason": "stop", "status": "ok", "instructions": [True, True]},
        {"score": 0.0, "response_tokens": 5, "finish_reason": "length", "status": "ok", "instructions": [True, False]},
        {"score": 0.0, "response_tokens": 10, "finish_reason": "stop", "status": "error", "instructions": None},
    ]
    rows = [{**r, "ground_truth": gt} for r in rows]
    items = tuple(EvalItem(i, [{"role": "user", "content": "p"}], gt, "google_ifeval", f"f line {i}") for i in range(3))
    with pytest.raises(ValueError, match="2 rows for 3 items"):
        runner.summarize(EvalTask("t", items, "src", 8), rows[:2], max_tokens=8)
    task = EvalTask("t", items, "src", 8)
    s = runner.summarize(task, rows, max_tokens=8)
    assert s["complete"] is True
    assert s["accuracy"] == pytest.approx(1 / 3) and s["prompt_level_strict"] == pytest.approx(1 / 3)
    assert s["instruction_level_strict"] == pytest.approx(3 / 6)
    assert s["mean_response_tokens"] == pytest.approx(6.0) and s["no_eos_share"] == pytest.approx(1 / 3)
    assert (s["n"], s["verifier_errors"], s["verifier_timeouts"], s["source"]) == (3, 1, 0, "src")
    table = runner.format_table({"t": s}).splitlines()
    assert table[1].split()[:5] == ["t", "0.3333", "3", "6.0", "0.333"]
    assert table[2] == "note: t: 0 verifier timeouts and 1 errors, scored 0 (see the rows' status)"

    # A user file mixing datasets: the IFEval metrics cover only its google_ifeval rows.
    arith = {"score": 1.0, "response_tokens": 4, "finish_reason": "stop", "status": "ok", "ground_truth": "18"}
    mixed_items = items + (EvalItem(3, [{"role": "user", "content": "q"}], "18", "gsm8k", "f line 3"),)
    m = runner.summarize(EvalTask("m", mixed_items, "src", 8), [*rows, arith], max_tokens=8)
    assert m["accuracy"] == pytest.approx(2 / 4) and m["prompt_level_strict"] == pytest.approx(1 / 3)
    assert m["instruction_level_strict"] == pytest.approx(3 / 6)


def _kill(path, keep_rows):
    """What a kill mid-write leaves: `keep_rows` complete lines, then half of the next (no newline)."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:keep_rows]) + lines[keep_rows][: len(lines[keep_rows]) // 2])


def test_killed_run_resumes_to_the_same_files(full_run, eval_model, task_files, tmp_path):
    """A run killed inside its second task (the first task done, the second cut mid-batch with a torn line,
    the third not started, no summary yet) and started again ends with the uninterrupted run's files."""
    full, _ = full_run
    out = tmp_path / "killed"
    shutil.copytree(full, out)
    (out / "gsm8k.jsonl").unlink()
    (out / "summary.json").write_text(json.dumps({"model": "x", "tasks": {"arith": {}}}))  # written after task 1
    _kill(out / "ifeval.jsonl", keep_rows=0)
    assert main(_eval_args(eval_model, task_files, out)) == 0
    for name in ("arith.jsonl", "ifeval.jsonl", "gsm8k.jsonl", "summary.json", "settings.json"):
        assert (out / name).read_text() == (full / name).read_text(), name
    # killed after row 1 of a 2-row batch: the batch is regenerated together, only row 2 appended
    _kill(out / "arith.jsonl", keep_rows=1)
    assert main(_eval_args(eval_model, task_files, out)) == 0
    assert (out / "arith.jsonl").read_text() == (full / "arith.jsonl").read_text()


def test_more_items_extend_a_finished_run(full_run, eval_model, task_files, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(full_run[0], out)
    args = _eval_args(eval_model, task_files, out)
    args[args.index("--limit") + 1] = "6"  # two more items: one more batch of the compiled size
    args[args.index("--tasks") + 1] = f"arith={task_files['arith']}"
    assert main(args) == 0
    rows = _rows(out / "arith.jsonl")
    assert rows[:4] == _rows(full_run[0] / "arith.jsonl") and [r["index"] for r in rows[4:]] == [4, 5]
    assert json.loads((out / "summary.json").read_text())["tasks"]["arith"]["n"] == 6


def test_resume_refuses_other_settings_or_data(full_run, eval_model, task_files, tmp_path, capsys):
    out = tmp_path / "other"
    shutil.copytree(full_run[0], out)
    args = _eval_args(eval_model, task_files, out)
    args[args.index("--max-tokens") + 1] = "7"
    assert main(args) == 2
    assert re.fullmatch(r"tulu-jax: error: .*settings.json: task \w+ was run with max_tokens=6.*\n",
                        capsys.readouterr().err)  # fmt: skip
    other = _jsonl(tmp_path / "other.jsonl", ARITH_ROWS[::-1])
    args = _eval_args(eval_model, {**task_files, "arith": other}, out)
    assert main(args) == 2
    assert "arith.jsonl line 1: not the row of task arith item 0" in capsys.readouterr().err
    args = _eval_args(eval_model, task_files, out)
    args[args.index("--batch-size") + 1] = "3"  # other padding: greedy float32 tokens may differ
    assert main(args) == 2
    assert "settings.json: rows here were made with batch_size=2, this run has 3" in capsys.readouterr().err
    assert main(_eval_args(eval_model, task_files, out, "--timeout-s", "5")) == 2
    assert "settings.json: rows here were made with timeout_s=10.0, this run has 5.0" in capsys.readouterr().err
    fresh = tmp_path / "fresh"  # a foreign file where a row file goes: refused before settings.json is written
    _jsonl(fresh / "arith.jsonl", [{"stale": True}])
    assert main(_eval_args(eval_model, task_files, fresh)) == 2
    assert "arith.jsonl line 1: not the row" in capsys.readouterr().err
    assert sorted(p.name for p in fresh.iterdir()) == ["arith.jsonl"]


def test_a_retrained_model_is_refused_and_overwrite_starts_over(full_run, eval_model, task_files, tmp_path, capsys):
    from tulu_jax.evaluation.runner import weights_fingerprint

    model = tmp_path / "model"
    shutil.copytree(eval_model, model)
    before = weights_fingerprint(str(model))
    assert weights_fingerprint(str(model)) == before  # stable while the weights are untouched
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten
    assert weights_fingerprint(str(model)) != before

    out = tmp_path / "stale"
    shutil.copytree(full_run[0], out)
    settings = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({**settings, "weights": "0" * 16}))  # rows of other weights
    assert main(_eval_args(eval_model, task_files, out)) == 2
    err = capsys.readouterr().err
    assert "rows here were made with weights='0000000000000000'" in err and "--overwrite" in err
    (out / "ifeval.jsonl").write_text('{"stale": true}\n')  # would be refused as foreign without --overwrite
    assert main(_eval_args(eval_model, task_files, out, "--overwrite")) == 0
    for name in ("arith.jsonl", "ifeval.jsonl", "gsm8k.jsonl", "summary.json", "settings.json"):
        assert (out / name).read_text() == (full_run[0] / name).read_text(), name


def _edit_chat_template(model_dir, edit):
    """Applies `edit` (str -> str) to the folder's chat template, wherever transformers saved it."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(edit(jinja.read_text()))
        return
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": edit(config["chat_template"])})
    )


def test_an_edited_chat_template_is_refused(eval_model, task_files, tmp_path, monkeypatch, capsys):
    """Rows keep a hash of their prompt's token ids: after the model's chat template changes, the old rows
    are refused (one line suggesting --overwrite), not mixed with new ones."""
    model = tmp_path / "model"
    shutil.copytree(eval_model, model)
    same_weights = str(eval_model)  # the copy's weights are the fixture's: reuse its compiled sampler
    monkeypatch.setattr("tulu_jax.generate.make_backend", lambda b, m, **kw: _shared_backend(b, same_weights, **kw))
    out = tmp_path / "out"
    args = [
        "eval", "--model", str(model), "--tasks", f"arith={task_files['arith']}", "--limit", "2",
        "--max-tokens", "6", "--batch-size", "2", "--out", str(out), "--workers", "1", "--chat-template", "model",
    ]  # fmt: skip
    assert main(args) == 0
    before = (out / "arith.jsonl").read_text()
    _edit_chat_template(model, lambda t: "Answer briefly.\n" + t)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "arith.jsonl line 1: the prompt of task arith item 0 now renders to other" in err
    assert "--overwrite" in err and (out / "arith.jsonl").read_text() == before  # refused: nothing rewritten
    assert main([*args, "--overwrite"]) == 0
    rows = _rows(out / "arith.jsonl")
    assert len(rows) == 2 and all(
        r["prompt_sha"] != json.loads(b)["prompt_sha"] for r, b in zip(rows, before.splitlines())
    )


def test_an_input_file_in_out_is_refused_and_nothing_written(eval_model, tmp_path, capsys):
    out = tmp_path / "clob"
    mine = _jsonl(out / "mine.jsonl", ARITH_ROWS)
    args = ["eval", "--model", str(eval_model), "--tasks", f"mine={mine}", "--out", str(out), "--overwrite"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"tulu-jax: error: --tasks mine={mine}: the task's file is also an output in --out; use another --out\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["mine.jsonl"] and len(_rows(mine)) == len(ARITH_ROWS)


def test_a_smaller_limit_reuses_the_first_rows(full_run, eval_model, task_files, tmp_path):
    """Items and greedy rows are deterministic: --limit 3 after --limit 4 summarizes the first 3 rows."""
    out = tmp_path / "fewer"
    shutil.copytree(full_run[0], out)
    args = _eval_args(eval_model, task_files, out)
    args[args.index("--limit") + 1] = "3"
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())["tasks"]
    for name in ("arith", "ifeval", "gsm8k"):
        rows = _rows(out / f"{name}.jsonl")
        assert rows == _rows(full_run[0] / f"{name}.jsonl")  # the file keeps its 4 rows
        s = summary[name]
        assert s["n"] == 3 and s["complete"] is True
        assert s["accuracy"] == pytest.approx(sum(r["score"] for r in rows[:3]) / 3)
        assert s["mean_response_tokens"] == pytest.approx(sum(r["response_tokens"] for r in rows[:3]) / 3)


def test_a_killed_run_leaves_unfinished_tasks_marked(full_run, eval_model, task_files, tmp_path, monkeypatch):
    """Each task of a run is marked {"complete": false} in summary.json until it is done, so a summary left
    by a run killed in its second task says which tasks it lacks (even over an earlier run's summary)."""
    out = tmp_path / "partial"
    shutil.copytree(full_run[0], out)
    (out / "ifeval.jsonl").unlink()
    evaluate = runner.evaluate_task

    def killed_in_ifeval(task, *a, **kw):
        if task.name == "ifeval":
            raise KeyboardInterrupt
        return evaluate(task, *a, **kw)

    monkeypatch.setattr(runner, "evaluate_task", killed_in_ifeval)
    assert main(_eval_args(eval_model, task_files, out)) == 130  # Ctrl-C: `tulu-jax: interrupted`
    tasks = json.loads((out / "summary.json").read_text())["tasks"]
    full = json.loads((full_run[0] / "summary.json").read_text())["tasks"]
    assert tasks == {"arith": full["arith"], "ifeval": {"complete": False}, "gsm8k": {"complete": False}}


def test_score_responses_rewards_right_answers():
    """The scoring path of the runner, on the bundled samples answered right and wrong: a check that fails
    if the ground truths or the verifier wiring are wrong (a random model scores ~0 either way)."""
    from tulu_jax.rewards.scorer import Scorer

    gsm8k = load_task("gsm8k").items + load_task("tiny_arith", limit=20).items
    math = load_task("math").items
    right = [f"Some work. So the answer is {i.ground_truth}." for i in gsm8k]
    right += [f"Final Answer: The final answer is ${i.ground_truth}$. I hope it is correct." for i in math]
    wrong = [f"So the answer is {int(i.ground_truth) + 1}." for i in gsm8k]
    wrong += ["Final Answer: The final answer is $-99$. I hope it is correct." for _ in math]
    with Scorer(workers=1) as scorer:
        assert [v.score for v in runner.score_responses([*gsm8k, *math], right, scorer)] == [1.0] * 60
        assert [v.score for v in runner.score_responses([*gsm8k, *math], wrong, scorer)] == [0.0] * 60


def test_score_responses_ifeval_instructions():
    from tulu_jax.rewards.scorer import Scorer

    (item,) = load_task("ifeval", limit=1).items  # no commas
    task = load_task("ifeval")
    both = next(i for i in task.items if "keywords:frequency" in i.ground_truth)  # food x3 and no commas
    responses = ["Dear neighbors join us on Sunday for cake.", "Dear neighbors, join us."]
    with Scorer(workers=1) as scorer:
        ok, bad = runner.score_responses([item, item], responses, scorer)
        food_ok, food_half = runner.score_responses(
            [both, both], ["Good food. More food. Best food.", "Good food, more food, best food."], scorer
        )
    assert (ok.score, ok.details) == (1.0, (True,)) and (bad.score, bad.details) == (0.0, (False,))
    assert food_ok.details == (True, True) and food_half.details == (True, False) and food_half.score == 0.0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--limit", "0"], "--limit 0: must be >= 1"),
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--timeout-s", "0"], "--timeout-s 0.0: must be a finite number > 0"),
        (["--timeout-s", "inf"], "--timeout-s inf: must be a finite number > 0"),
        (["--timeout-s", "nan"], "--timeout-s nan: must be a finite number > 0"),
        (["--tasks", "nope"], "--tasks: unknown task 'nope'"),
        (["--tasks", "gsm8k,gsm8k"], "a task is named twice"),
        (["--tasks", "a b=x.jsonl"], "--tasks: task name 'a b'"),
        (["--tasks", "mine=/no/such.jsonl"], "--tasks mine=/no/such.jsonl: no such file"),
        (["--tasks", "gsm8k=/x.jsonl"], "--tasks: gsm8k=/x.jsonl: gsm8k is a built-in task"),
        (["--servers", "http://127.0.0.1:8000"], "--servers http://127.0.0.1:8000: needs --backend vllm"),
        (["--backend", "vllm", "--servers", "notaurl"], "--servers notaurl: not an http(s) URL"),
        (["--backend", "vllm", "--servers", "ftp://h/"], "--servers ftp://h: not an http(s) URL"),
        (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir: no such directory"),
        (["--backend", "vllm"], "--backend vllm needs --servers"),
        (["--mesh", "3,1"], "--mesh 3,1: expected three comma-separated integers"),
        (["x=1"], "eval takes no key=value overrides"),
    ],
)
def test_bad_flags_exit_2_with_one_line(eval_model, tmp_path, capsys, extra, message):
    args = ["eval", "--model", str(eval_model), "--tasks", "gsm8k", "--out", str(tmp_path / "o")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("tulu-jax: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o" / "settings.json").exists()  # a refused run writes nothing


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released): connecting to it is refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_vllm_server_is_refused_up_front(eval_model, tmp_path, capsys):
    """No retrying for minutes against a server that is not there: one probe, one line, nothing written."""
    import time

    url = f"http://127.0.0.1:{_closed_port()}"
    args = ["eval", "--model", str(eval_model), "--tasks", "tiny_arith", "--out", str(tmp_path / "o")]
    start = time.monotonic()
    assert main([*args, "--backend", "vllm", "--servers", f"{url}/"]) == 2
    assert time.monotonic() - start < 30  # the client's retry deadline is 300 s
    err = capsys.readouterr().err
    assert err == (
        f"tulu-jax: error: --servers {url}: no vLLM server answers (connection refused); "
        "start one with tulu-jax vllm --model DIR\n"
    )
    assert not (tmp_path / "o" / "settings.json").exists()


def test_help_shows_defaults_and_settings(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10.0)" in text and "(default: 64)" in text and "settings.json" in text


def test_bad_paths_exit_2_with_one_line(eval_model, tmp_path, capsys):
    afile = tmp_path / "f"
    afile.write_text("x")
    plain = tmp_path / "plain"  # the model with a tokenizer that has no chat template
    shutil.copytree(eval_model, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    for argv, message in [
        (["--model", str(tmp_path / "none"), "--tasks", "gsm8k"], "no such directory"),
        (["--model", str(eval_model), "--tasks", "gsm8k", "--out", str(afile)], f"--out {afile}: is a file"),
        (["--model", str(eval_model), "--tasks", "gsm8k", "--data-dir", str(tmp_path)], "no gsm8k/test.jsonl"),
        (
            ["--model", str(plain), "--tasks", "tiny_if", "--chat-template", "model"],
            "--chat-template model: the tokenizer at",
        ),
        (["--model", str(eval_model), "--tasks", "gsm8k", "--max-tokens", "1000"], "exceeds the model's 2048"),
    ]:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tulu-jax: error: ") and err.count("\n") == 1 and message in err
