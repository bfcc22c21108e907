"""`tulu-jax eval`: readers of each benchmark layout (JSONL and Parquet), bad rows named by file, line and
field, the bundled samples scored right by the RLVR verifiers when answered right, and the command end to
end on a tiny random model (result files, summary, table, --limit, resume after a kill, one-line errors)."""

import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tulu_jax.cli import main
from tulu_jax.data.chat import DataError
from tulu_jax.evaluation import runner
from tulu_jax.evaluation.prompts import GSM8K_EXEMPLARS, MATH_EXEMPLARS
from tulu_jax.evaluation.tasks import BUILTIN, SAMPLE_NOTE, last_boxed, load_task


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
    assert [i.ground_truth for i in task.items] == ["5", "1234", "-7"]  # after '####', commas removed
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
    assert two.items == full.items[:2]


@pytest.mark.parametrize("writer,name", [(_jsonl, "test.jsonl"), (_parquet, "test.parquet")])
def test_math_reader(tmp_path, writer, name):
    writer(tmp_path / "math" / name, MATH_ROWS)
    task = load_task("math", str(tmp_path))
    assert [i.ground_truth for i in task.items] == ["\\frac{3}{4}", "\\text{(B)}"]  # the last boxed answer
    item = task.items[0]
    assert len(item.messages) == 2 * len(MATH_EXEMPLARS) + 1 and item.dataset == "math"
    assert item.messages[1]["content"].endswith("I hope it is correct.")
    assert item.messages[-1]["content"] == f"Problem:\n{MATH_ROWS[0]['problem']}"


@pytest.mark.parametrize(
    "text,want",
    [
        ("so $\\boxed{5}$", "5"),
        ("$\\boxed{\\frac{1}{2}}$ and then $\\boxed{\\sqrt{x^{2}}}$", "\\sqrt{x^{2}}"),
        ("$\\fbox{12}$", "12"),
        ("the answer is $\\boxed 7$.", "7"),
        ("\\boxed {x+1}", "x+1"),
        ("no box", None),
        ("$\\boxed{\\frac{1}{2}$", None),  # unclosed
        ("\\boxedx", None),  # another command
    ],
)
def test_last_boxed(text, want):
    assert last_boxed(text) == want


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
        ("ifeval", "ifeval/input_data.jsonl", IFEVAL_ROWS[0], {**IFEVAL_ROWS[0], "instruction_id_list": []},
         "instruction_id_list"),
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
    for bad, field in [
        ({**rows[0], "dataset": "chess"}, "dataset"),
        ({**rows[0], "ground_truth": ""}, "ground_truth"),
        ({"ground_truth": "4", "dataset": "gsm8k"}, "messages"),
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


def test_bundled_samples_are_marked_as_samples():
    for name in ("gsm8k", "math", "ifeval"):
        task = load_task(name)
        assert len(task.items) == 20 and task.source.startswith(SAMPLE_NOTE)
        assert len({i.ground_truth for i in task.items}) > 1
