"""`tulu-jax data mix`: normalisation, exact and MinHash/LSH near-duplicate removal (checked against brute-force
Jaccard), seeded count/ratio draws, source tags, config and row errors, formats and atomic output."""

import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, cli_env
from tulu_jax.cli import main
from tulu_jax.curation import cmd_mix, dedup, mixing
from tulu_jax.curation.normalize import normalize_text, shingles, text_key, tokens
from tulu_jax.curation.rows import iter_rows, write_rows


def sft(prompt, reply="ok", **extra):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], **extra}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def yaml_config(path, kind, sources, seed=0, **dedup_cfg):
    import yaml

    path.write_text(yaml.safe_dump({"kind": kind, "seed": seed, "sources": sources, "dedup": dedup_cfg}))
    return str(path)


def run_mix(config, out, *extra):
    return main(["data", "mix", "--config", str(config), "--out", str(out), *extra])


def read(path):
    return [r for _, r in iter_rows(path)]


# ---------------------------------------------------------------------------------------------------------
# Normalisation


def test_normalize_unicode_case_and_whitespace():
    # full-width letters, the fi ligature, German sharp s, no-break / ideographic spaces, tabs, newlines
    assert normalize_text("  Ｗｈａｔ\u00a0is\tthe ﬁle?\n") == "what is the file?"
    assert normalize_text("STRASSE") == normalize_text("Straße") == "strasse"
    assert normalize_text("a\u3000\u2003b\r\n\n c") == "a b c"
    assert normalize_text("Ⅻ ①") == "xii 1"  # compatibility forms fold to plain ones
    # zero-width and other format (Cf) characters vanish: U+200B space, U+200D joiner, U+00AD soft hyphen, BOM
    assert normalize_text("\ufeffwh\u200bat is\u00ad 2\u200d+2") == "what is 2+2"
    # punctuation is content, for exact duplicates and for shingles alike
    assert normalize_text("What is 2+2?") != normalize_text("What is 2-2?")
    assert tokens("what is 2+2?") == ["what", "is", "2", "+", "2", "?"]
    assert tokens("f(x) — ok") == ["f", "(", "x", ")", "—", "ok"]
    assert text_key("a b") == text_key(normalize_text(" A  B ")) != text_key("a c")


def test_shingles_by_hand():
    assert shingles("a b c d", 3) == {b"a b c", b"b c d"}
    assert shingles("a b, c! a b c", 2) == {b"a b", b"b ,", b", c", b"c !", b"! a", b"b c"}
    assert shingles("a b", 3) == {b"a b"}  # shorter than a shingle: one shingle
    assert shingles("?!", 3) == {b"? !"}
    assert shingles("", 3) == set()
    with pytest.raises(ValueError, match="shingle size"):
        shingles("a", 0)


def test_arithmetic_prompts_are_not_near_duplicates():
    """Prompts that differ only in an operator or a number: by hand, "what is 15 + 9 ?" and "what is 15 - 9 ?"
    share 1 of 7 distinct 3-token shingles ("what is 15"), Jaccard 1/7; with words only they were identical."""
    a, b = shingles(normalize_text("What is 15 + 9?"), 3), shingles(normalize_text("What is 15 - 9?"), 3)
    assert jaccard(a, b) == 1 / 7
    prompts = [f"What is {x} {op} {y}?" for x in (15, 16) for op in "+-*/" for y in (9, 8)]
    near = dedup.NearDedup(threshold=0.8, num_perm=128, shingle_size=3)
    assert near.filter([normalize_text(p) for p in prompts]) == [True] * len(prompts)
    assert near.filter([normalize_text("what  is 15 + 9 ?")]) == [False]  # the same prompt again is caught


# ---------------------------------------------------------------------------------------------------------
# MinHash signatures and near-duplicate removal


def random_texts(rng, n, vocab=300, lo=0, hi=40):
    return [" ".join(f"w{rng.randrange(vocab)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.mark.parametrize("size", [1, 3])
def test_shingle_hashes_match_word_shingles(size):
    """One hash per distinct shingle: as many distinct hashes per text as word_shingles finds, and two texts
    share a hash exactly when they share a shingle."""
    texts = random_texts(random.Random(size), 60, vocab=15, hi=12)
    hashes, counts = dedup.shingle_hashes([tokens(t) for t in texts], size)
    ends = np.cumsum(counts)
    per_text = [set(hashes[e - c : e].tolist()) for c, e in zip(counts, ends)]
    sets = [shingles(t, size) for t in texts]
    assert [len(h) for h in per_text] == [len(s) for s in sets]
    assert any(len(s) == 0 for s in sets) and any(len(s) > 3 for s in sets)
    for i, j in itertools.combinations(range(len(texts)), 2):
        assert bool(per_text[i] & per_text[j]) == bool(sets[i] & sets[j])


def test_signatures_equal_datasketch_minhash():
    from datasketch import MinHash

    texts = random_texts(random.Random(0), 40)
    hashes, counts = dedup.shingle_hashes([tokens(t) for t in texts], 3)
    perms = dedup.permutations(64, seed=7)
    sigs = dedup.signatures(hashes, counts, perms)
    ends = np.cumsum(counts)
    for sig, c, e in zip(sigs, counts, ends):
        ref = MinHash(num_perm=64, seed=7, hashfunc=int, scheme="affine32")
        ref.update_batch(hashes[e - c : e].tolist())
        np.testing.assert_array_equal(sig, ref.hashvalues)


def jaccard(a, b):
    return len(a & b) / len(a | b)


def near_duplicate_corpus(seed):
    """Base texts of 60 words and variants of them: 1 word changed (Jaccard ~0.9) or 12 changed (~0.3),
    shuffled, so that every pair is clearly above or below 0.7."""
    rng = random.Random(seed)
    base = [[f"w{rng.randrange(5000)}" for _ in range(60)] for _ in range(25)]
    texts = [" ".join(b) for b in base]
    for b in base[:15]:
        for changed in (1, 12):
            v = list(b)
            for pos in rng.sample(range(60), changed):
                v[pos] = f"x{rng.randrange(10**6)}"
            texts.append(" ".join(v))
    rng.shuffle(texts)
    return texts


@pytest.mark.parametrize("seed", [0, 1])
def test_near_dedup_matches_brute_force_jaccard(seed):
    threshold = 0.7
    texts = near_duplicate_corpus(seed)
    sets = [shingles(t, 3) for t in texts]
    sims = [jaccard(a, b) for a, b in itertools.combinations(sets, 2)]
    assert not any(0.45 < s < 0.85 for s in sims)  # the corpus has no pair near the threshold
    assert sum(s > 0.85 for s in sims) >= 15 and sum(s < 0.45 for s in sims) > 100
    expected, kept = [], []
    for s in sets:  # first wins: drop a text similar to one kept before it
        dup = any(jaccard(s, sets[k]) >= threshold for k in kept)
        expected.append(not dup)
        if not dup:
            kept.append(len(expected) - 1)
    near = dedup.NearDedup(threshold=threshold, num_perm=128, shingle_size=3)
    got = near.filter(texts[:17]) + near.filter(texts[17:])  # state carries across batches
    assert got == expected
    assert expected.count(False) == 15 and len(near) == len(texts) - 15


def test_near_dedup_keeps_wordless_texts_and_checks_arguments():
    near = dedup.NearDedup(threshold=0.9)
    assert near.filter(["", "", "a b c"]) == [True, True, True] and len(near) == 1
    for kwargs in ({"threshold": 0.0}, {"num_perm": 1}, {"shingle_size": 0}):
        with pytest.raises(ValueError):
            dedup.NearDedup(**kwargs)


def test_exact_dedup_first_wins():
    seen = dedup.ExactDedup()
    assert [seen.add(normalize_text(t)) for t in ["Hi  there", "hi there", "HI THERE!", "hi there"]] == [
        True,
        False,
        True,
        False,
    ]
    assert len(seen) == 2


# ---------------------------------------------------------------------------------------------------------
# Draws


def test_draw_counts_count_and_ratio():
    rng = np.random.default_rng(0)
    c = mixing.draw_counts(40, 7, None, rng)
    assert c.sum() == 7 and set(np.unique(c)) <= {0, 1}
    assert mixing.draw_counts(100, None, 0.29, rng).sum() == 29  # 0.29 * 100 = 28.999999999999996 in floats
    up = mixing.draw_counts(4, None, 2.5, rng)
    assert up.sum() == 10 and sorted(up.tolist()) == [2, 2, 3, 3]
    assert mixing.draw_counts(0, None, 3.0, rng).sum() == 0
    with pytest.raises(ValueError, match="count 5 > 4"):
        mixing.draw_counts(4, 5, None, rng)
    a, b = (mixing.draw_counts(50, 10, None, np.random.default_rng([3, 1])) for _ in range(2))
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def two_sources(tmp_path):
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    a = [sft(f"Question number {i} about topic {i}?", id=f"a{i}") for i in range(10)]
    a[3]["source"] = "original/set"  # an existing tag is kept
    b = [
        sft("  QUESTION number 2   about topic 2?", id="b0"),  # exact duplicate of a2 after normalisation
        sft(base, id="b1"),
        sft(base.replace("today", "tomorrow"), id="b2"),  # near duplicate of b1 (Jaccard 11/13)
        sft("Something else entirely, with other words.", id="b3"),
        sft(base.replace("the quick brown fox", "a slow red hen"), id="b4"),  # Jaccard 8/16 with b1
        sft("Question number 2 about topic 2?", id="b5"),  # exact duplicate again
    ]
    return jsonl(tmp_path / "a.jsonl", a), jsonl(tmp_path / "b.jsonl", b)


def test_mix_dedups_tags_and_summarises(tmp_path, two_sources, capsys):
    a, b = two_sources
    cfg = yaml_config(
        tmp_path / "mix.yaml",
        "sft",
        [{"path": a, "ratio": 1.0}, {"path": b, "name": "bee", "ratio": 1.0}],
        near=True,
        threshold=0.7,
    )
    out = tmp_path / "out.jsonl"
    assert run_mix(cfg, out) == 0
    rows = read(out)
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(10)] + ["b1", "b3", "b4"]
    assert [r["source"] for r in rows] == ["a"] * 3 + ["original/set"] + ["a"] * 6 + ["bee"] * 3
    assert rows[0]["messages"] == sft("Question number 0 about topic 0?")["messages"]  # otherwise unchanged
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert [
        (s["name"], s["rows_in"], s["exact_duplicates"], s["near_duplicates"], s["rows_out"])
        for s in summary["sources"]
    ] == [
        ("a", 10, 0, 0, 10),
        ("bee", 6, 2, 1, 3),
    ]
    assert summary["totals"]["rows_out"] == 13 and summary["totals"]["rows_in"] == 16
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split() == ["total", "16", "0", "2", "1", "13", "13"]


def test_mix_without_near_dedup_keeps_near_duplicates(tmp_path, two_sources):
    a, b = two_sources
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": b, "ratio": 1.0}, {"path": a, "count": 9}], near=False)
    assert run_mix(cfg, tmp_path / "o.jsonl") == 0
    ids = [r["id"] for r in read(tmp_path / "o.jsonl")]
    assert ids[:5] == ["b0", "b1", "b2", "b3", "b4"]  # b wins: a2 is the duplicate now
    assert "a2" not in ids and len(ids) == 5 + 9


def test_mix_is_deterministic_and_seeded(tmp_path):
    rows = [sft(f"prompt {i} " + "word " * (i % 5), id=i) for i in range(200)]
    src = jsonl(tmp_path / "src.jsonl", rows)
    outs = {}
    for name, seed in (("one", 1), ("again", 1), ("other", 2)):
        cfg = yaml_config(tmp_path / f"{name}.yaml", "sft", [{"path": src, "count": 50}], seed=seed, near=True)
        assert run_mix(cfg, tmp_path / f"{name}.jsonl") == 0
        outs[name] = (tmp_path / f"{name}.jsonl").read_bytes()
    assert outs["one"] == outs["again"] != outs["other"]
    ids = [r["id"] for r in read(tmp_path / "one.jsonl")]
    assert len(ids) == len(set(ids)) == 50 and ids == sorted(ids)  # distinct, in file order
    cfg = yaml_config(tmp_path / "up.yaml", "sft", [{"path": src, "ratio": 1.5}])
    assert run_mix(cfg, tmp_path / "up.jsonl", "--overwrite") == 0
    ids = [r["id"] for r in read(tmp_path / "up.jsonl")]
    assert len(ids) == 300 and sorted(set(ids)) == list(range(200))
    assert sorted(np.bincount(ids).tolist()) == [1] * 100 + [2] * 100


def test_mix_prompt_and_preference_kinds(tmp_path):
    prompts = jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Say hi"}, sft("say  HI"), {"messages": [{"role": "user", "content": "x"}]}]
    )
    cfg = yaml_config(tmp_path / "p.yaml", "prompt", [{"path": prompts, "ratio": 1.0}])
    assert run_mix(cfg, tmp_path / "p_out.jsonl") == 0
    assert len(read(tmp_path / "p_out.jsonl")) == 2
    pair = {
        "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
    }
    split = {"prompt": "q", "chosen": "fine", "rejected": "worse"}  # the split-prompt format, same prompt
    prefs = jsonl(tmp_path / "prefs.jsonl", [pair, split, {"prompt": "other", "chosen": "a", "rejected": "b"}])
    cfg = yaml_config(tmp_path / "pr.yaml", "preference", [{"path": prefs, "ratio": 1.0}])
    assert run_mix(cfg, tmp_path / "pr_out.jsonl") == 0
    assert read(tmp_path / "pr_out.jsonl") == [
        {**pair, "source": "prefs"},
        {"prompt": "other", "chosen": "a", "rejected": "b", "source": "prefs"},
    ]


def test_mix_bad_rows_error_or_skip(tmp_path, capsys):
    src = jsonl(
        tmp_path / "s.jsonl", [sft("ok one"), {"messages": [{"role": "user", "content": "no reply"}]}, sft("ok two")]
    )
    with open(src, "a") as f:
        f.write("{not json\n")
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": src, "ratio": 1.0}])
    assert run_mix(cfg, tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"tulu-jax: error: {src} line 2: field 'messages': no assistant turn "
        "(the config says kind: sft; rows with a prompt but no reply are kind: prompt)"
    )
    assert not (tmp_path / "o.jsonl").exists()
    assert run_mix(cfg, tmp_path / "o.jsonl", "--on-bad-row", "skip") == 0
    assert len(read(tmp_path / "o.jsonl")) == 2
    s = json.loads((tmp_path / "o.jsonl.summary.json").read_text())["sources"][0]
    assert s["bad_rows"] == 2 and s["bad_row_reasons"] == {"invalid_json": 1, "no_assistant_turn": 1}


def test_mix_sft_row_needs_a_user_turn(tmp_path, capsys):
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": jsonl(tmp_path / "s.jsonl", [row]), "ratio": 1.0}])
    assert run_mix(cfg, tmp_path / "o.jsonl") == 2
    assert "s.jsonl line 1: field 'messages': no user turn" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["parquet", "folder"])
def test_mix_parquet_and_folder_inputs_and_outputs(tmp_path, two_sources, fmt):
    a, b = two_sources
    ext = ".parquet" if fmt == "parquet" else ""
    write_rows(tmp_path / f"a_in{ext}", read(a))
    write_rows(tmp_path / f"b_in{ext}", read(b))
    sources = [{"path": str(tmp_path / f"{n}_in{ext}"), "name": n, "ratio": 1.0} for n in ("a", "b")]
    cfg = yaml_config(tmp_path / "m.yaml", "sft", sources, near=True, threshold=0.7)
    assert run_mix(cfg, tmp_path / "ref.jsonl") == 0
    assert run_mix(cfg, tmp_path / f"out{ext}") == 0
    assert read(tmp_path / f"out{ext}") == read(tmp_path / "ref.jsonl")
    assert len(read(tmp_path / "ref.jsonl")) == 13
    assert (tmp_path / f"out{ext}.summary.json").exists()
    if fmt == "parquet":  # the same config writes the same bytes (a folder's state.json has a fresh fingerprint)
        assert run_mix(cfg, tmp_path / "again.parquet") == 0
        assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "out.parquet").read_bytes()


def test_mix_output_is_atomic(tmp_path, two_sources):
    """A source that shrinks between the two passes stops the write: no output, no temporary."""
    a, _ = two_sources
    cfg = mixing.load_mix_config(yaml_config(tmp_path / "m.yaml", "sft", [{"path": a, "ratio": 1.0}]))
    plans = mixing.plan_mix(cfg, "m.yaml")
    rows = read(a)
    jsonl(tmp_path / "a.jsonl", rows[:5])
    os.makedirs(tmp_path / "out")
    with pytest.raises(mixing.DataError, match="changed while mixing"):
        write_rows(tmp_path / "out" / "mix.jsonl", mixing.iter_mix(plans))
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize(
    "config, key",
    [
        (
            {"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1, "ratio": 0.5}]},
            "sources[0].count: give exactly one",
        ),
        ({"kind": "sft", "sources": [{"path": "A.jsonl"}]}, "sources[0].count: give exactly one"),
        ({"kind": "sft", "sources": [{"path": "A.jsonl", "count": 0}]}, "sources[0].count: count must be >= 1"),
        ({"kind": "sft", "sources": [{"path": "A.jsonl", "ratio": -1}]}, "sources[0].ratio: ratio must be > 0"),
        ({"kind": "sft", "sources": [{"count": 1}]}, "missing required key 'sources[0].path'"),
        ({"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1, "weight": 2}]}, "unknown key 'sources[0].weight'"),
        (
            {"kind": "chat", "sources": [{"path": "A.jsonl", "count": 1}]},
            "kind: expected one of sft, preference, prompt",
        ),
        ({"sources": [{"path": "A.jsonl", "count": 1}]}, "missing required key 'kind'"),
        ({"kind": "sft", "sources": []}, "sources: none given: list at least one source"),
        ({"kind": "sft", "sources": None}, "sources: none given: list at least one source"),
        ({"kind": "sft", "sources": 5}, "sources: expected a list of sources, got 5 (int)"),
        ({"kind": "sft", "sources": ["A.jsonl"]}, "sources[0]: expected a source (a mapping with path"),
        ({"kind": "sft", "seed": -1, "sources": [{"path": "A.jsonl", "count": 1}]}, "seed: seed must be >= 0, got -1"),
        (
            {"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1}], "dedup": {"near": True, "threshold": 0.99}},
            "dedup.threshold: threshold 0.99 with num_perm 128: datasketch's LSH needs at least 2 bands; the largest "
            "threshold that works with num_perm 128 is 0.98",
        ),
        (
            {"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1}], "dedup": {"near": True, "num_perm": 4}},
            "dedup.threshold: threshold 0.8 with num_perm 4",
        ),
        ({"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1}], "dedup": {"num_perm": 4096}}, "dedup.num_perm"),
        ({"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1}], "dedup": {"shingle_size": 99}}, "dedup.shingle"),
        (
            {"kind": "sft", "sources": [{"path": "bundled:tiny_arith/nope.jsonl", "count": 1}]},
            "sources[0].path: bundled:tiny_arith/nope.jsonl: no such bundled file; bundled files: bundled:",
        ),
        ({"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1}], "dedup": {"threshold": 1.5}}, "dedup.threshold"),
        (
            {"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1, "split": "test"}]},
            "sources[0].split: split is for hf:",
        ),
        (
            {"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1}, {"path": "d/A.jsonl", "count": 1}]},
            "sources[1].name: 'A'",
        ),
        (
            {"kind": "sft", "sources": [{"path": "A.jsonl", "count": 1}, {"path": "nope.jsonl", "count": 1}]},
            "sources[1].path: nope.jsonl: no such file",
        ),
        (
            {"kind": "sft", "sources": [{"path": "A.jsonl", "count": 11}]},
            "sources[0].count: 11 rows asked of 'A', but only 10",
        ),
        (
            {"kind": "sft", "sources": [{"path": "hf:allenai/no-such-set", "count": 1}]},
            "sources[0].path: hf:allenai/no-such-set split train: cannot load",
        ),
    ],
)
def test_config_errors_are_one_line_naming_file_and_key(tmp_path, monkeypatch, capsys, config, key):
    import yaml

    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "A.jsonl", [sft(f"q{i}") for i in range(10)])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert run_mix("bad.yaml", tmp_path / "o.jsonl") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tulu-jax: error: bad.yaml: ")
    assert key in err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_output_flag_errors(tmp_path, two_sources, capsys):
    a, b = two_sources
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": a, "ratio": 1.0}])
    for out, msg in (
        (tmp_path / "o.json", "name it *.jsonl, *.parquet, or a folder"),
        (tmp_path / "o.JSON", "name it *.jsonl, *.parquet, or a folder"),
        (tmp_path / "o.JSONL", "write the suffix in lower case (.jsonl)"),
        (b, "exists; pass --overwrite"),
        (a, "is sources[0].path"),
    ):
        assert run_mix(cfg, out) == 2
        assert msg in capsys.readouterr().err
    assert run_mix(cfg, a, "--overwrite") == 2
    assert "is sources[0].path" in capsys.readouterr().err
    assert not (tmp_path / "o.JSONL").exists()


def test_help_config_and_required_flags(capsys):
    assert main(["data", "mix", "--help-config"]) == 0
    keys = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines()]
    assert {"kind", "seed", "dedup.threshold", "sources[i].count", "sources[i].ratio"} <= set(keys)
    assert main(["data", "mix", "--out", "x.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == "tulu-jax: error: --config: required"


def test_bundled_tiny_mix_runs_offline_in_a_subprocess(tmp_path):
    out = tmp_path / "mix.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "tulu_jax.cli",
        "data",
        "mix",
        "--config",
        "configs/data/tiny_mix.yaml",
        "--out",
        str(out),
    ]
    env = dict(cli_env(), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "mix.jsonl.summary.json").read_text())
    assert [s["name"] for s in summary["sources"]] == ["tiny_arith", "tiny_if", "tiny_chat"]
    rows = read(out)
    assert len(rows) == summary["totals"]["rows_out"] > 0
    texts = [normalize_text(mixing.prompt_text(r, "out", "prompt")) for r in rows]
    assert len(texts) == len(set(texts))  # no exact duplicate left
    assert "tiny_chat" in proc.stdout and proc.stdout.splitlines()[-1].startswith("total")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "configs/data/tiny_mix.yaml").read_text().replace("count: 200", "count: 200\n    ratio: 1.0")
    )
    proc = subprocess.run(
        [*cmd[:6], str(bad), "--out", str(tmp_path / "x.jsonl")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip() == f"tulu-jax: error: {bad}: sources[1].count: give exactly one of count (rows) or ratio "
        "(fraction of the rows after dedup)"
    )


@pytest.mark.parametrize("path", sorted((REPO / "configs/data").glob("*mix*.yaml")), ids=lambda p: p.name)
def test_shipped_mix_configs_load(path):
    cfg = mixing.load_mix_config(str(path))
    assert cfg.kind in mixing.KINDS and cfg.sources
    for s in cfg.sources:  # bundled and local sources exist (hub sources are checked when run)
        if not s.path.startswith(mixing.HUB_PREFIX):
            assert os.path.exists(mixing.resolve_path(s.path)), s.path


def test_hub_source_reads_through_load_dataset(tmp_path, monkeypatch):
    """hf:NAME goes through datasets.load_dataset(NAME, split=...); a local data folder stands in for the hub
    (offline), so the hub path's reading, naming and second pass are exercised."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep the user's cache clean
    hub = tmp_path / "org" / "tiny-set"
    os.makedirs(hub)
    jsonl(hub / "train.jsonl", [sft(f"hub question {i}", id=i) for i in range(6)] + [sft("hub question 0")])
    jsonl(hub / "test.jsonl", [sft("held out")])
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": f"hf:{hub}", "split": "train", "count": 4}])
    assert run_mix(cfg, tmp_path / "o.jsonl") == 0
    rows = read(tmp_path / "o.jsonl")
    assert len(rows) == 4 and {r["source"] for r in rows} == {"tiny-set"}
    summary = json.loads((tmp_path / "o.jsonl.summary.json").read_text())["sources"][0]
    assert (summary["rows_in"], summary["exact_duplicates"], summary["rows_after_dedup"]) == (7, 1, 6)


# ---------------------------------------------------------------------------------------------------------
# Problems a first user found


PAIR = {
    "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
    "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
}


def test_a_source_of_only_bad_rows_is_an_error_with_a_kind_hint(tmp_path, capsys):
    prefs = jsonl(tmp_path / "prefs.jsonl", [PAIR, {**PAIR, "id": 2}])
    good = jsonl(tmp_path / "good.jsonl", [sft("fine")])
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": good, "ratio": 1.0}, {"path": prefs, "ratio": 1.0}])
    assert run_mix(cfg, tmp_path / "o.jsonl", "--on-bad-row", "skip") == 2
    assert capsys.readouterr().err.strip() == (
        f"tulu-jax: error: {cfg}: sources[1] 'prefs': every one of its 2 rows was bad for kind sft "
        "(2 missing_messages) (the config says kind: sft; rows with chosen/rejected are kind: preference)"
    )
    assert run_mix(cfg, tmp_path / "o.jsonl") == 2  # under error, the first row says it
    assert "rows with chosen/rejected are kind: preference" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_source_with_no_rows_out_is_a_warning(tmp_path, capsys):
    small = jsonl(tmp_path / "small.jsonl", [sft(f"question {i}") for i in range(3)])
    other = jsonl(tmp_path / "other.jsonl", [sft(f"other {i}") for i in range(5)])
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": small, "ratio": 0.2}, {"path": other, "ratio": 1.0}])
    assert run_mix(cfg, tmp_path / "o.jsonl") == 0
    warning = f"{cfg}: sources[0] 'small': 0 rows out: ratio 0.2 of its 3 rows left after dedup rounds down to 0"
    assert capsys.readouterr().err.strip() == f"tulu-jax: warning: {warning}"
    summary = json.loads((tmp_path / "o.jsonl.summary.json").read_text())
    assert summary["warnings"] == [warning] and summary["sources"][0]["warning"] == warning
    assert summary["sources"][1]["warning"] is None and len(read(tmp_path / "o.jsonl")) == 5


def test_count_is_checked_and_summary_written_before_the_output_appears(tmp_path, two_sources, monkeypatch, capsys):
    a, _ = two_sources
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": a, "ratio": 1.0}])
    real_iter_mix = mixing.iter_mix
    monkeypatch.setattr(mixing, "iter_mix", lambda plans: itertools.chain(real_iter_mix(plans), [sft("grew")]))
    assert run_mix(cfg, tmp_path / "o.jsonl") == 2
    assert "wrote 11 rows, planned 10: a source changed while mixing" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    monkeypatch.setattr(mixing, "iter_mix", real_iter_mix)

    def killed(path, summary):
        raise KeyboardInterrupt  # a kill while the summary is written: the output must not be there yet

    monkeypatch.setattr(cmd_mix, "_write_summary", killed)
    assert run_mix(cfg, tmp_path / "o.jsonl") == 130  # the CLI's exit code for Ctrl-C
    assert not (tmp_path / "o.jsonl").exists()
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_out_folder_holding_the_sources_is_refused(tmp_path, two_sources, capsys):
    a, b = two_sources
    cfg = yaml_config(tmp_path / "m.yaml", "sft", [{"path": a, "ratio": 1.0}])
    before = sorted(os.listdir(tmp_path))
    assert run_mix(cfg, tmp_path, "--overwrite") == 2  # e.g. --out ~/data --overwrite
    assert "contains sources[0].path" in capsys.readouterr().err
    cfg2 = yaml_config(tmp_path / "m2.yaml", "sft", [{"path": str(tmp_path / "sub" / "x.jsonl"), "ratio": 1.0}])
    os.makedirs(tmp_path / "sub")
    jsonl(tmp_path / "sub" / "x.jsonl", [sft("x")])
    assert run_mix(cfg2, tmp_path / "sub", "--overwrite") == 2
    assert "contains sources[0].path" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "m2.yaml", "sub"]) and read(b)


def test_default_names_of_split_files_are_their_folders(tmp_path):
    cfg = mixing.load_mix_config(
        yaml_config(
            tmp_path / "m.yaml",
            "prompt",
            [
                {"path": "bundled:tiny_arith/train.jsonl", "ratio": 1.0},
                {"path": "bundled:tiny_if/train.jsonl", "ratio": 1.0},
                {"path": "data/chat/eval.parquet", "ratio": 1.0},
                {"path": "mine.jsonl", "ratio": 1.0},
            ],
        )
    )
    assert mixing.source_names(cfg) == ["tiny_arith", "tiny_if", "chat", "mine"]


def test_bundled_tiny_mix_near_dedup_keeps_distinct_arithmetic_prompts():
    """Under the bundled config's dedup settings, no distinct prompt with a number in it (an arithmetic
    question, most differing from another in one number) of the three bundled sets is a near duplicate."""
    cfg = mixing.load_mix_config(str(REPO / "configs/data/tiny_mix.yaml"))
    texts = []
    for s in cfg.sources:
        for where, row in iter_rows(mixing.resolve_path(s.path)):
            texts.append(normalize_text(mixing.prompt_text(row, where, cfg.kind)))
    numeric = [t for t in dict.fromkeys(texts) if any(c.isdigit() for c in t)]
    assert len(numeric) > 4000
    d = cfg.dedup
    near = dedup.NearDedup(d.threshold, d.num_perm, d.shingle_size)
    assert near.filter(numeric) == [True] * len(numeric)
