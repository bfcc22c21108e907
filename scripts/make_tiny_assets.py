"""Generates the bundled tiny chat data set and trains the tiny tokenizer on it (deterministic).

    python scripts/make_tiny_assets.py          # writes tulu_jax/assets/tiny_chat/, tiny_tokenizer/

The data is synthetic and learnable by a ~4M-parameter model in a few hundred steps: arithmetic,
word games (reverse, capitalise, count letters) and facts from a fixed table; ~20% have a system
prompt (one of them changes the answer to capitals) and ~15% are multi-turn follow-ups.
"""

import argparse
import json
import random
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from tulu_jax.data.chat import TULU_CHAT_TEMPLATE, render_tulu

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_tasks as tiny_tasks  # noqa: E402

SEED = 1234
N_TRAIN, N_EVAL = 3000, 200
N_TASK_DEMOS = 3000  # solved tiny_arith / tiny_if train prompts (scripts/make_tiny_tasks.py)
VOCAB_SIZE = 1024
EOS, PAD = "<|end_of_text|>", "<pad>"
# Llama-3's pre-tokenizer split (digits in groups of at most 3), so the tiny model sees the same kind of text.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ASSETS = Path(__file__).resolve().parent.parent / "tulu_jax" / "assets"

WORDS = (
    "apple river garden planet yellow window silver button candle forest rabbit orange pencil summer "
    "winter mountain bridge castle dragon flower guitar hammer island jacket kitten lemon marble needle "
    "ocean pepper quiet rocket shadow tiger velvet wagon zebra anchor basket cactus dolphin engine falcon "
    "ginger harbor igloo jungle kettle ladder magnet napkin oyster parrot quartz ribbon saddle tunnel "
    "umbrella violin walnut yogurt banana cherry puzzle market bottle spider cookie pillow mirror"
).split()
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Germany": "Berlin",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Poland": "Warsaw",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Sweden": "Stockholm",
    "Thailand": "Bangkok",
    "China": "Beijing",
}
COLORS = {
    "grass": "green",
    "the sky": "blue",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "chocolate": "brown",
    "a cloud": "white",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "day": "night",
    "open": "closed",
    "happy": "sad",
    "early": "late",
    "light": "dark",
    "full": "empty",
    "old": "new",
    "high": "low",
}
SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You are a careful math tutor.")
CAPS_SYSTEM = "Reply in capital letters."


def arithmetic(rng: random.Random) -> tuple[str, str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        value = a * b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        a, b = (a, b) if op == "+" or a >= b else (b, a)
        value = a + b if op == "+" else a - b
    q = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."))
    return q.format(a=a, op=op, b=b), f"{a} {op} {b} = {value}.", value


def word_task(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Reverse the word '{w}'.", f"The word '{w}' reversed is '{w[::-1]}'."
    if kind == 1:
        return f"Write '{w}' in capital letters.", f"{w.upper()}"
    if kind == 2:
        return f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters."
    c = rng.choice(sorted(set(w)))
    n = w.count(c)
    return f"How many times does '{c}' appear in '{w}'?", f"'{c}' appears {n} time{'s' * (n != 1)} in '{w}'."


def fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    if kind == 1:
        thing = rng.choice(sorted(COLORS))
        return f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {COLORS[thing]}."
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{OPPOSITES[word]}'."


def conversation(rng: random.Random) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    system = None
    if rng.random() < 0.2:
        system = rng.choice(SYSTEMS + (CAPS_SYSTEM,))
        msgs.append({"role": "system", "content": system})
    kind = rng.randrange(3)
    if kind == 0:
        q, a, value = arithmetic(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for _ in range(rng.choice((1, 2)) if rng.random() < 0.15 else 0):
            n = rng.randint(1, 20)
            msgs += [
                {"role": "user", "content": f"Now add {n} to that."},
                {"role": "assistant", "content": f"{value} + {n} = {value + n}."},
            ]
            value += n
    else:
        q, a = word_task(rng) if kind == 1 else fact(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.15:
            q2, a2 = fact(rng)
            msgs += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    if system == CAPS_SYSTEM:
        msgs = [dict(m, content=m["content"].upper()) if m["role"] == "assistant" else m for m in msgs]
    return msgs


def write_jsonl(path: Path, rows: list[list[dict[str, str]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for msgs in rows:
            f.write(json.dumps({"messages": msgs}) + "\n")


def train_tokenizer(texts: list[str], out_dir: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocab has {tok.get_vocab_size()} tokens, want {VOCAB_SIZE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 4096,
        "chat_template": TULU_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    rng = random.Random(SEED)
    train = [conversation(rng) for _ in range(N_TRAIN)]
    evals = [conversation(rng) for _ in range(N_EVAL)]
    # Solved train-split prompts of the verifiable tasks, shuffled in; the tokenizer is trained on the chat
    # part only (so adding task families leaves it unchanged).
    demos = tiny_tasks.sft_demonstrations(random.Random(tiny_tasks.SEED + 1), N_TASK_DEMOS)
    mixed = train + demos
    random.Random(SEED + 1).shuffle(mixed)
    write_jsonl(args.out / "tiny_chat" / "train.jsonl", mixed)
    write_jsonl(args.out / "tiny_chat" / "eval.jsonl", evals)
    train_tokenizer([render_tulu(m, EOS) for m in train], args.out / "tiny_tokenizer")
    print(f"wrote {len(train)} train / {len(evals)} eval rows and a {VOCAB_SIZE}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
