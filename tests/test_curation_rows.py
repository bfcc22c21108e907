"""tulu_jax.curation.rows: reading rows with bad-row handling, the prompt text of a row, whole-file writes in
three formats (and the checks that keep them from destroying anything), and the resumable JSONL writer."""

import json
import os
import subprocess
import sys

import pytest

from tulu_jax.curation.rows import (
    ResumableJsonl,
    check_output,
    format_table,
    is_saved_dataset,
    iter_rows,
    output_format,
    read_all,
    user_text,
    write_rows,
)
from tulu_jax.data import DataError
from tulu_jax.inputs import InputError

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
    seen: list[dict] = []
    out = ResumableJsonl(path, _key, on_row=seen.append)
    assert out.repaired_torn_row
    assert out.done == {"a", "b", "c"}  # d is made again
    assert seen == [{"id": "a", "x": 1}, {"id": "b", "x": 2}]
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
    seen: list[dict] = []
    with ResumableJsonl(path, _key, overwrite=True, on_row=seen.append) as out:
        assert out.done == set() and seen == []
    assert path.read_text() == "" and (tmp_path / "gen.jsonl.skipped.jsonl").read_text() == ""
    path.write_text('{"id": "a"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=rf"{path} line 2: not a row this command wrote; pass --overwrite"):
        ResumableJsonl(path, _key)
    with pytest.raises(DataError, match="name it \\*.jsonl"):
        ResumableJsonl(tmp_path / "gen.parquet", _key)


def test_resumable_jsonl_refuses_other_settings_and_a_second_writer(tmp_path):
    path = tmp_path / "gen.jsonl"
    with ResumableJsonl(path, _key, settings={"seed": 0, "model": "m"}) as out:
        out.append({"id": "a"})
        with pytest.raises(DataError, match=rf"{path}: another command is writing it"):
            ResumableJsonl(path, _key)
    with ResumableJsonl(path, _key, settings={"seed": 0, "model": "m"}) as out:  # same settings: resumes
        assert out.done == {"a"}
    with pytest.raises(DataError, match=r"other settings \(seed: 0 -> 1\); rerun with the same ones"):
        ResumableJsonl(path, _key, settings={"seed": 1, "model": "m"})
    with ResumableJsonl(path, _key, settings={"seed": 1, "model": "m"}, overwrite=True) as out:
        assert out.done == set()
    assert json.loads((tmp_path / "gen.jsonl.settings.json").read_text()) == {"seed": 1, "model": "m"}


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


# ---------------------------------------------------------------------------------------------------------
# Output safety (write_rows / check_output)


def test_write_rows_replaces_only_a_saved_dataset_folder(tmp_path):
    """--out ~/data --overwrite used to rmtree whatever folder was there."""
    home = tmp_path / "data"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="not a datasets.save_to_disk output"):
        write_rows(home, ROWS)
    with pytest.raises(InputError, match="not a datasets.save_to_disk output"):
        check_output(str(home), "--out", overwrite=True)
    assert (home / "notes.txt").read_text() == "precious"
    saved = tmp_path / "saved"
    write_rows(saved, ROWS)
    assert is_saved_dataset(str(saved)) and not is_saved_dataset(str(home))
    (saved / "extra.json").write_text("{}")  # something a user put there: no longer ours to delete
    with pytest.raises(InputError, match="refusing to replace"):
        write_rows(saved, ROWS[:1])
    assert (saved / "extra.json").exists() and len(list(iter_rows(saved))) == 2


def test_check_output_compares_real_paths_with_sources(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text('{"a": 1}\n')
    (tmp_path / "alias.jsonl").symlink_to(real)
    src = [("sources[0].path", str(tmp_path / "alias.jsonl"))]
    with pytest.raises(InputError, match=r"--out .*real.jsonl: is sources\[0\].path"):
        check_output(str(real), "--out", overwrite=True, sources=src)
    with pytest.raises(InputError, match=r"contains sources\[0\].path"):  # a folder --out holding a source
        check_output(str(tmp_path), "--out", overwrite=True, sources=src)
    folder_src = [("sources[0].path", str(tmp_path))]
    with pytest.raises(InputError, match=r"is inside sources\[0\].path"):
        check_output(str(tmp_path / "sub" / "out.jsonl"), "--out", sources=folder_src)
    assert real.read_text() == '{"a": 1}\n'
    assert check_output(str(tmp_path / "other.jsonl"), "--out", sources=src) == str(tmp_path / "other.jsonl")


@pytest.mark.parametrize("name", ["out.jsonl", "out_folder"])
def test_check_output_refuses_an_unwritable_place_up_front(tmp_path, name):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / name  # below a regular file: no folder can be made there
    with pytest.raises(InputError, match="--out .*file/out"):
        check_output(str(out), "--out")


def test_uppercase_suffix_is_an_error_not_a_folder(tmp_path):
    for name in ("out.JSONL", "out.Parquet"):
        with pytest.raises(InputError, match="lower case"):
            write_rows(tmp_path / name, ROWS)
    assert os.listdir(tmp_path) == []
    assert output_format("a.parquet") == "parquet" and output_format("a/b") == "folder"


def test_stale_partials_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()  # a finished process; our parent is running
    out = tmp_path / "out.jsonl"
    stale = [tmp_path / f".out.jsonl.partial-{dead_pid}", tmp_path / f".out.jsonl.partial-{dead_pid}.jsonl"]
    (tmp_path / f".out.jsonl.partial-{dead_pid}.old").mkdir()
    for p in stale:
        p.write_text("torn")
    alive = tmp_path / f".out.jsonl.partial-{live_pid}"
    alive.write_text("someone else is writing")
    other = tmp_path / f".other.jsonl.partial-{dead_pid}"
    other.write_text("not ours")
    write_rows(out, ROWS)
    assert sorted(os.listdir(tmp_path)) == sorted(["out.jsonl", alive.name, other.name])


def test_before_replace_runs_before_the_rename(tmp_path):
    out = tmp_path / "out.jsonl"
    write_rows(out, ROWS)
    seen = []

    def check(n):
        seen.append((n, [r for _, r in iter_rows(out)]))  # the old output is still in place
        raise DataError("count mismatch", "changed")

    with pytest.raises(DataError, match="count mismatch"):
        write_rows(out, ROWS[:1], before_replace=check)
    assert seen == [(1, ROWS)] and [r for _, r in iter_rows(out)] == ROWS
    assert os.listdir(tmp_path) == ["out.jsonl"]


@pytest.mark.parametrize("name", ["out.parquet", "out_folder"])
def test_table_outputs_skip_the_hf_cache_and_refuse_mixed_types(tmp_path, monkeypatch, name):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    nested = [{"id": 1, "meta": {"a": 1}}, {"id": 2, "meta": {"b": "x"}, "extra": [1, 2]}]
    write_rows(tmp_path / name, nested)
    assert [r for _, r in iter_rows(tmp_path / name)] == [
        {"id": 1, "meta": {"a": 1, "b": None}, "extra": None},  # keys other rows have read back as null
        {"id": 2, "meta": {"a": None, "b": "x"}, "extra": [1, 2]},
    ]
    assert not (tmp_path / "cache").exists()
    mixed = [{"id": 1, "text": "a"}, {"id": "b2", "text": "b"}]
    with pytest.raises(DataError, match=r"field 'id' has values of different types across rows \(number and string\)"):
        write_rows(tmp_path / name, mixed)
    assert write_rows(tmp_path / "mixed.jsonl", mixed) == 2  # JSONL keeps each row as it is


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = _jsonl(tmp_path / "bom.jsonl", [b'\xef\xbb\xbf{"id": 1}', b'{"id": 2}'])
    assert [r for _, r in iter_rows(path)] == [{"id": 1}, {"id": 2}]
    bad = _jsonl(tmp_path / "bom2.jsonl", [b'{"id": 1}', b'\xef\xbb\xbf{"id": 2}'])  # only the first line may
    with pytest.raises(DataError, match="bom2.jsonl line 2: invalid JSON"):
        list(iter_rows(bad))


@pytest.mark.parametrize("name", ["out.txt", "out.json", "eval.jsonl.copy", "x.csv"])
def test_output_names_with_another_suffix_are_refused(tmp_path, name):
    from tulu_jax.curation.rows import output_format
    from tulu_jax.inputs import InputError

    with pytest.raises(InputError, match=rf"--out .*{name}: unsupported output type"):
        output_format(str(tmp_path / name))
    assert output_format(str(tmp_path / name) + "/") == "folder"  # an explicit folder
    assert output_format(str(tmp_path / "clean")) == "folder"
