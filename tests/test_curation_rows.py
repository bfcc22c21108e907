"""tulu_jax.curation.rows: reading rows with bad-row handling, the prompt text of a row, whole-file writes in
three formats, and the resumable row-by-row JSONL writer."""

import json
import os

import pytest

from tulu_jax.curation.rows import ResumableJsonl, format_table, iter_rows, read_all, user_text, write_rows
from tulu_jax.data import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def mixed_file(tmp_path):
    """Line 1 good, 2 not JSON, 3 not UTF-8, 4 a list, 5 blank (not a row), 6 good."""
    return _jsonl(
        tmp_path / "rows.jsonl",
        [json.dumps(GOOD).encode(), b"{oops", b'{"a": "\xff"}', b"[1, 2]", b"", json.dumps({"id": 6}).encode()],
    )


def test_iter_rows_error_names_file_and_line(mixed_file):
    rows = iter_rows(mixed_file)
    assert next(rows) == (f"{mixed_file} line 1", GOOD)
    with pytest.raises(DataError, match=rf"{mixed_file} line 2: invalid JSON") as e:
        next(rows)
    assert e.value.reason == "invalid_json"


def test_iter_rows_skip_counts_reasons(mixed_file):
    counts = {}
    got = list(iter_rows(mixed_file, on_bad_row="skip", counts=counts))
    assert got == [(f"{mixed_file} line 1", GOOD), (f"{mixed_file} line 6", {"id": 6})]
    assert counts == {"rows_read": 5, "rows_skipped": {"invalid_json": 1, "not_utf8": 1, "not_an_object": 1}}


def test_iter_rows_bad_arguments(tmp_path, mixed_file):
    with pytest.raises(ValueError, match="on_bad_row"):
        next(iter_rows(mixed_file, on_bad_row="ignore"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        next(iter_rows(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        next(iter_rows(tmp_path / "x.csv"))


def test_read_all_shares_counts(tmp_path, mixed_file):
    other = _jsonl(tmp_path / "b.jsonl", [b'{"id": 7}'])
    counts = {}
    got = [r for _, r in read_all([str(mixed_file), str(other)], on_bad_row="skip", counts=counts)]
    assert got == [GOOD, {"id": 6}, {"id": 7}] and counts["rows_read"] == 6


def test_user_text_from_each_field():
    two_turns = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    assert user_text({"messages": two_turns}, "w") == "first\nsecond"
    assert user_text({"chosen": two_turns, "rejected": []}, "w") == "first\nsecond"
    assert user_text({"prompt": "just this"}, "w") == "just this"
    # messages wins over prompt; a None field counts as absent
    assert user_text({"messages": None, "prompt": "p"}, "w") == "p"
    assert user_text({"messages": two_turns, "prompt": "p"}, "w") == "first\nsecond"


@pytest.mark.parametrize(
    "row, reason, field",
    [
        ({"text": "x"}, "no_prompt", "no prompt field"),
        ({"messages": "hi"}, "bad_messages", "'messages'"),
        ({"messages": []}, "bad_messages", "'messages'"),
        ({"messages": [{"role": "user"}]}, "bad_messages", r"messages\[0\]"),
        ({"chosen": [{"role": "assistant", "content": "a"}]}, "no_user_turn", "'chosen' has no user turn"),
        ({"prompt": "  "}, "bad_prompt", "'prompt'"),
        ({"prompt": 3}, "bad_prompt", "'prompt'"),
    ],
)
def test_user_text_errors_name_where_and_field(row, reason, field):
    with pytest.raises(DataError, match=rf"^f.jsonl line 3: .*{field}") as e:
        user_text(row, "f.jsonl line 3")
    assert e.value.reason == reason


ROWS = [{"id": "a", "n": 1, "messages": GOOD["messages"]}, {"id": "b", "n": 2, "messages": GOOD["messages"]}]


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet", "out_folder"])
def test_write_rows_round_trips_each_format(tmp_path, name):
    path = tmp_path / "sub" / name
    assert write_rows(path, ROWS) == 2
    assert [r for _, r in iter_rows(path)] == ROWS
    assert write_rows(path, ROWS[:1]) == 1  # replaces an existing output whole (a folder too)
    assert [r for _, r in iter_rows(path)] == ROWS[:1]
    assert sorted(os.listdir(path.parent)) == [name]  # no temporary left behind


def test_write_rows_killed_midway_leaves_no_output(tmp_path):
    def rows():
        yield ROWS[0]
        raise KeyboardInterrupt  # a kill while the rows are produced

    path = tmp_path / "out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        write_rows(path, rows())
    assert os.listdir(tmp_path) == []


def _key(row):
    return row["id"]


def test_resumable_jsonl_resumes_and_cuts_torn_line(tmp_path):
    path = tmp_path / "gen.jsonl"
    with ResumableJsonl(path, _key) as out:
        out.append({"id": "a", "x": 1})
        out.append({"id": "b", "x": 2})
        out.skip("c", "duplicate", of="a")
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "d", "x"')  # killed mid-line
    out = ResumableJsonl(path, _key)
    assert out.repaired_torn_row
    assert out.done == {"a", "b", "c"}  # d is made again
    assert out.rows == [{"id": "a", "x": 1}, {"id": "b", "x": 2}]
    out.append({"id": "d", "x": 4})
    out.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "d"]
    skipped = [json.loads(line) for line in (tmp_path / "gen.jsonl.skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"key": "c", "reason": "duplicate", "of": "a"}]
    assert (out.written, out.skipped) == (1, 0)


def test_resumable_jsonl_overwrite_and_foreign_files(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text('{"id": "a"}\n')
    (tmp_path / "gen.jsonl.skipped.jsonl").write_text('{"key": "b", "reason": "r"}\n')
    with ResumableJsonl(path, _key, overwrite=True) as out:
        assert out.done == set() and out.rows == []
    assert path.read_text() == "" and (tmp_path / "gen.jsonl.skipped.jsonl").read_text() == ""
    path.write_text('{"id": "a"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=rf"{path} line 2: not a row this command wrote; pass --overwrite"):
        ResumableJsonl(path, _key)
    with pytest.raises(DataError, match="name it \\*.jsonl"):
        ResumableJsonl(tmp_path / "gen.parquet", _key)


def test_format_table_aligns_numbers_right():
    text = format_table(["name", "rows"], [["a", 5], ["long name", 1234], ["f", 0.5]], title="T")
    assert text.splitlines() == [
        "T",
        "name       rows",
        "---------  -----",
        "a              5",
        "long name   1234",
        "f          0.500",
    ]
