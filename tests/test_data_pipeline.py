"""The SFT Grain pipeline: layout, packing, determinism, resume, bad rows and input formats."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tulu_jax.configlib import ConfigError
from tulu_jax.data import DataConfig, DataError, SFTPipeline, bundled_file, encode_chat, pad_token_id

BAD_ROWS = Path(__file__).parent / "data" / "bad_rows.jsonl"
KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
SEQ = 64  # short rows: several tiny_chat conversations pack into one, and a few get truncated


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = Path(bundled_file("train")).read_text().splitlines()
    return [json.loads(line) for line in lines[:45]]


@pytest.fixture(scope="module")
def jsonl(rows, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make(tok, files, *, batch_size=2, seed=0, num_epochs=1, **cfg):
    cfg = DataConfig(**{"max_seq_len": SEQ, **cfg})
    return SFTPipeline(
        cfg,
        tok,
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        files=[files],
        process_index=0,
        process_count=1,
    )


def run(pipeline, it=None) -> list[dict]:
    return list(pipeline.iterator() if it is None else it)


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def segments(batches):
    """(input_ids, loss_mask) of every conversation, cut out of rows by segment id."""
    out = []
    for b in batches:
        for ids, mask, seg in zip(b["input_ids"], b["loss_mask"], b["segment_ids"]):
            out += [(tuple(ids[seg == s]), tuple(mask[seg == s])) for s in range(1, seg.max() + 1)]
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_shapes_dtypes_and_layout(tiny_tokenizer, jsonl, pack):
    batches = run(make(tiny_tokenizer, jsonl, batch_size=3, pack=pack))
    assert batches
    pad = pad_token_id(tiny_tokenizer)
    for b in batches:
        assert set(b) == set(KEYS)
        for k in KEYS:
            assert b[k].shape == (3, SEQ) and b[k].dtype == np.int32, k
        padding = b["segment_ids"] == 0
        assert (b["input_ids"][padding] == pad).all() and not b["loss_mask"][padding].any()
        assert not b["positions"][padding].any()
        for pos, seg in zip(b["positions"], b["segment_ids"]):  # positions restart in every segment
            for s in range(1, seg.max() + 1):
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        if not pack:  # one conversation per row, left-aligned
            assert (b["segment_ids"] <= 1).all() and (np.diff(b["segment_ids"], axis=1) <= 0).all()


def test_packing_keeps_conversations_separate(tiny_tokenizer, jsonl, rows):
    packed = make(tiny_tokenizer, jsonl, batch_size=1, pack=True, shuffle=False)
    plain = make(tiny_tokenizer, jsonl, batch_size=1, pack=False, shuffle=False)
    p, u = run(packed), run(plain)
    assert len(p) < len(u) == len(rows)  # rows hold several conversations
    assert max(b["segment_ids"].max() for b in p) > 1
    # The same conversations (every non-pad token), each intact; same trained-token count.
    assert sorted(segments(p)) == sorted(segments(u))
    expected = [encode_chat(r["messages"], tiny_tokenizer, SEQ) for r in rows]
    assert sorted(segments(u)) == sorted((tuple(i), tuple(m)) for i, m in expected)
    trained = sum(int(b["loss_mask"].sum()) for b in p)
    assert trained == sum(int(b["loss_mask"].sum()) for b in u) == packed.stats["trained_tokens"]
    assert (
        packed.stats["conversations_truncated"]
        == sum(len(encode_chat(r["messages"], tiny_tokenizer, 999)[0]) > SEQ for r in rows)
        > 0
    )


@pytest.mark.parametrize("pack", [True, False])
def test_determinism_by_seed(tiny_tokenizer, jsonl, pack):
    a = run(make(tiny_tokenizer, jsonl, seed=3, num_epochs=2, pack=pack))
    assert_same(a, run(make(tiny_tokenizer, jsonl, seed=3, num_epochs=2, pack=pack)))
    b = run(make(tiny_tokenizer, jsonl, seed=4, num_epochs=2, pack=pack))
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_each_epoch_has_a_new_order_and_every_conversation(tiny_tokenizer, jsonl, rows):
    batches = run(make(tiny_tokenizer, jsonl, batch_size=1, num_epochs=2, pack=False))
    convs = segments(batches)
    first, second = convs[: len(rows)], convs[len(rows) :]
    assert sorted(first) == sorted(second) and len(set(first)) > 1
    assert first != second


def test_end_of_run_and_count_batches(tiny_tokenizer, jsonl, rows):
    plain = make(tiny_tokenizer, jsonl, batch_size=4, num_epochs=3, pack=False)
    it = plain.iterator()
    n = sum(1 for _ in it)
    assert n == plain.count_batches() == len(rows) * 3 // 4  # last incomplete batch dropped
    with pytest.raises(StopIteration):
        next(it)
    packed = make(tiny_tokenizer, jsonl, batch_size=4, num_epochs=3, pack=True)
    assert packed.count_batches() == len(run(packed)) > 0


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("where", ["mid_epoch", "across_epochs"])
def test_resume_from_state(tiny_tokenizer, jsonl, pack, where):
    pipeline = make(tiny_tokenizer, jsonl, batch_size=2, num_epochs=3, pack=pack)
    full = run(pipeline)
    per_epoch = len(full) / 3
    # Save mid-epoch 1, or in epoch 1 a batch before its end so the resumed run crosses the boundary.
    k = int(per_epoch // 2) if where == "mid_epoch" else int(per_epoch) - 1
    it = pipeline.iterator()
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # a checkpoint stores it as JSON
    assert_same(run(pipeline, it), full[k:])
    fresh = pipeline.iterator()
    fresh.set_state(state)
    assert_same(run(pipeline, fresh), full[k:])
    # A restored iterator of a new pipeline object (a restarted job) agrees as well.
    again = make(tiny_tokenizer, jsonl, batch_size=2, num_epochs=3, pack=pack).iterator()
    again.set_state(state)
    assert_same(run(pipeline, again), full[k:])


@pytest.mark.parametrize("pack", [True, False])
def test_processes_split_the_global_batch(tiny_tokenizer, jsonl, pack):
    cfg = DataConfig(max_seq_len=SEQ, pack=pack)
    one = run(
        SFTPipeline(
            cfg, tiny_tokenizer, batch_size=4, seed=1, num_epochs=1, files=[jsonl], process_index=0, process_count=1
        )
    )
    halves = [
        run(
            SFTPipeline(
                cfg, tiny_tokenizer, batch_size=2, seed=1, num_epochs=1, files=[jsonl], process_index=i, process_count=2
            )
        )
        for i in range(2)
    ]
    assert len(halves[0]) == len(halves[1]) == len(one)
    for g, a, b in zip(one, *halves):
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])


def test_workers_give_the_same_batches(tiny_tokenizer, jsonl):
    assert_same(run(make(tiny_tokenizer, jsonl, num_workers=2)), run(make(tiny_tokenizer, jsonl)))


BAD_CASES = [  # (line text, field named in the message, fragment, reason)
    ('{"messages": [', None, "invalid JSON", "invalid_json"),
    ('{"msgs": []}', "messages", "missing", "missing_messages"),
    ('{"messages": {"role": "user"}}', "messages", "expected a list", "messages_not_list"),
    ("[1, 2]", "<row>", "expected a JSON object", "not_an_object"),
    ('{"messages": ["hi"]}', "messages[0]", "expected an object", "bad_message"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
        "messages[1].role",
        "unknown role 'bot' (expected system/user/assistant)",
        "unknown_role",
    ),
    (
        '{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
        "messages[0].content",
        "expected a string, got list",
        "non_string_content",
    ),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
        "messages[1].content",
        "empty assistant reply",
        "empty_assistant_reply",
    ),
    ('{"messages": [{"role": "user", "content": "a"}]}', "messages", "no assistant turn", "no_assistant_turn"),
]


@pytest.mark.parametrize("line, field, fragment, reason", BAD_CASES, ids=[c[3] for c in BAD_CASES])
def test_bad_row_errors_name_file_line_and_field(tiny_tokenizer, rows, tmp_path, line, field, fragment, reason):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + line + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError) as e:
        make(tiny_tokenizer, str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} line 3: "), msg
    assert fragment in msg and e.value.reason == reason
    if field is not None:
        assert f"field '{field}'" in msg
    skipping = make(tiny_tokenizer, str(path), on_bad_row="skip")
    assert skipping.stats["rows_skipped"] == {reason: 1} and skipping.stats["conversations"] == 2


def test_skip_counts_every_reason(tiny_tokenizer):
    p = make(tiny_tokenizer, str(BAD_ROWS), on_bad_row="skip", pack=False, batch_size=1, shuffle=False)
    s = p.stats
    assert s["rows_read"] == 11 and s["conversations"] == 2
    assert s["rows_skipped"] == {
        r: 1
        for r in (
            "invalid_json",
            "missing_messages",
            "messages_not_list",
            "unknown_role",
            "non_string_content",
            "empty_assistant_reply",
            "no_assistant_turn",
            "not_an_object",
            "bad_message",
        )
    }
    texts = [tiny_tokenizer.decode(b["input_ids"][0][b["segment_ids"][0] > 0]) for b in run(p)]
    assert ["What is 1 + 1?" in texts[0], "Name a color." in texts[1]] == [True, True]
    with pytest.raises(DataError, match=r"bad_rows.jsonl line 2: invalid JSON"):
        make(tiny_tokenizer, str(BAD_ROWS))


def test_rows_without_trained_tokens_after_truncation_are_dropped(tiny_tokenizer, rows, tmp_path):
    long_user = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], long_user, rows[1]]))
    p = make(tiny_tokenizer, str(path))  # on_bad_row="error": still dropped and counted, as the reference does
    assert p.stats["rows_skipped"] == {"no_trained_tokens": 1} and p.stats["conversations"] == 2


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_parquet_and_datasets_folder_match_jsonl(tiny_tokenizer, jsonl, rows, tmp_path, fmt):
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "small.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        path = tmp_path / "small_ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    for pack in (True, False):
        assert_same(
            run(make(tiny_tokenizer, str(path), num_epochs=2, pack=pack)),
            run(make(tiny_tokenizer, jsonl, num_epochs=2, pack=pack)),
        )


def test_table_errors_name_the_row(tiny_tokenizer, rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = [rows[0], {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(bad), path)
    with pytest.raises(DataError, match=r"bad.parquet row 2: field 'messages\[1\].role': unknown role 'bot'"):
        make(tiny_tokenizer, str(path))


def test_config_fields_and_defaults(tiny_tokenizer):
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    assert list(fields) == [
        "train_files",
        "eval_files",
        "use_bundled",
        "max_seq_len",
        "on_bad_row",
        "shuffle",
        "chat_template",
        "num_workers",
        "pack",
    ]
    assert all(f.metadata.get("help") for f in fields.values())
    with pytest.raises(ValueError, match="on_bad_row"):
        DataConfig(on_bad_row="ignore")
    with pytest.raises(ValueError, match="chat_template"):
        DataConfig(chat_template="chatml")
    with pytest.raises(ConfigError, match=r"data.train_files: no training files given.*use_bundled"):
        SFTPipeline(DataConfig(), tiny_tokenizer, batch_size=8, seed=0, num_epochs=1)  # fails closed
    with pytest.raises(ValueError, match="use_bundled"):
        DataConfig(use_bundled=True, train_files=["a.jsonl"])
    default = SFTPipeline(DataConfig(use_bundled=True), tiny_tokenizer, batch_size=8, seed=0, num_epochs=1)
    bundled_rows = len(Path(bundled_file("train")).read_text().splitlines())
    assert default.stats["rows_read"] == bundled_rows and default.stats["rows_skipped"] == {}
