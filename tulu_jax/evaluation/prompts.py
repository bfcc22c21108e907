"""Few-shot chat prompts of the GSM8K and MATH evaluations, as in Tülu 3's evaluation (Lambert et al. 2024,
"Tülu 3", §7: GSM8K 8-shot chain of thought, MATH 4-shot in the Minerva format).

The exemplars are ours (written for this package, not benchmark items). They are given to the chat model as
alternating turns: each exemplar is one user turn (the question) and one assistant turn (short reasoning and
the answer sentence), then the test question as the last user turn, so the model answers in the exemplars'
format. The answer sentences are what the RLVR verifiers read: GSM8K takes the last number of the response
("So the answer is N."), MATH takes a `\\boxed{}` or Minerva's "The final answer is X. I hope it is correct."
"""

from __future__ import annotations

# (question, reasoning, answer): eight grade-school word problems, answered as "... So the answer is N."
GSM8K_EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    (
        "A baker makes 24 muffins in the morning and sells 17 of them by noon. How many muffins are left?",
        "The baker starts with 24 muffins and sells 17, so 24 - 17 = 7 muffins are left.",
        "7",
    ),
    (
        "Tom has 3 boxes with 12 pencils in each box. He gives 10 pencils to his friends. How many pencils does "
        "Tom have now?",
        "Tom has 3 * 12 = 36 pencils. After giving away 10 he has 36 - 10 = 26 pencils.",
        "26",
    ),
    (
        "A train travels at 60 miles per hour for 4 hours. How many miles does it travel?",
        "In each hour the train covers 60 miles, so in 4 hours it covers 60 * 4 = 240 miles.",
        "240",
    ),
    (
        "Maria buys 5 notebooks that cost $3 each and one pen that costs $2. How much does she spend in dollars?",
        "The notebooks cost 5 * 3 = 15 dollars. With the pen she spends 15 + 2 = 17 dollars.",
        "17",
    ),
    (
        "A garden has 8 rows of tulips with 9 tulips in each row. Half of the tulips are red. How many red "
        "tulips are in the garden?",
        "The garden has 8 * 9 = 72 tulips. Half of them are red, so 72 / 2 = 36 tulips are red.",
        "36",
    ),
    (
        "Sam reads 15 pages of his book every day. The book has 120 pages. How many days does Sam need to "
        "finish the book?",
        "Sam needs 120 / 15 = 8 days to read 120 pages at 15 pages a day.",
        "8",
    ),
    (
        "There are 30 students in a class and 40% of them are boys. How many girls are in the class?",
        "The class has 30 * 40 / 100 = 12 boys, so it has 30 - 12 = 18 girls.",
        "18",
    ),
    (
        "Lena saves $25 every week. After 6 weeks she spends $70 on a jacket. How many dollars does she have left?",
        "After 6 weeks Lena has saved 25 * 6 = 150 dollars. After the jacket she has 150 - 70 = 80 dollars.",
        "80",
    ),
)

# (problem, solution, answer in LaTeX): four competition-style problems in the Minerva answer format.
MATH_EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    (
        "Find the value of $x$ such that $3x + 7 = 22$.",
        "Subtracting 7 from both sides gives $3x = 15$. Dividing both sides by 3 gives $x = 5$.",
        "5",
    ),
    (
        "What is the sum of the interior angles of a hexagon, in degrees?",
        "The interior angles of a polygon with $n$ sides add up to $(n-2) \\cdot 180^\\circ$. A hexagon has "
        "$n = 6$ sides, so the sum is $4 \\cdot 180^\\circ = 720^\\circ$.",
        "720",
    ),
    (
        "Simplify $\\frac{12}{18}$.",
        "The greatest common divisor of 12 and 18 is 6. Dividing the numerator and the denominator by 6 gives "
        "$\\frac{12}{18} = \\frac{2}{3}$.",
        "\\frac{2}{3}",
    ),
    (
        "How many positive divisors does $36$ have?",
        "Since $36 = 2^2 \\cdot 3^2$, a divisor is $2^a 3^b$ with $0 \\le a \\le 2$ and $0 \\le b \\le 2$. "
        "There are $(2+1)(2+1) = 9$ such choices.",
        "9",
    ),
)


def gsm8k_answer(reasoning: str, answer: str) -> str:
    """An exemplar's reply: the reasoning, then "So the answer is N." (Tülu 3's GSM8K CoT format)."""
    return f"{reasoning} So the answer is {answer}."


def math_answer(solution: str, answer: str) -> str:
    """An exemplar's reply in the Minerva format: the solution, then "Final Answer: The final answer is $X$.
    I hope it is correct." """
    return f"Solution:\n{solution}\nFinal Answer: The final answer is ${answer}$. I hope it is correct."


def _few_shot(turns: list[tuple[str, str]], question: str) -> list[dict[str, str]]:
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": question}]


def gsm8k_messages(question: str) -> list[dict[str, str]]:
    """The 8-shot chain-of-thought chat for one GSM8K question: 8 exemplar user/assistant pairs, then
    "Question: <question>" as the last user turn."""
    turns = [(f"Question: {q}", gsm8k_answer(r, a)) for q, r, a in GSM8K_EXEMPLARS]
    return _few_shot(turns, f"Question: {question}")


def math_messages(problem: str) -> list[dict[str, str]]:
    """The 4-shot Minerva-format chat for one MATH problem: 4 exemplar pairs ("Problem:\\n..." and
    "Solution:\\n... Final Answer: ..."), then "Problem:\\n<problem>" as the last user turn."""
    turns = [(f"Problem:\n{p}", math_answer(s, a)) for p, s, a in MATH_EXEMPLARS]
    return _few_shot(turns, f"Problem:\n{problem}")
