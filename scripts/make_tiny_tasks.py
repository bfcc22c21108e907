"""Generates the bundled verifiable tasks `tiny_arith` and `tiny_if` (deterministic from a seed).

    python scripts/make_tiny_tasks.py            # writes tulu_jax/assets/tiny_arith/, tiny_if/
    python scripts/make_tiny_tasks.py --seed 7   # another draw of the same task families

Each task has `train.jsonl` (prompts for RLVR) and `eval.jsonl` (held-out prompts), rows in Tülu 3's RLVR
format: `{"messages": [{"role": "user", ...}], "ground_truth": str, "dataset": "gsm8k" | "ifeval"}`.
`sft_demonstrations(rng, n)` gives solved train-split prompts and bare arithmetic drills (every operand
value, eval ones included, without a story) for the tiny SFT set (make_tiny_assets.py mixes them into
tiny_chat), so an SFT model has seen the answer formats and facts and RL has signal to work with.

tiny_arith: word problems ("Tom has 12 apples. He gets 7 more. ...") in the tiny chat domain; the
ground truth is a number, scored by the GSM8K rule (last number of the answer). Held out: no eval
operand value, name or object word occurs in any train problem.
tiny_if: tiny-domain questions with one format constraint (lowercase, capital letters, no commas, end
with a phrase, include a keyword, at least N words), scored by the IFEval-style functions. An empty
response satisfies the lowercase, capital-letters and no-commas prompts (as in Tülu's own IF data): about
half of tiny_if's prompts are of the other three kinds, which it fails. Held out: the
eval questions' subjects, keywords and end phrases do not occur in train prompts.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 2024
N_TRAIN, N_EVAL = 2000, 200
ASSETS = Path(__file__).resolve().parent.parent / "tulu_jax" / "assets"

# --- tiny_arith -------------------------------------------------------------------------------------
OPERANDS = range(1, 21)
EVAL_OPERANDS = frozenset({4, 9, 13, 17})
MUL_OPERANDS = range(2, 10)
EVAL_MUL_OPERANDS = frozenset({3, 7})
TRAIN_NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Jack", "Emma")
EVAL_NAMES = ("Omar", "Nina", "Leo", "Ruth", "Ivan")
TRAIN_OBJECTS = ("apples", "pencils", "cookies", "books", "marbles", "stickers", "eggs", "toys")
EVAL_OBJECTS = ("oranges", "candles", "shells", "cards")


def arith_problem(rng: random.Random, split: str) -> tuple[str, str, int]:
    """(question, worked answer, value) of one word problem from `split` ("train" or "eval")."""
    held = split == "eval"
    names, objects = (EVAL_NAMES, EVAL_OBJECTS) if held else (TRAIN_NAMES, TRAIN_OBJECTS)
    name, obj = rng.choice(names), rng.choice(objects)
    op = rng.choice("+-*")
    if op == "*":
        pool = [v for v in MUL_OPERANDS if (v in EVAL_MUL_OPERANDS) == held]
    else:
        pool = [v for v in OPERANDS if (v in EVAL_OPERANDS) == held]
    a, b = rng.choice(pool), rng.choice(pool)
    if op == "+":
        q = f"{name} has {a} {obj}. {name} gets {b} more {obj}. How many {obj} does {name} have now?"
        value = a + b
    elif op == "-":
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {obj} and gives away {b}. How many {obj} does {name} have left?"
        value = a - b
    else:
        q = f"{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?"
        value = a * b
    return q, f"{a} {op} {b} = {value}. The answer is {value}.", value


# --- tiny_if ----------------------------------------------------------------------------------------
# (question, plain answer): subjects split between train and eval.
TRAIN_SUBJECTS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("What color is grass?", "Grass is green."),
    ("What color is snow?", "Snow is white."),
    ("What color is a tomato?", "A tomato is red."),
    ("What is the opposite of 'hot'?", "The opposite of 'hot' is 'cold'."),
    ("What is the opposite of 'big'?", "The opposite of 'big' is 'small'."),
    ("What is the opposite of 'day'?", "The opposite of 'day' is 'night'."),
    ("Name three colors.", "Red, green, and blue."),
    ("Name three animals.", "A tiger, a rabbit, and a zebra."),
    ("Name three fruits.", "An apple, a lemon, and a banana."),
)
EVAL_SUBJECTS = (
    ("What is the capital of Peru?", "The capital of Peru is Lima."),
    ("What is the capital of Greece?", "The capital of Greece is Athens."),
    ("What is the capital of Cuba?", "The capital of Cuba is Havana."),
    ("What color is coal?", "Coal is black."),
    ("What color is the sky?", "The sky is blue."),
    ("What is the opposite of 'fast'?", "The opposite of 'fast' is 'slow'."),
    ("What is the opposite of 'early'?", "The opposite of 'early' is 'late'."),
    ("Name three birds.", "A parrot, a falcon, and an owl."),
    ("Name three tools.", "A hammer, a needle, and a ladder."),
    ("What is the capital of Chile?", "The capital of Chile is Santiago."),
    ("What color is a plum?", "A plum is purple."),
    ("What is the opposite of 'full'?", "The opposite of 'full' is 'empty'."),
)
TRAIN_KEYWORDS = ("river", "garden", "window", "silver", "candle", "forest", "rocket", "castle")
EVAL_KEYWORDS = ("velvet", "harbor", "quartz", "meadow")
TRAIN_ENDINGS = ("Have a nice day.", "That is all.", "Thank you.", "I hope this helps.")
EVAL_ENDINGS = ("See you soon.", "Any other questions?")


def _no_commas(text: str) -> str:
    return text.replace(", and ", " and ").replace(",", " and")


def if_problem(rng: random.Random, split: str) -> tuple[str, str, dict]:
    """(question, compliant answer, ground-truth constraint) of one constrained prompt from `split`."""
    held = split == "eval"
    question, plain = rng.choice(EVAL_SUBJECTS if held else TRAIN_SUBJECTS)
    kind = rng.randrange(6)
    if kind == 0:
        return f"{question} Answer in lowercase letters only.", plain.lower(), {"func_name": "validate_lowercase"}
    if kind == 1:
        return f"{question} Answer in capital letters only.", plain.upper(), {"func_name": "validate_uppercase"}
    if kind == 2:
        return f"{question} Do not use any commas.", _no_commas(plain), {"func_name": "validate_no_commas"}
    if kind == 3:
        end = rng.choice(EVAL_ENDINGS if held else TRAIN_ENDINGS)
        truth = {"func_name": "validate_end", "end_phrase": end}
        return f"{question} End your answer with the phrase '{end}'", f"{plain} {end}", truth
    if kind == 4:
        word = rng.choice(EVAL_KEYWORDS if held else TRAIN_KEYWORDS)
        truth = {"func_name": "verify_keywords", "keyword_list": [word]}
        return f"{question} Include the word '{word}' in your answer.", f"{plain} The word is {word}.", truth
    # "at least", not "at most": an empty response must not satisfy it (three kinds above already accept one)
    n = rng.choice((6, 7, 8))
    truth = {"func_name": "validate_word_constraint", "N": n, "quantifier": "at least"}
    return f"{question} Answer in at least {n} words.", f"{plain} I am sure of it.", truth


# --- rows -------------------------------------------------------------------------------------------
def task_rows(rng: random.Random, task: str, split: str, n: int) -> list[dict]:
    """Up to `n` prompts of `task` ("tiny_arith" or "tiny_if") from `split`, in RLVR row format. Eval
    prompts are distinct (fewer than `n` when the held-out space is smaller); train prompts may repeat."""
    draw = arith_problem if task == "tiny_arith" else if_problem
    rows, seen = [], set()
    for _ in range(50 * n):
        if len(rows) == n:
            break
        q, _, truth = draw(rng, split)
        if split == "eval" and q in seen:
            continue
        seen.add(q)
        ground_truth, dataset = (str(truth), "gsm8k") if task == "tiny_arith" else (json.dumps(truth), "ifeval")
        rows.append({"messages": [{"role": "user", "content": q}], "ground_truth": ground_truth, "dataset": dataset})
    return rows


def arith_drill(rng: random.Random) -> tuple[str, str]:
    """A bare sum, difference or product over all operand values (eval ones included): the facts a story
    problem needs, taught without the story, so held-out problems are solvable by applying them."""
    op = rng.choice("+-*")
    values = MUL_OPERANDS if op == "*" else OPERANDS
    a, b = rng.choice(values), rng.choice(values)
    if op == "-":
        a, b = max(a, b), min(a, b)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}."


def sft_demonstrations(rng: random.Random, n: int) -> list[list[dict[str, str]]]:
    """`n` solved chats: a third tiny_arith train problems, a third tiny_if train prompts and a third
    arithmetic drills (`arith_drill`)."""
    convs = []
    for i in range(n):
        if i % 3 == 0:
            q, a, _ = arith_problem(rng, "train")
        elif i % 3 == 1:
            q, a, _ = if_problem(rng, "train")
        else:
            q, a = arith_drill(rng)
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return convs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for task in ("tiny_arith", "tiny_if"):
        for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
            write_jsonl(args.out / task / f"{split}.jsonl", task_rows(rng, task, split, n))
    print(f"wrote tiny_arith and tiny_if ({N_TRAIN} train / {N_EVAL} eval prompts each) to {args.out}")


if __name__ == "__main__":
    main()
