"""Generates the bundled tiny preference set (deterministic), in the Tülu 3 format.

    python scripts/make_tiny_prefs.py          # writes tulu_jax/assets/tiny_prefs/{train,eval}.jsonl

Prompts are of the same kinds as tiny_chat (scripts/make_tiny_assets.py, whose tables and answer
style are reused): arithmetic with "now add" follow-ups, word games and table facts, ~20% with a
system prompt and ~15% multi-turn. `chosen` ends with the correct answer in tiny_chat's style;
`rejected` ends with a fluent but systematically wrong one (a sum off by a little, a misspelled
reversal, the wrong capital or colour, an off-by-one count, or ignoring the capital-letters system
prompt). Earlier turns are correct and shared. No pair appears twice (so none is in both splits).
"""

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_spec = importlib.util.spec_from_file_location("make_tiny_assets", HERE / "make_tiny_assets.py")
assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(assets)

SEED = 4321
N_TRAIN, N_EVAL = 2000, 200
OUT = ROOT / "tulu_jax" / "assets" / "tiny_prefs"


def _misspell(word: str, rng: random.Random) -> str:
    """The word with two neighbouring letters swapped, or one letter dropped or doubled: always different."""
    pairs = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
    kind = rng.randrange(3)
    if kind == 0 and pairs:
        i = rng.choice(pairs)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    i = rng.randrange(len(word))
    if kind == 1 and len(word) > 3:
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]


def _off(value: int, rng: random.Random) -> int:
    """A near miss: value moved by 1-3 (kept non-negative)."""
    d = rng.choice((1, 2, 3))
    return value + d if value - d < 0 or rng.random() < 0.5 else value - d


def _other(options, correct: str, rng: random.Random, avoid=()) -> str:
    return rng.choice(sorted(set(options) - {correct, *avoid}))


def arithmetic(rng: random.Random) -> tuple[str, str, str, int]:
    """(question, right, wrong, value); multiplication mistakes are a neighbour row of the table or a near miss."""
    q, right, value = assets.arithmetic(rng)
    head = right.rsplit(" = ", 1)[0]  # "a op b"
    a, op, b = head.split()
    wrong = _off(value, rng)
    if op == "*" and rng.random() < 0.5:
        wrong = value + int(rng.choice((a, b)))
    return q, right, f"{head} = {wrong}.", value


def word_task(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(assets.WORDS)
    kind = rng.randrange(4)
    if kind == 0:
        bad = _misspell(w[::-1], rng)
        return (
            f"Reverse the word '{w}'.",
            f"The word '{w}' reversed is '{w[::-1]}'.",
            f"The word '{w}' reversed is '{bad}'.",
        )
    if kind == 1:
        return f"Write '{w}' in capital letters.", w.upper(), _misspell(w, rng).upper()
    if kind == 2:
        return (
            f"How many letters are in '{w}'?",
            f"'{w}' has {len(w)} letters.",
            f"'{w}' has {_off(len(w), rng)} letters.",
        )
    c = rng.choice(sorted(set(w)))
    n = w.count(c)
    m = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    return (
        f"How many times does '{c}' appear in '{w}'?",
        f"'{c}' appears {n} time{'s' * (n != 1)} in '{w}'.",
        f"'{c}' appears {m} time{'s' * (m != 1)} in '{w}'.",
    )


def fact(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        country = rng.choice(sorted(assets.CAPITALS))
        right = assets.CAPITALS[country]
        wrong = _other(assets.CAPITALS.values(), right, rng)
        return (
            f"What is the capital of {country}?",
            f"The capital of {country} is {right}.",
            f"The capital of {country} is {wrong}.",
        )
    if kind == 1:
        thing = rng.choice(sorted(assets.COLORS))
        name = thing[0].upper() + thing[1:]
        right = assets.COLORS[thing]
        return (
            f"What color is {thing}?",
            f"{name} is {right}.",
            f"{name} is {_other(assets.COLORS.values(), right, rng)}.",
        )
    word = rng.choice(sorted(assets.OPPOSITES))
    right = assets.OPPOSITES[word]
    wrong = _other(assets.OPPOSITES.values(), right, rng, avoid=(word,))
    return (
        f"What is the opposite of '{word}'?",
        f"The opposite of '{word}' is '{right}'.",
        f"The opposite of '{word}' is '{wrong}'.",
    )


def pair(rng: random.Random) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(chosen, rejected): the same turns, then a right vs a wrong final reply."""
    msgs: list[dict[str, str]] = []
    system = None
    if rng.random() < 0.2:
        system = rng.choice(assets.SYSTEMS + (assets.CAPS_SYSTEM,))
        msgs.append({"role": "system", "content": system})
    kind = rng.randrange(3)
    if kind == 0:
        q, right, wrong, value = arithmetic(rng)
        for _ in range(rng.choice((1, 2)) if rng.random() < 0.15 else 0):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": right}]
            n = rng.randint(1, 20)
            q = f"Now add {n} to that."
            right, wrong = f"{value} + {n} = {value + n}.", f"{value} + {n} = {_off(value + n, rng)}."
            value += n
    else:
        q, right, wrong = word_task(rng) if kind == 1 else fact(rng)
        if rng.random() < 0.15:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": right}]
            q, right, wrong = fact(rng)
    msgs.append({"role": "user", "content": q})
    if system == assets.CAPS_SYSTEM:
        msgs = [dict(m, content=m["content"].upper()) if m["role"] == "assistant" else m for m in msgs]
        # Half the time the rejected reply is right but ignores the system prompt (when that shows).
        ignores = right != right.upper() and rng.random() < 0.5
        right, wrong = right.upper(), (right if ignores else wrong.upper())
    assert right != wrong, (q, right)
    return msgs + [{"role": "assistant", "content": right}], msgs + [{"role": "assistant", "content": wrong}]


def make_split(rng: random.Random, n: int, prefix: str, seen: set[str]) -> list[dict]:
    """n pairs that are not in `seen` (which they are added to), so no eval pair repeats a training pair."""
    rows = []
    while len(rows) < n:
        chosen, rejected = pair(rng)
        key = json.dumps([chosen, rejected])
        if key in seen:
            continue
        seen.add(key)
        rows.append({"id": f"tiny_prefs_{prefix}_{len(rows)}", "chosen": chosen, "rejected": rejected})
    return rows


def check_with_tokenizer(rows: list[dict]) -> list[int]:
    """Every text round-trips through the bundled tokenizer; returns the token count of each side."""
    sys.path.insert(0, str(ROOT))
    from tulu_jax.data import load_tokenizer, render_tulu

    tok = load_tokenizer(None)
    lengths = []
    for row in rows:
        for side in ("chosen", "rejected"):
            text = render_tulu(row[side], tok.eos_token)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if tok.decode(ids) != text:
                raise RuntimeError(f"{row['id']} {side}: does not round-trip through the tiny tokenizer")
            lengths.append(len(ids))
    return lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rng = random.Random(SEED)
    seen: set[str] = set()
    splits = {"train": make_split(rng, N_TRAIN, "train", seen), "eval": make_split(rng, N_EVAL, "eval", seen)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        lengths = check_with_tokenizer(rows)
        print(
            f"{path}: {len(rows)} pairs, {path.stat().st_size / 1e3:.0f} kB, tokens per side "
            f"mean {sum(lengths) / len(lengths):.1f} max {max(lengths)}, "
            f"{sum(x < 100 for x in lengths) / len(lengths):.1%} under 100"
        )


if __name__ == "__main__":
    main()
