"""The preference (DPO) data pipeline: row formats, masks, truncation, bad rows, layout, order and resume."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tulu_jax.configlib import ConfigError
from tulu_jax.data import (
    DataError,
    PreferenceDataConfig,
    PreferencePipeline,
    bundled_prefs_file,
    encode_chats,
    pad_token_id,
    resolve_pref_files,
)

KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
SEQ = 64  # five of the first rows are longer (their prompts fit), so truncation shows up


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = Path(bundled_prefs_file("train")).read_text().splitlines()
    return [json.loads(line) for line in lines[:41]]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def jsonl(rows, tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "small.jsonl", rows)


def make(tok, files, *, batch_size=2, seed=0, num_epochs=1, process_index=0, process_count=1, **cfg):
    cfg = PreferenceDataConfig(**{"max_seq_len": SEQ, **cfg})
    return PreferencePipeline(
        cfg,
        tok,
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        files=[files] if isinstance(files, str) else files,
        process_index=process_index,
        process_count=process_count,
    )


def run(pipeline, it=None) -> list[dict]:
    return list(pipeline.iterator() if it is None else it)


def assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def sides(batch, r) -> list[tuple[tuple, tuple]]:
    """(ids, mask) of chosen and rejected of row r, without padding."""
    out = []
    for s in range(2):
        real = batch["segment_ids"][r, s] == 1
        out.append((tuple(batch["input_ids"][r, s][real]), tuple(batch["loss_mask"][r, s][real])))
    return out


def all_pairs(pipeline) -> list[list[tuple[tuple, tuple]]]:
    """Every pair, in index order, as unpadded (ids, mask) per side."""
    out = []
    for b in pipeline.ordered_batches(7):
        out += [sides(b, r) for r in range(len(b["index"])) if b["valid"][r]]
    return out


def expected(tok, chosen, rejected, seq=SEQ) -> list[tuple[tuple, tuple]]:
    return [(tuple(i), tuple(m)) for i, m, _ in encode_chats([chosen, rejected], tok, seq)]


# ---------------------------------------------------------------------------------------------------------
# Formats and encoding

SYS = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "What is the capital of Peru?"}
GOOD, BAD = "The capital of Peru is Lima.", "The capital of Peru is Oslo."


def asst(text):
    return {"role": "assistant", "content": text}


def test_row_formats_encode_like_sft(tiny_tokenizer, tmp_path):
    tulu = {"id": "a", "chosen": [USER, asst(GOOD)], "rejected": [USER, asst(BAD)]}
    # The Tülu 3 mixtures carry a `prompt` string next to full lists: it is ignored.
    tulu_with_prompt = dict(tulu, prompt=USER["content"])
    split_str = {"prompt": USER["content"], "chosen": GOOD, "rejected": BAD}
    split_list = {"id": 3, "prompt": [SYS, USER], "chosen": [asst(GOOD)], "rejected": [asst(BAD)]}
    path = write_jsonl(tmp_path / "formats.jsonl", [tulu, tulu_with_prompt, split_str, split_list])
    p = make(tiny_tokenizer, path, shuffle=False)
    got = all_pairs(p)
    plain = expected(tiny_tokenizer, [USER, asst(GOOD)], [USER, asst(BAD)])
    assert got[0] == got[1] == got[2] == plain
    assert got[3] == expected(tiny_tokenizer, [SYS, USER, asst(GOOD)], [SYS, USER, asst(BAD)])
    assert p.stats["rows_skipped"] == {} and p.stats["pairs"] == len(p) == 4
    # The trained tokens are the reply plus EOS.
    ids, mask = got[0][0]
    assert tiny_tokenizer.decode([t for t, m in zip(ids, mask) if m]) == GOOD + tiny_tokenizer.eos_token


def test_label_final_masks_earlier_assistant_turns(tiny_tokenizer, tmp_path):
    turns = [SYS, {"role": "user", "content": "What is 2 + 2?"}, asst("2 + 2 = 4."), USER]
    row = {"chosen": turns + [asst(GOOD)], "rejected": turns + [asst(BAD)]}
    path = write_jsonl(tmp_path / "multi.jsonl", [row])
    every, final = (
        all_pairs(make(tiny_tokenizer, path, label=label, max_seq_len=128))[0] for label in ("all", "final")
    )
    assert every == expected(tiny_tokenizer, row["chosen"], row["rejected"], 999)
    eos = tiny_tokenizer.eos_token
    for (ids, m_all), (ids2, m_final), reply in zip(every, final, (GOOD, BAD)):
        assert ids == ids2
        m_all, m_final = np.array(m_all), np.array(m_final)
        assert tiny_tokenizer.decode(np.array(ids)[m_all == 1]) == "2 + 2 = 4." + eos + reply + eos
        assert tiny_tokenizer.decode(np.array(ids)[m_final == 1]) == reply + eos
        assert (m_final <= m_all).all() and m_final[-1] == 1
        # The final reply's tokens are one run at the end.
        first = int(np.argmax(m_final))
        assert m_final[first:].all() and (m_all[first:] == 1).all()


def test_truncation_keeps_the_prompt_and_counts(tiny_tokenizer, tmp_path):
    long_reply = "The capital of Peru is " + "very " * 60 + "Lima."
    row = {"prompt": USER["content"], "chosen": long_reply, "rejected": BAD}
    path = write_jsonl(tmp_path / "long.jsonl", [row, {"prompt": USER["content"], "chosen": GOOD, "rejected": BAD}])
    p = make(tiny_tokenizer, path, shuffle=False)
    assert p.stats["pairs_truncated"] == 1 and p.stats["pairs"] == 2
    (c_ids, c_mask), (r_ids, r_mask) = all_pairs(p)[0]
    full = expected(tiny_tokenizer, [USER, asst(long_reply)], [USER, asst(BAD)], 999)
    assert len(full[0][0]) > SEQ and len(c_ids) == SEQ  # right-truncated chosen side
    assert (c_ids, c_mask) == (full[0][0][:SEQ], full[0][1][:SEQ])
    assert (r_ids, r_mask) == full[1]  # the short side is untouched
    prompt_len = full[0][1].index(1)
    assert c_ids[:prompt_len] == full[1][0][:prompt_len] and sum(c_mask) == SEQ - prompt_len
    assert p.stats["tokens"] == sum(len(i) for pair in all_pairs(p) for i, _ in pair)
    assert p.stats["trained_tokens"] == sum(sum(m) for pair in all_pairs(p) for _, m in pair)


@pytest.mark.parametrize("label", ["all", "final"])
def test_prompt_too_long_is_counted_not_raised(tiny_tokenizer, rows, tmp_path, label):
    long_prompt = {"prompt": "word " * 80, "chosen": GOOD, "rejected": BAD}
    # An earlier assistant turn fits, but the final prompt does not: still skipped.
    early = [USER, asst(GOOD), {"role": "user", "content": "again " * 80}]
    long_turns = {"chosen": early + [asst(GOOD)], "rejected": early + [asst(BAD)]}
    path = write_jsonl(tmp_path / "p.jsonl", [rows[0], long_prompt, long_turns, rows[1]])
    p = make(tiny_tokenizer, path, label=label)  # on_bad_row="error" still only counts it
    assert p.stats["rows_skipped"] == {"prompt_too_long": 2} and p.stats["pairs"] == 2
    assert p.stats["rows_read"] == 4


# ---------------------------------------------------------------------------------------------------------
# Bad rows

OK = '{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
BAD_CASES = [  # (line text, field named in the message, fragment, reason)
    ('{"chosen": [', None, "invalid JSON", "invalid_json"),
    ("[1, 2]", "<row>", "expected a JSON object", "not_an_object"),
    ('{"rejected": "x", "prompt": "p"}', "chosen", "missing", "missing_chosen"),
    ('{"chosen": "x", "prompt": "p"}', "rejected", "missing", "missing_rejected"),
    ('{"chosen": "x", "rejected": 5, "prompt": "p"}', "rejected", "expected a reply string", "bad_reply"),
    ('{"chosen": "x", "rejected": "y"}', "chosen", "needs a 'prompt' field", "missing_prompt"),
    ('{"chosen": "x", "rejected": "y", "prompt": 7}', "prompt", "expected a string or a list", "bad_prompt"),
    (
        '{"chosen": "x", "rejected": "y", "prompt": [{"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "b"}]}',
        "prompt",
        "ends with an assistant turn",
        "bad_prompt",
    ),
    (
        '{"chosen": "x", "rejected": "y", "prompt": [{"role": "human", "content": "a"}]}',
        "prompt[0].role",
        "unknown role 'human'",
        "unknown_role",
    ),
    ('{"chosen": "x", "rejected": " ", "prompt": "p"}', "rejected", "empty assistant reply", "empty_assistant_reply"),
    (
        '{"chosen": "x", "rejected": [{"role": "assistant", "content": 3}], "prompt": "p"}',
        "rejected[0].content",
        "expected a string, got int",
        "non_string_content",
    ),
    (
        OK + '"rejected": "y", "prompt": "a"}',
        "rejected",
        "but 'chosen' is a full conversation",
        "mixed_formats",
    ),
    (
        OK + '"rejected": {"role": "user"}}',
        "rejected",
        "expected a reply string or a list of messages, got dict",
        "bad_reply",
    ),
    (OK + '"rejected": ["hi"]}', "rejected[0]", "expected an object", "bad_message"),
    (
        OK + '"rejected": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "c"}]}',
        "rejected[0].content",
        "expected a string, got list",
        "non_string_content",
    ),
    (OK + '"rejected": [{"role": "user", "content": "a"}]}', "rejected", "no assistant turn", "no_assistant_turn"),
    (
        OK + '"rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}, '
        '{"role": "user", "content": "d"}]}',
        "rejected",
        "last turn is 'user'",
        "final_turn_not_assistant",
    ),
    (
        OK + '"rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]}',
        "rejected",
        "prompt differs from 'chosen' at message 0",
        "prompt_mismatch",
    ),
    (
        OK + '"rejected": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "c"}]}',
        "rejected",
        "prompt differs from 'chosen' at message 0",
        "prompt_mismatch",
    ),
]


@pytest.mark.parametrize(
    "line, field, fragment, reason", BAD_CASES, ids=[f"{i}-{c[3]}" for i, c in enumerate(BAD_CASES)]
)
def test_bad_row_errors_name_file_line_and_field(tiny_tokenizer, rows, tmp_path, line, field, fragment, reason):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + line + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError) as e:
        make(tiny_tokenizer, str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path} line 3: "), msg
    assert fragment in msg and e.value.reason == reason, (msg, e.value.reason)
    if field is not None:
        assert f"field '{field}'" in msg, msg
    skipping = make(tiny_tokenizer, str(path), on_bad_row="skip")
    assert skipping.stats["rows_skipped"] == {reason: 1} and skipping.stats["pairs"] == 2
    assert skipping.stats["rows_read"] == 3


def test_skip_counts_every_reason_together(tiny_tokenizer, rows, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [rows[0]] + [c[0] for c in BAD_CASES] + [rows[1]])
    p = make(tiny_tokenizer, path, on_bad_row="skip", shuffle=False)
    counts: dict[str, int] = {}
    for c in BAD_CASES:
        counts[c[3]] = counts.get(c[3], 0) + 1
    assert p.stats["rows_skipped"] == counts and p.stats["rows_read"] == len(BAD_CASES) + 2
    assert all_pairs(p) == [
        expected(tiny_tokenizer, rows[0]["chosen"], rows[0]["rejected"]),
        expected(tiny_tokenizer, rows[1]["chosen"], rows[1]["rejected"]),
    ]


def test_parquet_rows_are_named_and_match_jsonl(tiny_tokenizer, jsonl, rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "small.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert_same(run(make(tiny_tokenizer, str(path), num_epochs=2)), run(make(tiny_tokenizer, jsonl, num_epochs=2)))
    split = [{"prompt": "p", "chosen": GOOD, "rejected": BAD}, {"prompt": "p", "chosen": GOOD, "rejected": ""}]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(split), bad)
    with pytest.raises(DataError, match=r"bad.parquet row 2: field 'rejected': empty assistant reply"):
        make(tiny_tokenizer, str(bad))


# ---------------------------------------------------------------------------------------------------------
# Batches, order and resume


def test_batch_layout(tiny_tokenizer, jsonl, rows):
    p = make(tiny_tokenizer, jsonl, batch_size=3)
    batches = run(p)
    assert len(batches) == len(rows) // 3 == p.count_batches() and len(p) == len(rows)
    pad = pad_token_id(tiny_tokenizer)
    for b in batches:
        assert set(b) == {*KEYS, "index"}
        for k in KEYS:
            assert b[k].shape == (3, 2, SEQ) and b[k].dtype == np.int32, k
        assert b["index"].shape == (3,) and b["index"].dtype == np.int32
        padding = b["segment_ids"] == 0
        assert (b["input_ids"][padding] == pad).all() and not b["loss_mask"][padding].any()
        assert not b["positions"][padding].any() and set(np.unique(b["segment_ids"])) <= {0, 1}
        n = b["segment_ids"].sum(-1)
        assert (n > 0).all() and (np.diff(b["segment_ids"], axis=-1) <= 0).all()  # left-aligned, right-padded
        for r in range(3):
            for s in range(2):
                np.testing.assert_array_equal(b["positions"][r, s, : n[r, s]], np.arange(n[r, s]))
        assert (b["loss_mask"].sum(-1) > 0).all()  # every side has a trained token


def test_index_maps_back_to_its_pair(tiny_tokenizer, jsonl, rows):
    p = make(tiny_tokenizer, jsonl, batch_size=4, num_epochs=2)
    seen = []
    for b in run(p):
        for r, i in enumerate(b["index"]):
            assert sides(b, r) == expected(tiny_tokenizer, rows[i]["chosen"], rows[i]["rejected"])
            seen.append(int(i))
    n = len(rows) // 4 * 4
    assert len(set(seen[:n])) == n and all(0 <= i < len(rows) for i in seen)
    assert len(seen) == p.count_batches() * 4


def test_shuffle_is_seeded_and_new_every_epoch(tiny_tokenizer, jsonl, rows):
    a = run(make(tiny_tokenizer, jsonl, batch_size=1, seed=3, num_epochs=2))
    assert_same(a, run(make(tiny_tokenizer, jsonl, batch_size=1, seed=3, num_epochs=2)))
    order = [int(b["index"][0]) for b in a]
    first, second = order[: len(rows)], order[len(rows) :]
    assert sorted(first) == sorted(second) == list(range(len(rows)))
    assert first != second and first != sorted(first)
    other = [int(b["index"][0]) for b in run(make(tiny_tokenizer, jsonl, batch_size=1, seed=4, num_epochs=2))]
    assert other != order
    fixed = [int(b["index"][0]) for b in run(make(tiny_tokenizer, jsonl, batch_size=1, num_epochs=2, shuffle=False))]
    assert fixed == list(range(len(rows))) * 2


@pytest.mark.parametrize("where", ["mid_epoch", "across_epochs"])
def test_resume_from_state(tiny_tokenizer, jsonl, where):
    pipeline = make(tiny_tokenizer, jsonl, batch_size=2, num_epochs=3)
    full = run(pipeline)
    per_epoch = len(full) / 3
    k = int(per_epoch // 2) if where == "mid_epoch" else int(per_epoch) - 1
    it = pipeline.iterator()
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # a checkpoint stores it as JSON
    assert_same(run(pipeline, it), full[k:])
    again = make(tiny_tokenizer, jsonl, batch_size=2, num_epochs=3).iterator()  # a restarted job
    again.set_state(state)
    assert_same(run(pipeline, again), full[k:])


def test_processes_split_the_global_batch(tiny_tokenizer, jsonl):
    one = run(make(tiny_tokenizer, jsonl, batch_size=4, seed=1))
    halves = [run(make(tiny_tokenizer, jsonl, batch_size=2, seed=1, process_index=i, process_count=2)) for i in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == len(one) > 0
    for g, a, b in zip(one, *halves):
        for k in (*KEYS, "index"):
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])
        assert not set(a["index"]) & set(b["index"])


def test_workers_give_the_same_batches(tiny_tokenizer, jsonl):
    assert_same(run(make(tiny_tokenizer, jsonl, num_workers=2)), run(make(tiny_tokenizer, jsonl)))


def test_ordered_batches_cover_every_pair_once(tiny_tokenizer, jsonl, rows):
    p = make(tiny_tokenizer, jsonl, batch_size=3)
    batches = list(p.ordered_batches(4))
    assert len(batches) == -(-len(rows) // 4)
    pad = len(batches) * 4 - len(rows)
    assert pad > 0  # the set is chosen so the last batch needs filler
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert valid.dtype == np.int32 and list(valid) == [1] * len(rows) + [0] * pad
    assert list(index[valid == 1]) == list(range(len(rows))) and not index[valid == 0].any()
    first, last = batches[0], batches[-1]
    for k in KEYS:
        assert last[k].shape == (4, 2, SEQ) and last[k].dtype == np.int32
        for r in range(4 - pad, 4):  # filler repeats pair 0
            np.testing.assert_array_equal(last[k][r], first[k][0])
    for b in batches:  # same content as the shuffled stream for the same index
        for r, i in enumerate(b["index"]):
            assert sides(b, r) == expected(tiny_tokenizer, rows[i]["chosen"], rows[i]["rejected"])


def test_fingerprint(tiny_tokenizer, jsonl, rows, tmp_path):
    base = make(tiny_tokenizer, jsonl).fingerprint()
    assert isinstance(base, str) and len(base) == 64 and int(base, 16) >= 0
    # Order, batch size and seed do not change the encoded pairs.
    assert make(tiny_tokenizer, jsonl, seed=9, batch_size=5, shuffle=False).fingerprint() == base
    changed = {
        make(tiny_tokenizer, jsonl, max_seq_len=SEQ + 16).fingerprint(),
        make(tiny_tokenizer, jsonl, label="final").fingerprint(),
        make(tiny_tokenizer, write_jsonl(tmp_path / "fewer.jsonl", rows[:-1])).fingerprint(),
    }
    assert base not in changed and len(changed) == 3


# ---------------------------------------------------------------------------------------------------------
# Config and bundled data


def test_config_fields_and_validation():
    fields = {f.name: f for f in dataclasses.fields(PreferenceDataConfig)}
    assert list(fields) == [
        "train_files",
        "eval_files",
        "use_bundled",
        "max_seq_len",
        "on_bad_row",
        "shuffle",
        "chat_template",
        "num_workers",
        "label",
        "trim_padding",
    ]
    assert all(f.metadata.get("help") for f in fields.values())
    for bad, match in (
        ({"on_bad_row": "ignore"}, "on_bad_row"),
        ({"chat_template": "chatml"}, "chat_template"),
        ({"label": "last"}, "label"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"num_workers": -1}, "num_workers"),
    ):
        with pytest.raises(ValueError, match=match):
            PreferenceDataConfig(**bad)
    cfg = PreferenceDataConfig(train_files=["a.jsonl"])
    assert cfg.train_files == ("a.jsonl",) and hash(cfg)
    assert resolve_pref_files(cfg, "train") == ("a.jsonl",) and resolve_pref_files(cfg, "eval") == ()
    with pytest.raises(ConfigError, match="data.train_files"):
        resolve_pref_files(PreferenceDataConfig(), "train")  # no silent fallback to the toy set
    assert resolve_pref_files(PreferenceDataConfig(), "eval") == ()
    default = PreferenceDataConfig(use_bundled=True)
    assert resolve_pref_files(default, "train") == (bundled_prefs_file("train"),)
    assert resolve_pref_files(default, "eval") == (bundled_prefs_file("eval"),)
    with pytest.raises(ValueError, match="split"):
        resolve_pref_files(default, "test")


def test_bundled_set_loads_cleanly(tiny_tokenizer):
    p = PreferencePipeline(PreferenceDataConfig(use_bundled=True), tiny_tokenizer, batch_size=8, seed=0, num_epochs=1)
    s = p.stats
    assert s["rows_read"] == s["pairs"] == 2000 and s["rows_skipped"] == {} and s["pairs_truncated"] == 0
    assert s["tokens"] / (2 * s["pairs"]) < 40 and p.count_batches() == 250
    unk = tiny_tokenizer.unk_token_id
    assert unk is None or not (p._store.ids == unk).any()
    ev = PreferencePipeline(
        PreferenceDataConfig(use_bundled=True),
        tiny_tokenizer,
        batch_size=8,
        seed=0,
        num_epochs=1,
        files=resolve_pref_files(p.cfg, "eval"),
    )
    assert ev.stats["pairs"] == 200 and ev.stats["rows_skipped"] == {}
    # Chosen and rejected differ only in the final reply.
    b = next(ev.ordered_batches(16))
    for r in range(16):
        (c_ids, c_mask), (r_ids, r_mask) = sides(b, r)
        start = len(c_mask) - c_mask[::-1].index(0)  # the final reply is the trailing run of trained tokens
        assert c_ids[:start] == r_ids[:start] and c_ids != r_ids


def test_trim_padding_cuts_shared_padding_columns_only(tiny_tokenizer):
    # tiny_prefs sides are 30 tokens on average (max 83): with max_seq_len 512 most batches fit in 64 or 128.
    files = [bundled_prefs_file("train")]
    full = make(tiny_tokenizer, files, batch_size=4, max_seq_len=512, trim_padding=False)
    trim = make(tiny_tokenizer, files, batch_size=4, max_seq_len=512)
    lengths = set()
    for a, b in zip(full.iterator(), trim.iterator()):
        t = b["input_ids"].shape[-1]
        longest = int(a["segment_ids"].sum(-1).max())
        assert t == max(64, 1 << (longest - 1).bit_length()) and t >= longest
        for k in ("input_ids", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(b[k], a[k][..., :t])
        assert not a["segment_ids"][..., t:].any()  # only padding was cut
        np.testing.assert_array_equal(a["index"], b["index"])
        lengths.add(t)
    assert lengths <= {64, 128} and 64 in lengths
    # Every process of a multi-host run cuts its slice to the global batch's length.
    parts = [
        make(tiny_tokenizer, files, batch_size=2, max_seq_len=512, process_index=i, process_count=2) for i in (0, 1)
    ]
    for a, b, whole in zip(parts[0].iterator(), parts[1].iterator(), trim.iterator()):
        assert a["input_ids"].shape == b["input_ids"].shape == (2, 2, whole["input_ids"].shape[-1])
    ordered = list(trim.ordered_batches(8))
    assert {b["input_ids"].shape[-1] for b in ordered} <= {64, 128}
    assert sum(int(b["valid"].sum()) for b in ordered) == len(trim)
