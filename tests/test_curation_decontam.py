"""`tulu-jax data decontaminate`: the tokenizer, n-gram hashes and coverage score against brute-force
pure-Python references on small random sets, and the command end to end on tiny files."""

import json
import random
import re
import string

import numpy as np
import pytest

from tulu_jax.cli import main
from tulu_jax.curation import ngrams
from tulu_jax.curation.decontaminate import Decontaminator, EvalSet, companion_path, decontaminate, load_eval_sets
from tulu_jax.curation.ngram_index import NgramIndex
from tulu_jax.curation.ngrams import coverage, covered_count, tokenize, window_hashes

# --- brute-force references -------------------------------------------------------------------------------


def contains_run(doc: list, run: list) -> bool:
    return any(doc[i : i + len(run)] == run for i in range(len(doc) - len(run) + 1))


def brute_score(instance: list, doc: list, n: int) -> float:
    """Per token of the instance: is it inside some n-gram of the instance that occurs in `doc`? (the whole
    instance when it is shorter than n)."""
    size = len(instance)
    if size == 0:
        return 0.0
    m = min(n, size)
    covered = 0
    for t in range(size):
        starts = range(max(0, t - m + 1), min(t, size - m) + 1)
        covered += any(contains_run(doc, instance[s : s + m]) for s in starts)
    return covered / size


def brute_hash(ids: list[int], table: np.ndarray) -> int:
    h = 0
    for i in ids:
        h = (h * int(ngrams.HASH_MULTIPLIER) + int(table[i])) % 2**64
    return h


# --- tokenizer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,tokens",
    [
        ("What's 2+2?", ["what", "'", "s", "2", "+", "2", "?"]),
        ("Solve $x^2 = 4$.", ["solve", "$", "x", "^", "2", "=", "4", "$", "."]),
        ("ｆｕｌｌ　ＷＩＤＴＨ", ["full", "width"]),  # NFKC: fullwidth letters and space
        ("ﬁle ① ⅸ", ["file", "1", "ix"]),  # NFKC: ligature, circled digit, roman numeral
        ("Straße", ["strasse"]),  # casefold: German sharp s
        ("ΣΊΣΥΦΟΣ", ["σίσυφοσ"]),  # casefold: final sigma folds to sigma
        ("cafe\u0301 naïve", ["café", "naïve"]),  # decomposed accents recomposed
        ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # combining vowel signs stay inside the word
        ("İstanbul ISTANBUL", ["i\u0307stanbul", "istanbul"]),  # Turkish dotted I: not language-aware
        ("  \n\t ", []),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_tokenize_is_invariant_to_case_and_compatibility_forms():
    assert tokenize("STRASSE") == tokenize("straße") == tokenize("Straße")
    assert tokenize("e\u0301") == tokenize("\u00e9") == tokenize("\u00c9")
    assert tokenize("ǰ") == tokenize("J\u030c")  # casefold decomposes, the last NFKC recomposes


def test_fast_paths_match_the_full_pattern():
    """tokenize splits at whitespace and regex-splits only pieces that are not all letters/digits, with an
    ASCII-only pattern for ASCII text: the same tokens as the full pattern on the whole text."""
    alphabet = "aZ9_ \t\n\u00a0\u2003.,'$-é\u0301\u0307ßİ\u093f\u0915ｆ①\u200b"
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert tokenize(text) == ngrams._token_pattern().findall(ngrams.normalize(text)), repr(text)


def test_ascii_pattern_matches_the_full_pattern():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 60)))
        assert ngrams._ASCII_TOKEN.findall(text) == ngrams._token_pattern().findall(text)


# --- hashes and coverage ----------------------------------------------------------------------------------


def test_window_hashes_against_python_arithmetic():
    rng = np.random.default_rng(1)
    table = ngrams.token_table(6, seed=3)
    assert table[0] == 0 and len(set(table[1:].tolist())) == 5
    for _ in range(50):
        ids = rng.integers(0, 6, size=int(rng.integers(0, 20)))
        m = int(rng.integers(1, 6))
        hashes, valid = window_hashes(ids, m, table)
        assert len(hashes) == len(valid) == max(len(ids) - m + 1, 0)
        for i in range(len(hashes)):
            window = ids[i : i + m].tolist()
            assert int(hashes[i]) == brute_hash(window, table)
            assert bool(valid[i]) == (0 not in window)
    with pytest.raises(ValueError, match="window length"):
        window_hashes(np.zeros(3, np.int64), 0, table)


def test_covered_count_is_the_union_of_windows():
    rng = np.random.default_rng(2)
    for _ in range(100):
        m = int(rng.integers(1, 6))
        pos = np.unique(rng.integers(0, 30, size=int(rng.integers(0, 8))))
        union = {p + j for p in pos.tolist() for j in range(m)}
        assert covered_count(pos, m) == len(union)


def test_coverage_and_index_against_brute_force_on_random_sets():
    """Small vocabularies, so that windows overlap, repeat and cross the n-gram boundary often."""
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(200):
        vocab = int(rng.integers(2, 5))
        n = int(rng.integers(1, 6))
        instances = [rng.integers(1, vocab, size=int(rng.integers(1, 14))) for _ in range(5)]
        docs = [rng.integers(0, vocab, size=int(rng.integers(0, 25))) for _ in range(6)]
        index = NgramIndex(instances, n, vocab, seed=trial)
        doc, inst, score = index.match(docs)
        got = {(d, i): s for d, i, s in zip(doc.tolist(), inst.tolist(), score.tolist())}
        assert len(got) == len(doc)  # one score per pair
        for d in range(len(docs)):
            for i in range(len(instances)):
                want = brute_score(instances[i].tolist(), docs[d].tolist(), n)
                # the same rational covered/L on both sides, so equal as floats
                assert coverage(instances[i], docs[d], n) == want
                assert got.get((d, i), 0.0) == want, (trial, d, i)
                checked += want > 0
    assert checked > 100  # the sets did overlap


@pytest.mark.parametrize(
    "doc,want",
    [
        ("a b c d", 4 / 8),  # a shared run of exactly n: one n-gram, its n tokens
        ("a b c", 0.0),  # n - 1 tokens: no n-gram
        ("a b c d x e f g h", 8 / 8),  # two runs of n, each an n-gram
        ("a b c d e x g h", 5 / 8),  # a b c d e: n-grams at 0 and 1 cover 5 tokens
        ("b c d e f g", 6 / 8),  # n-grams at 1, 2, 3 cover tokens 1..6
    ],
)
def test_coverage_hand_computed(doc, want):
    assert coverage(list("abcdefgh"), doc.split(), 4) == want


def test_repeated_ngram_covers_every_occurrence():
    # open-instruct's map keyed by n-gram text kept only the last occurrence (3/6); every occurrence counts here
    assert coverage("x y z x y z".split(), "x y z".split(), 3) == 1.0
    assert coverage("x y z w x y z".split(), "q x y z q".split(), 3) == 6 / 7


def test_instance_shorter_than_n_matches_only_whole():
    assert coverage(["x", "y"], "a x y b".split(), 8) == 1.0
    assert coverage(["x", "y"], "a y x b".split(), 8) == 0.0
    assert coverage(["x", "y"], "x z y".split(), 8) == 0.0
    assert coverage([], "x".split(), 8) == 0.0
    index = NgramIndex([np.array([1, 2]), np.array([2])], 8, 3)
    doc, inst, score = index.match([np.array([0, 1, 2, 0]), np.array([2, 1])])
    assert list(zip(doc.tolist(), inst.tolist(), score.tolist())) == [(0, 0, 1.0), (0, 1, 1.0), (1, 1, 1.0)]


def test_threshold_is_strict():
    instance = " ".join(f"w{i}" for i in range(16))
    half, more = " ".join(f"w{i}" for i in range(8)), " ".join(f"w{i}" for i in range(9))
    deco = Decontaminator([EvalSet("e", "e.jsonl", [instance], {})], n=8, threshold=0.5)
    found = deco.scan([f"intro {half} outro", f"intro {more} outro", "nothing here"])
    assert found == [(0, [], 0.5), (1, [(0, 9 / 16)], 0.0)]
    assert Decontaminator(deco.sets, n=8, threshold=0.0).scan([half])[0][1] == [(0, 0.5)]


def test_index_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        NgramIndex([np.array([1])], 0, 2)
    with pytest.raises(ValueError, match="token ids"):
        NgramIndex([np.array([0, 1])], 2, 2)


def test_companion_path():
    assert companion_path("out/clean.jsonl", ".removed.jsonl") == "out/clean.removed.jsonl"
    assert companion_path("out/clean.parquet", ".report.md") == "out/clean.report.md"
    assert companion_path("out/clean/", ".removed.jsonl") == "out/clean.removed.jsonl"


# --- the command end to end -------------------------------------------------------------------------------

GSM = [
    "A farmer has 14 cows and buys 9 more. Then 5 cows are sold. How many cows does the farmer have now?",
    "Ella buys 4 packs of stickers with 25 stickers in each pack. She uses 37 stickers. How many stickers are left?",
]
MATH = ["Solve for $y$: $5y - 4 = 3y + 10$.", "What is 7 + 5?"]  # the second: 6 tokens, under n = 8


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def user(text, **extra):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}], **extra}


def gsm_half(k):
    return " ".join(tokenize(GSM[1])[:k])


@pytest.fixture()
def files(tmp_path):
    evals = [
        write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": q, "answer": "1"} for q in GSM]),
        write_jsonl(tmp_path / "math.jsonl", [{"problem": p} for p in MATH]),
    ]
    size = len(tokenize(GSM[1]))
    train = [
        user("Tell me a story about a dragon who learns to paint with watercolors."),
        user("Please help. " + GSM[0].upper() + " Thanks!", source="web"),  # whole, other case: 1.0
        user(f"Start: {gsm_half(size // 2 + 1)} end", source="web"),  # just above 0.5
        user(f"Start: {gsm_half(size // 2)} end"),  # exactly 0.5: kept
        {"messages": [{"role": "system", "content": GSM[0]}, {"role": "user", "content": "Hi"}]},  # not a user turn
        {"prompt": "Quick one: what is 7 + 5? Thanks", "source": "math-src"},  # a short instance, whole
        {"prompt": "what is 7 plus 5", "source": "math-src"},
        {"chosen": [{"role": "user", "content": MATH[0]}, {"role": "assistant", "content": "7"}], "rejected": []},
    ]
    return evals, write_jsonl(tmp_path / "train.jsonl", train), train, size


def test_cli_removes_contaminated_rows(tmp_path, files, capsys):
    """--short-instances whole: the 6-token instance MATH[1] removes the row that contains it whole."""
    evals, train, rows, size = files
    out = tmp_path / "out" / "clean.jsonl"
    argv = ["data", "decontaminate", "--data", train, "--eval", *evals, "--out", str(out), "--workers", "1"]
    assert main([*argv, "--short-instances", "whole"]) == 0
    removed_idx = [1, 2, 5, 7]
    assert read_jsonl(out) == [r for i, r in enumerate(rows) if i not in removed_idx]
    removed = read_jsonl(tmp_path / "out" / "clean.removed.jsonl")
    assert [r["row"] for r in removed] == [rows[i] for i in removed_idx]
    assert [r["where"] for r in removed] == [f"{train} line {i + 1}" for i in removed_idx]
    assert [r["source"] for r in removed] == ["web", "web", "math-src", train]
    assert [(r["eval_set"], r["eval_index"]) for r in removed] == [("gsm8k", 0), ("gsm8k", 1), ("math", 1), ("math", 0)]
    assert [r["eval_text"] for r in removed] == [GSM[0], GSM[1], MATH[1], MATH[0]]
    assert [r["eval_file"] for r in removed] == [evals[0], evals[0], evals[1], evals[1]]
    assert [r["score"] for r in removed] == [1.0, round((size // 2 + 1) / size, 6), 1.0, 1.0]
    assert all(r["matches"][0] == {k: r[k] for k in ("eval_set", "eval_index", "score")} for r in removed)

    report = (tmp_path / "out" / "clean.report.md").read_text()
    for heading in (
        "# Decontamination report",
        "## Removed rows per training source",
        "## Matches per evaluation set",
        "### web",
        "### gsm8k",
        "### math",
        "## Removed rows by training source and evaluation set (best match)",
        "## Kept rows that share n-grams with an instance",
    ):
        assert f"\n{heading}\n" in f"\n{report}", heading
    assert f"`{train} line 3` (source web): score {(size // 2 + 1) / size:.3f} against gsm8k #1" in report
    assert "| web | 2 | 2 | 100.000 |" in report
    assert "| gsm8k | 2 | 0 | 2 | 2 | 2 |" in report and "| math | 2 | 1 | 2 | 2 | 2 |" in report
    assert "| [0.5, 0.6) | 1 |" in report  # the row at exactly 0.5 was kept

    assert "## Evaluation instances shorter than 8 tokens" in report and "matched whole" in report
    captured = capsys.readouterr()
    assert "math: 1 of 2 instances (50.0%) are shorter than 8 tokens; each removes every" in captured.err
    printed = captured.out
    assert "removed 4, kept 4" in printed
    assert re.search(r"^gsm8k\s+2\s+0\s+2\s+2\s+2$", printed, re.M)
    assert re.search(r"^web\s+2\s+2\s+100\.000$", printed, re.M)


def test_workers_and_chunks_give_identical_outputs(tmp_path, files):
    evals, train, _, _ = files
    sets = load_eval_sets(evals)
    outs = []
    for workers, chunk in ((1, 4096), (2, 1), (2, 3)):
        out = tmp_path / f"w{workers}c{chunk}.jsonl"
        s = decontaminate(
            [train, train], sets, str(out), short_instances="whole", workers=workers, chunk_rows=chunk, progress=False
        )
        assert (s.rows_removed, s.rows_kept, s.workers) == (8, 8, workers)
        outs.append((out.read_bytes(), (tmp_path / f"w{workers}c{chunk}.removed.jsonl").read_bytes()))
    assert outs[0] == outs[1] == outs[2]


def test_cli_workers_1_and_2_identical(tmp_path, files):
    evals, train, _, _ = files
    got = []
    for k in ("1", "2"):
        out = tmp_path / k / "clean.jsonl"
        argv = ["data", "decontaminate", "--data", train, "--eval", *evals, "--out", str(out), "--workers", k]
        assert main([*argv, "--quiet"]) == 0
        got.append((out.read_bytes(), (tmp_path / k / "clean.removed.jsonl").read_bytes()))
    assert got[0] == got[1]


def test_eval_field(tmp_path, files, capsys):
    _, train, rows, _ = files
    ev = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": GSM[0]}, {"instruction": "Name a color."}])
    argv = ["data", "decontaminate", "--data", train, "--eval", ev, "--out", str(tmp_path / "c.jsonl")]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"tulu-jax: error: {ev} line 1: no evaluation text field (expected one of prompt, question, "
        "problem, messages; or pass --eval-field)\n"
    )
    assert main([*argv, "--quiet", "--eval-field", "instruction", "--report", str(tmp_path / "r.md")]) == 0
    assert [r["row"] for r in read_jsonl(tmp_path / "c.removed.jsonl")] == [rows[1]]
    assert "| alpaca | 2 | 1 | 1 | 1 | 1 |" in (tmp_path / "r.md").read_text()
    assert not (tmp_path / "c.report.md").exists()
    assert "alpaca: 1 of 2 instances (50.0%) are shorter than 8 tokens" in capsys.readouterr().err
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"instruction": GSM[0]}, {"question": GSM[1]}])
    argv = ["data", "decontaminate", "--data", train, "--eval", partial, "--out", str(tmp_path / "d.jsonl")]
    assert main([*argv, "--eval-field", "instruction"]) == 2
    assert capsys.readouterr().err == f"tulu-jax: error: {partial} line 2: no field 'instruction' (--eval-field)\n"


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"answer": "3"}, "line 2: no evaluation text field"),
        ({"question": "   "}, "line 2: field 'question' is empty"),
        ({"question": 7}, "line 2: field 'question' must be a string or a list of messages"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "line 2: field 'messages' has no user turn"),
        ("{not json", "line 2: invalid JSON"),
    ],
)
def test_bad_eval_file_is_one_line_exit_2(tmp_path, files, capsys, bad, message):
    _, train, _, _ = files
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"question": GSM[0]}, bad])
    out = tmp_path / "c.jsonl"
    assert main(["data", "decontaminate", "--data", train, "--eval", ev, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tulu-jax: error: {ev} {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_empty_or_missing_eval_file(tmp_path, files, capsys):
    _, train, _, _ = files
    ev = write_jsonl(tmp_path / "ev.jsonl", [])
    base = ["data", "decontaminate", "--data", train, "--out", str(tmp_path / "c.jsonl"), "--eval"]
    assert main([*base, ev]) == 2
    want = f"tulu-jax: error: {ev}: no rows (an evaluation set needs at least one instance)\n"
    assert capsys.readouterr().err == want
    assert main([*base, str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_bad_training_rows_error_or_skip(tmp_path, files, capsys):
    evals, _, _, _ = files
    train = write_jsonl(tmp_path / "t.jsonl", [user(GSM[0]), "{oops", {"text": "no prompt"}, user("fine")])
    out = tmp_path / "c.jsonl"
    argv = ["data", "decontaminate", "--data", train, "--eval", *evals, "--out", str(out), "--quiet"]
    before = sorted(tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()  # the first line: a warning about the short instance
    assert len(err) == 2 and err[1].startswith(f"tulu-jax: error: {train} line 2: invalid JSON")
    assert sorted(tmp_path.iterdir()) == before  # neither CLEAN, its companions nor a temporary
    assert main([*argv, "--on-bad-row", "skip"]) == 0
    assert read_jsonl(out) == [user("fine")]
    printed = capsys.readouterr().out
    assert "removed 1, kept 1, skipped 2 bad rows" in printed
    assert "invalid_json: 1, no_prompt: 1" in (tmp_path / "c.report.md").read_text()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--ngram", "0"], "--ngram must be >= 1, got 0"),
        (["--ngram", "-3"], "--ngram must be >= 1, got -3"),
        (["--threshold", "1"], "--threshold must be in [0, 1), got 1.0"),
        (["--threshold", "-0.1"], "--threshold must be in [0, 1), got -0.1"),
        (["--threshold", "nan"], "--threshold must be in [0, 1), got nan"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
    ],
)
def test_bad_flags(tmp_path, files, capsys, flags, message):
    """Checked before anything is read: the evaluation file given here is not even JSON."""
    _, train, _, _ = files
    bad_eval = write_jsonl(tmp_path / "ev.jsonl", ["{not json"])
    argv = ["data", "decontaminate", "--data", train, "--eval", bad_eval, "--out", str(tmp_path / "c.jsonl")]
    before = sorted(tmp_path.iterdir())
    assert main([*argv, *flags]) == 2
    assert capsys.readouterr().err == f"tulu-jax: error: {message}\n"
    assert sorted(tmp_path.iterdir()) == before


def test_same_eval_file_twice(tmp_path, files, capsys):
    evals, train, _, _ = files
    argv = ["data", "decontaminate", "--data", train, "--eval", evals[0], evals[0], "--out", str(tmp_path / "c.jsonl")]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"tulu-jax: error: --eval: {evals[0]} is given twice\n"


def test_out_may_not_overwrite_an_input(tmp_path, files, capsys):
    evals, train, _, _ = files
    assert main(["data", "decontaminate", "--data", train, "--eval", *evals, "--out", train]) == 2
    assert (
        capsys.readouterr().err == f"tulu-jax: error: --out {train}: is --data ({train}); write the output elsewhere\n"
    )


def test_parquet_output(tmp_path, files):
    from tulu_jax.curation.rows import iter_rows

    evals, train, rows, _ = files
    out = tmp_path / "clean.parquet"
    argv = ["data", "decontaminate", "--data", train, "--eval", *evals, "--out", str(out), "--quiet"]
    assert main(argv) == 0
    kept = [r for _, r in iter_rows(out)]
    assert [r["messages"] if r.get("messages") else r["prompt"] for r in kept] == [
        r.get("messages") or r["prompt"] for i, r in enumerate(rows) if i not in (1, 2, 7)
    ]
    assert len(read_jsonl(tmp_path / "clean.removed.jsonl")) == 3


def test_bundled_demo_removes_exactly_the_quoted_instances(tmp_path, capsys):
    """The README's offline example: the demo prompts that quote a bundled evaluation instance go, the one
    quoting only a third of an instance (below 0.5) and the ordinary prompts stay."""
    from pathlib import Path

    assets = Path(__file__).resolve().parents[1] / "tulu_jax" / "assets"
    demo = assets / "curation_demo" / "prompts.jsonl"
    evals = sorted(str(p) for p in (assets / "eval_samples").glob("*.jsonl"))
    out = tmp_path / "clean.jsonl"
    assert main(["data", "decontaminate", "--data", str(demo), "--eval", *evals, "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in demo.read_text().splitlines()]
    removed_file = Path(companion_path(str(out), ".removed.jsonl"))
    removed = [json.loads(line) for line in removed_file.read_text().splitlines()]
    assert sorted(r["row"]["id"] for r in removed) == sorted(r["id"] for r in rows if r["note"].startswith("contains"))
    for r in removed:  # the note names the instance each row quotes
        assert r["row"]["note"] == f"contains {r['eval_set']} instance {r['eval_index']}" and r["score"] == 1.0
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == [r["id"] for r in rows if not r["note"].startswith("contains")]


# --- short instances, turns, outputs, workers -------------------------------------------------------------


def test_short_instances_are_skipped_by_default(tmp_path, files, capsys):
    """As open-instruct: the 6-token MATH[1] matches nothing, so the row quoting it whole stays; it is
    counted, listed in the report and warned about (1 of 2 instances > 1%)."""
    evals, train, rows, _ = files
    out = tmp_path / "clean.jsonl"
    assert main(["data", "decontaminate", "--data", train, "--eval", *evals, "--out", str(out), "--quiet"]) == 0
    assert read_jsonl(out) == [r for i, r in enumerate(rows) if i not in (1, 2, 7)]
    captured = capsys.readouterr()
    assert captured.err == (
        "decontaminate: warning: math: 1 of 2 instances (50.0%) are shorter than 8 tokens; they are skipped, as "
        "in open-instruct (--short-instances whole: a row containing one whole is removed)\n"
    )
    assert re.search(r"^math\s+2\s+1\s+1\s+1\s+1$", captured.out, re.M)
    report = (tmp_path / "clean.report.md").read_text()
    assert "\n## Evaluation instances shorter than 8 tokens\n" in report
    assert "- gsm8k: 0 of 2\n- math: 1 of 2\n  - #1: What is 7 + 5?\n" in report


def test_short_instance_modes_on_a_one_token_instance():
    """The instance "Hi" (1 token) removes every row with "hi" only under "whole"; a set of 200 instances with 2 short
    ones (1%) is not warned about, 3 (1.5%) is."""
    sets = [EvalSet("e", "e.jsonl", ["Hi", "w0 w1 w2 w3 w4 w5 w6 w7"], {})]
    texts = ["hi there", "say HI", "w0 w1 w2 w3 w4 w5 w6 w7 hi"]
    assert Decontaminator(sets, 8, short_instances="skip").scan(texts) == [(2, [(1, 1.0)], 0.0)]
    whole = Decontaminator(sets, 8, short_instances="whole").scan(texts)
    assert whole == [(0, [(0, 1.0)], 0.0), (1, [(0, 1.0)], 0.0), (2, [(0, 1.0), (1, 1.0)], 0.0)]
    with pytest.raises(ValueError, match="--short-instances must be one of skip, whole"):
        Decontaminator(sets, 8, short_instances="drop")
    from tulu_jax.curation.decontaminate import _new_summary, short_warnings

    long = [" ".join(f"t{k}" for k in range(i, i + 8)) for i in range(200)]
    for short, warned in ((2, False), (3, True)):
        deco = Decontaminator([EvalSet("s", "s.jsonl", ["a"] * short + long[short:], {})], 8)
        assert bool(short_warnings(_new_summary(deco, [], "c.jsonl", "r.jsonl", 1))) == warned


def test_ngrams_do_not_span_user_turns(tmp_path):
    """An instance split across two user turns is no match: the turns are separated by a token that no
    n-gram contains (joined by "\\n" it would score 1.0)."""
    inst = "alpha beta gamma delta epsilon zeta eta theta"
    sets = [EvalSet("e", "e.jsonl", [inst], {})]
    deco = Decontaminator(sets, 8)
    first, second = "please alpha beta gamma delta", "epsilon zeta eta theta thanks"
    assert deco.scan([[first, second]]) == []
    assert deco.scan([f"{first}\n{second}"]) == [(0, [(0, 1.0)], 0.0)]
    assert deco.scan([[first, "x", f"{first} {second}"]]) == [(0, [(0, 1.0)], 0.0)]
    split = {
        "messages": [user(first)["messages"][0], {"role": "assistant", "content": "go on"}, user(second)["messages"][0]]
    }
    whole = user(f"{first} {second}")
    train = write_jsonl(tmp_path / "t.jsonl", [split, whole])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"prompt": inst}])
    s = decontaminate([train], load_eval_sets([ev]), str(tmp_path / "c.jsonl"), workers=1, progress=False)
    assert (s.rows_kept, s.rows_removed) == (1, 1)
    assert read_jsonl(tmp_path / "c.jsonl") == [split]


def test_bad_out_paths_are_one_line_before_reading(tmp_path, files, capsys):
    """Every output path is checked before anything is read: the evaluation file here is not even JSON."""
    _, train, _, _ = files
    afile = write_jsonl(tmp_path / "afile", [])
    bad_eval = write_jsonl(tmp_path / "ev.jsonl", ["{not json"])
    base = ["data", "decontaminate", "--data", train, "--eval", bad_eval, "--quiet"]
    cases = [
        (["--out", f"{afile}/x.jsonl"], f"--out {afile}/x.jsonl: cannot create its folder"),
        (["--out", bad_eval], f"--out {bad_eval}: is --eval ({bad_eval}); write the output elsewhere"),
        (
            ["--out", str(tmp_path / "c.jsonl"), "--report", train],
            f"--report {train}: is, is inside or contains --data",
        ),
        (["--out", str(tmp_path / "c.jsonl"), "--report", str(tmp_path / "c.jsonl")], "--report"),
        (["--out", str(tmp_path / "c.jsonl"), "--report", f"{afile}/r.md"], f"--report {afile}/r.md: cannot create"),
        (
            ["--out", str(tmp_path / "d.jsonl"), "--report", str(tmp_path)],
            f"--report {tmp_path}: is, is inside or contains",
        ),
    ]
    (tmp_path / "e.removed.jsonl").mkdir()
    cases.append(
        (["--out", str(tmp_path / "e.jsonl")], f"--out (removed-rows file) {tmp_path}/e.removed.jsonl: is a dir")
    )
    before = sorted(tmp_path.iterdir())
    for flags, message in cases:
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"tulu-jax: error: {message}") and err.count("\n") == 1, (flags, err)
    assert sorted(tmp_path.iterdir()) == before


def test_existing_out_needs_overwrite(tmp_path, files, capsys):
    evals, train, _, _ = files
    out = tmp_path / "clean.jsonl"
    argv = ["data", "decontaminate", "--data", train, "--eval", *evals, "--out", str(out), "--quiet"]
    assert main(argv) == 0
    first = [out.read_bytes(), (tmp_path / "clean.removed.jsonl").read_bytes()]
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == f"tulu-jax: error: --out {out}: exists; pass --overwrite to replace it\n"
    assert main([*argv, "--overwrite", "--short-instances", "whole"]) == 0
    assert out.read_bytes() != first[0] and len(read_jsonl(tmp_path / "clean.removed.jsonl")) == 4


def test_failed_run_leaves_no_output(tmp_path, files, monkeypatch, capsys):
    """The removed file and the report are renamed into place before CLEAN: a failure while writing the
    report (after every row was scanned) leaves none of the three, nor a temporary."""
    from tulu_jax.curation import decontam_report

    evals, train, _, _ = files
    before = sorted(tmp_path.iterdir())

    def broken(summary, path):
        raise OSError("disk full")

    monkeypatch.setattr(decontam_report, "write_report", broken)
    out = tmp_path / "clean.jsonl"
    with pytest.raises(OSError, match="disk full"):
        main(["data", "decontaminate", "--data", train, "--eval", *evals, "--out", str(out), "--quiet"])
    assert sorted(tmp_path.iterdir()) == before


WORKER_DIES = """
import os, sys
from tulu_jax.curation import decontaminate
decontaminate.Decontaminator.scan = lambda self, texts: os._exit(9)  # inherited by the forked workers
from tulu_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_dead_worker_is_an_error_not_a_hang(tmp_path, files):
    """A scan worker that dies (as when OOM-killed) ends the run with one line naming --workers and
    leaves no output; the subprocess timeout guards against the old hang."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    evals, train, _, _ = files
    out = tmp_path / "clean.jsonl"
    argv = ["data", "decontaminate", "--data", train, "--eval", *evals, "--out", str(out), "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", WORKER_DIES, *argv, "--quiet"], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith("tulu-jax: error: a scan worker died (out of memory?); rerun with fewer --workers\n"), (
        done.stderr
    )
    assert not out.exists() and not list(tmp_path.glob(".clean*")) and not list(tmp_path.glob("clean*"))


def test_source_tables_are_capped(tmp_path, files):
    """A `source` per row: the tables show the 50 sources with most removals and one row for the rest."""
    from tulu_jax.curation.decontam_report import render, source_rows

    evals, _, _, _ = files
    rows = [user(GSM[0] if i % 2 else "a harmless prompt", source=f"s{i:02d}") for i in range(60)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    s = decontaminate([train], load_eval_sets(evals), str(tmp_path / "c.jsonl"), workers=1, progress=False)
    table = source_rows(s)
    assert len(table) == 51 and [r[2] for r in table[:30]] == [1] * 30
    assert table[-1] == ["(others: 10 sources)", 10, 0, 0.0]
    assert sum(r[1] for r in table) == 60 and sum(r[2] for r in table) == 30
    assert "| (others: 10 sources) | 10 | 0 | 0.000 |" in render(s)


@pytest.mark.parametrize("flag", ["--data", "--eval"])
def test_a_missing_input_names_its_flag(tmp_path, capsys, flag):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "a question with enough words to index"}) + "\n")
    missing = str(tmp_path / "missing.jsonl")
    data, ev = (missing, str(good)) if flag == "--data" else (str(good), missing)
    assert main(["data", "decontaminate", "--data", data, "--eval", ev, "--out", str(tmp_path / "c.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"tulu-jax: error: {flag} {missing}: no such file or directory"
